"""The README's Python examples run as written (a new user copies them first).

The `openai` client example needs a running server; `test_server.py` sends the same
`vllm_xargs` keys to one. Every other Python block runs here, each in a fresh interpreter
from an empty folder, as a user would run a saved script."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def runnable_blocks() -> list[str]:
    return [b for b in python_blocks() if "OpenAI(" not in b]


def test_readme_has_the_documented_examples():
    blocks = python_blocks()
    assert len(blocks) == len(runnable_blocks()) + 1  # only the client example is skipped
    assert any("LLM(" in b for b in runnable_blocks())
    assert any("ValueHead.load" in b for b in runnable_blocks())


@pytest.mark.parametrize("index", range(len(runnable_blocks())))
def test_readme_python_example_runs(index, tmp_path):
    code = runnable_blocks()[index]
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {**os.environ, "VLLM_CONFIGURE_LOGGING": "0"}  # stdout: the example's prints only
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, code + "\n" + proc.stdout[-3000:] + proc.stderr[-3000:]
    if "llm.generate" in code:  # one completion per request: default, off, stronger, other head
        texts = [line for line in proc.stdout.splitlines() if line.strip()]
        assert len(texts) == 4 and len(set(texts)) == 4, proc.stdout[-3000:]


def readme_cli_commands() -> list[list[str]]:
    """Every `vllm-recontrol <job> ...` line of the README's shell blocks (also launched as
    `torchrun ... -m vllm_recontrol.cli <job> ...`), continuation lines joined; an optional
    `[...]` group is kept as plain arguments (it must parse too)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("torchrun ") and " -m vllm_recontrol.cli " in line:
                line = "vllm-recontrol " + line.split(" -m vllm_recontrol.cli ", 1)[1]
            if line.startswith("vllm-recontrol ") and " && " not in line:
                commands.append(shlex.split(line.replace("[", " ").replace("]", " "))[1:])
    return commands


class _Parsed(Exception):
    pass


def test_readme_cli_commands_parse(monkeypatch):
    """Each documented job command line is accepted by that job's own argument parser (the
    job itself is stopped right after parsing: the models are not downloadable here)."""
    import argparse
    import importlib

    from vllm_recontrol.cli import SUBCOMMANDS

    commands = [c for c in readme_cli_commands() if c[0] not in ("serve", "vllm")]
    assert {c[0] for c in commands} >= {"collect", "label", "train", "eval"}
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    for command in commands:
        module = importlib.import_module(SUBCOMMANDS[command[0]][0])
        with pytest.raises(_Parsed):
            module.main(command[1:])
