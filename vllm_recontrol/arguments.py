"""Command-line values that start with a dash (``--grid -1:10``, ``--alpha -0.5``).

argparse reads such a value as an unknown flag and answers "expected one argument", so the
command never gets to say what is wrong with the value itself. Joining the value to its
flag (``--grid=-1:10``) lets argparse hand it over, and the command's own check names the
problem (alpha must be >= 0, and so on).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def join_dash_values(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> list[str]:
    """``argv`` (None: the process's own arguments, as argparse reads them) with ``--flag
    -value`` written ``--flag=-value`` for every flag of ``parser`` that takes exactly one
    value, when ``-value`` is not itself one of its flags."""
    takes_one = {option for action in parser._actions if action.nargs is None
                 and action.option_strings and not _is_switch(action)
                 for option in action.option_strings}
    flags = set(parser._option_string_actions)
    joined: list[str] = []
    tokens = list(sys.argv[1:] if argv is None else argv)
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if token == "--":  # everything after it is positional already
            joined.extend(tokens[index:])
            break
        following = tokens[index + 1] if index + 1 < len(tokens) else None
        if (token in takes_one and following is not None and following.startswith("-")
                and following != "--" and following.split("=", 1)[0] not in flags):
            joined.append(f"{token}={following}")
            index += 2
            continue
        joined.append(token)
        index += 1
    return joined


def _is_switch(action: argparse.Action) -> bool:
    """store_true/store_false/count/help/version take no value (their nargs is 0)."""
    return action.nargs == 0 or isinstance(action, (argparse._StoreConstAction,
                                                    argparse._CountAction,
                                                    argparse._HelpAction,
                                                    argparse._VersionAction))
