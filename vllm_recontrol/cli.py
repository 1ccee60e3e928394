"""The ``vllm-recontrol`` command: one subcommand per job, each also a Python function."""

from __future__ import annotations

import os
import sys

SUBCOMMANDS = {
    "demo": ("vllm_recontrol.demo", "RE-Control end to end in a toy world (collect, label, "
                                    "train, eval), nothing downloaded"),
    "collect": ("vllm_recontrol.training.collector", "sample responses with vLLM and store their states"),
    "label": ("vllm_recontrol.training.labeler", "score collected responses (reward model or function)"),
    "train": ("vllm_recontrol.training.trainer", "train a value head on labelled states"),
    "eval": ("vllm_recontrol.evaluation.evaluate", "RE-Control vs. base, Best-of-N and prompting"),
    "inspect": ("vllm_recontrol.inspect_head", "validate value heads and show what they record"),
    "serve": (None, "vLLM's own `vllm serve` (also where the CPU wheel's `vllm` command fails)"),
    "vllm": (None, "any vLLM command line, e.g. `vllm-recontrol vllm bench throughput ...`"),
}


def versions() -> str:
    """This package's version and the installed vLLM's (and whether it is the tested one)."""
    from . import __version__
    from ._vllm_adapter import TESTED_VLLM, installed_vllm_version, is_tested_vllm

    try:
        vllm = installed_vllm_version()
    except ImportError:
        vllm = "not installed"
    tested = "tested" if is_tested_vllm(vllm) else f"untested: this release was tested with {TESTED_VLLM}"
    return f"vllm-recontrol {__version__} | vLLM {vllm} ({tested})"


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None  # not a caller's main(argv): may end the process
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:
        print(versions())
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"vllm-recontrol: unknown command {argv[0]!r}\n", file=sys.stderr)
        print("usage: vllm-recontrol {" + ",".join(SUBCOMMANDS) + "} [options] | --version\n")
        for name, (_, summary) in SUBCOMMANDS.items():
            print(f"  {name:<10} {summary}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] in ("serve", "vllm"):
        from ._vllm_adapter import run_vllm_cli

        return run_vllm_cli(argv if argv[0] == "serve" else argv[1:])
    import importlib

    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    status = module.main(argv[1:])
    from .training.common import INTERRUPTED_STATUS

    if from_command_line and status == INTERRUPTED_STATUS and _ray_started():
        # Interrupted with Ray started here: the command's own cleanup (actors killed, Ray
        # shut down) has run, but Ray's native teardown at interpreter exit could then crash
        # (exit status 139 after "interrupted" when Ctrl-C came just after Ray started)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def _ray_started() -> bool:
    pool = sys.modules.get("vllm_recontrol.training.ray_pool")
    return bool(pool and pool.ray_started_in_this_process())


if __name__ == "__main__":
    sys.exit(main())
