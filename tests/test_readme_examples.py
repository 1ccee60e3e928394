"""The README's Python examples run as written (a new user copies them first).

The `openai` client example needs a running server; `test_server.py` sends the same
`vllm_xargs` keys to one. Every other Python block runs here, each in a fresh interpreter
from an empty folder, as a user would run a saved script."""

from __future__ import annotations

import os
import re
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
    if "llm.generate" in code:  # one completion per request: default, off, stronger
        texts = [line for line in proc.stdout.splitlines() if line.strip()]
        assert len(texts) == 3, proc.stdout[-3000:]
