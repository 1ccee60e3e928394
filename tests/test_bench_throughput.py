"""bench_throughput.py's arithmetic: the control's FLOPs per token in either ascent form."""

from __future__ import annotations

import importlib.util
import json
import sys
from argparse import Namespace
from pathlib import Path

import pytest

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


class _Finished:  # one RequestOutput: only its token ids are read
    def __init__(self, count: int) -> None:
        self.outputs = [Namespace(token_ids=list(range(count)))]


class _FakeLLM:
    """An engine that records what each request asked for."""

    def __init__(self) -> None:
        self.requests: list[list] = []

    def generate(self, prompts, params, use_tqdm=False):
        self.requests.append([p.extra_args for p in params])
        return [_Finished(p.max_tokens) for p in params]


def _fake_engines(bench, monkeypatch, tmp_path, bench_fails: bool = False,
                  stock_bench_times_out: bool = False) -> dict:
    """bench_throughput with fake engines (no vLLM engine starts) on a tiny real head."""
    from vllm_recontrol import ValueHead

    engines: dict = {}

    def start(args, recontrol, plugin_loaded, form=None):
        engines[(recontrol, plugin_loaded, form)] = _FakeLLM()
        return engines[(recontrol, plugin_loaded, form)]

    def tiny(args):
        args.model, args.value_head = str(tmp_path / "m"), str(tmp_path / "h")
        ValueHead(8, [4], seed=0).save(args.value_head)
        (tmp_path / "m").mkdir(exist_ok=True)

    import subprocess

    from vllm import SamplingParams  # noqa: F401  (imported before subprocess.run is faked)

    real_run = subprocess.run

    def bench_run(command, **kwargs):
        if "bench" not in command:
            return real_run(command, **kwargs)
        if stock_bench_times_out and kwargs["env"].get("VLLM_PLUGINS") == "none-at-all":
            raise subprocess.TimeoutExpired(command, kwargs["timeout"])
        failed = bench_fails and "--model-impl" in command
        return Namespace(returncode=1 if failed else 0, stderr="",
                         stdout="boom" if failed else "Throughput: 1.0 requests/s, "
                                                      "100.0 total tokens/s, 50.0 output tokens/s")

    monkeypatch.setattr(bench, "start_engine", start)
    monkeypatch.setattr(bench, "stop_engine", lambda llm: None)
    monkeypatch.setattr(bench, "tiny_defaults", tiny)
    monkeypatch.setattr(bench, "model_flops_per_token", lambda model: 1e6)
    monkeypatch.setattr(bench, "plot", lambda rows, path: False)
    monkeypatch.setattr(subprocess, "run", bench_run)
    return engines


def test_two_heads_are_timed_only_where_a_batch_names_both(tmp_path, monkeypatch):
    """A batch of one request names one head: its "2 heads" row measured one head."""
    bench = _load()
    engines = _fake_engines(bench, monkeypatch, tmp_path)
    assert bench.main(["--batch-sizes", "1", "2", "--steps", "3", "--repeats", "1",
                       "--out", str(tmp_path / "out")]) == 0
    rows = json.loads((tmp_path / "out" / "throughput-cpu.json").read_text())["rows"]
    assert [(r["variant"], r["batch"]) for r in rows if "2 heads" in r["variant"]] == [
        ("steps=3, 2 heads", 2)]
    heads = {x.get("recontrol_head") for call in engines[(True, True, None)].requests
             for x in call if x}
    assert heads == {None, "second"}
    for bad in (["--repeats", "0"], ["--batch-sizes", "0"], ["--gpu-memory-utilization", "2"]):
        with pytest.raises(SystemExit):  # refused before any engine starts (they used to
            bench.main(bad)              # end in KeyError / ZeroDivisionError after the run)


def test_a_failed_vllm_bench_run_keeps_the_other_rows_and_the_run_s_settings(
        tmp_path, monkeypatch):
    """The in-process rows (minutes of them) are saved before `vllm bench` runs; a bench
    run that fails is named, left out, and the exit status says so. The JSON holds what
    reproduces the table: the settings as resolved, versions, the head's config."""
    bench = _load()
    _fake_engines(bench, monkeypatch, tmp_path, bench_fails=True)
    assert bench.main(["--batch-sizes", "2", "--steps", "3", "--repeats", "1", "--vllm-bench",
                       "--out", str(tmp_path / "out")]) == 1
    saved = json.loads((tmp_path / "out" / "throughput-cpu.json").read_text())
    variants = [r["variant"] for r in saved["rows"]]
    assert variants[:3] == ["stock", "installed", "off"]
    assert "vllm-bench stock" in variants and "vllm-bench steps=3" not in variants
    assert len(saved["failures"]) == 1 and saved["failures"][0].startswith(
        "vllm-bench steps=3 failed")
    assert saved["settings"]["repeats"] == 1 and saved["settings"]["enforce_eager"] is True
    assert saved["settings"]["kv_cache_bytes"] == 256 << 20  # the CPU default, resolved
    assert saved["value_head_config"]["widths"] == [4]
    assert saved["vllm_bench_input_tokens"] == 32 and "torch" in saved["versions"]
    assert saved["commit"] and len(saved["commit"]) == 40
    assert saved["ascent_form"] in ("direct", "gram")


def test_a_stock_bench_run_that_times_out_leaves_the_ratios_empty_not_nan(tmp_path, monkeypatch):
    """A `vllm bench` run past its time limit ended the whole run; without the stock bench
    run the bench rows' ratios are null in the JSON (NaN is no JSON) and "-" in the table,
    under which the failure is named."""
    bench = _load()
    _fake_engines(bench, monkeypatch, tmp_path, stock_bench_times_out=True)
    assert bench.main(["--batch-sizes", "2", "--steps", "3", "--repeats", "1", "--vllm-bench",
                       "--out", str(tmp_path / "out")]) == 1
    text = (tmp_path / "out" / "throughput-cpu.json").read_text()
    saved = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))
    bench_rows = [r for r in saved["rows"] if r["variant"].startswith("vllm-bench")]
    assert [r["variant"] for r in bench_rows] == ["vllm-bench installed", "vllm-bench steps=3"]
    assert all(r["ratio_to_stock"] is None and r["gap_to_floor"] is None for r in bench_rows)
    assert saved["failures"][0].startswith("vllm-bench stock failed: TimeoutExpired")
    table = (tmp_path / "out" / "throughput-cpu.md").read_text()
    assert "| vllm-bench installed | - | 2 | 50.0 | - |" in table
    assert "Failed: vllm-bench stock failed: TimeoutExpired" in table
    assert saved["backend"] == "torch" and saved["settings"]["resolved_dtype"] == "auto"


def test_a_speculative_config_reaches_every_engine_and_empties_the_floor(tmp_path,
                                                                         monkeypatch):
    """Every engine (stock too) and every `vllm bench` run speculates with it; the floor,
    one model pass per token, does not hold under speculation and is left empty."""
    import subprocess

    import vllm

    bench = _load()
    _fake_engines(bench, monkeypatch, tmp_path)
    commands = []
    fake_bench_run = subprocess.run  # _fake_engines' stand-in

    def recording_run(command, **kwargs):
        commands.append(command)
        return fake_bench_run(command, **kwargs)

    monkeypatch.setattr(subprocess, "run", recording_run)
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}
    assert bench.main(["--batch-sizes", "2", "--steps", "3", "--repeats", "1", "--vllm-bench",
                       "--speculative-config", json.dumps(spec),
                       "--out", str(tmp_path / "out")]) == 0
    saved = json.loads((tmp_path / "out" / "throughput-cpu.json").read_text())
    assert saved["settings"]["speculative_config"] == spec
    assert all(r["floor_ratio"] is None and r["gap_to_floor"] is None for r in saved["rows"])
    assert all(r["ratio_to_stock"] is not None for r in saved["rows"])
    bench_commands = [c for c in commands if "bench" in c]
    assert bench_commands and all(json.loads(c[c.index("--speculative-config") + 1]) == spec
                                  for c in bench_commands)
    table = (tmp_path / "out" / "throughput-cpu.md").read_text()
    assert "| stock | - | 2 |" in table and table.count("| - | - |") >= len(saved["rows"])

    seen = []  # the real start_engine hands it to vLLM
    monkeypatch.setattr(vllm, "LLM", lambda **kwargs: seen.append(kwargs))
    args = bench.argparse.Namespace(
        model="m", dtype="auto", max_model_len=64, batch_sizes=[2], enforce_eager=True,
        kv_cache_bytes=None, gpu_memory_utilization=None, speculative_config=spec)
    _load().start_engine(args, recontrol=False, plugin_loaded=True)
    assert seen[0]["speculative_config"] == spec
    args.__dict__.update(value_head="h", alpha=0.5, steps=[30, 1, 5, 30], backend="auto",
                         ascent_form="auto")
    _load().start_engine(args, recontrol=True, plugin_loaded=True)
    # every timed step count warmed up at engine start (no CUDA graph captured while timed)
    assert seen[1]["additional_config"]["recontrol"]["warmup_steps"] == [1, 5, 30]
    for bad in ("[1, 2]", "{nope"):
        with pytest.raises(SystemExit):
            bench.main(["--speculative-config", bad])


def test_the_default_tiny_model_and_head_are_removed_after_the_run(tmp_path, monkeypatch):
    """The default model and head live in a temporary folder the run removes; the JSON keeps
    both configs, so the table stays reproducible."""
    bench = _load()
    real_defaults = bench.tiny_defaults
    _fake_engines(bench, monkeypatch, tmp_path)
    monkeypatch.setattr(bench, "tiny_defaults", real_defaults)
    assert bench.main(["--batch-sizes", "1", "--steps", "2", "--repeats", "1",
                       "--out", str(tmp_path / "out")]) == 0
    saved = json.loads((tmp_path / "out" / "throughput-cpu.json").read_text())
    work = Path(saved["model"]).parent
    assert work.name.startswith("bench-throughput-") and Path(saved["value_head"]).parent == work
    assert not work.exists()
    assert saved["model_config"]["hidden_size"] == 256
    assert saved["value_head_config"]["widths"] == [256, 256]
