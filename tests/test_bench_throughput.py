"""bench_throughput.py's arithmetic: the control's FLOPs per token in either ascent form."""

from __future__ import annotations

import importlib.util
import json
import sys
from argparse import Namespace
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_throughput.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_control_flops_count_the_form_that_runs(tmp_path):
    bench = _load()
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "widths": [48, 32]}))
    head = str(tmp_path)
    # direct: per step 64x48 + 48x32 forward (+ the 32-wide output) and the same backward
    direct = 2 * 30 * ((64 * 48 + 48 * 32 + 32) + (64 * 48 + 48 * 32))
    assert bench.control_flops_per_token(head, 30) == direct
    # Gram: W1's two products become one with G (48 x 48), none at step 0 (c = 0); z1(s)
    # and u = c W1 once
    gram = 2 * (30 * ((48 * 32 + 32) + 48 * 32) + 29 * 48 * 48 + 2 * 64 * 48)
    assert bench.control_flops_per_token(head, 30, "gram") == gram
    assert gram < direct
    args = Namespace(value_head=head, backend="torch", ascent_form="auto")
    assert bench.ascent_form_of(args) == "gram"  # at any step count (a tie at one step)
    args.ascent_form = "direct"
    assert bench.ascent_form_of(args) == "direct"
