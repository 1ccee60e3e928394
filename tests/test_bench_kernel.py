"""The GPU kernel benchmark script runs end to end on a CPU (Triton's interpreter, toy sizes),
so that a GPU session does not spend its device time on a broken script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kernel.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("VLLM_RECONTROL_BACKEND", None)
    run = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", *args], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def test_check_mode_passes_on_the_interpreter(tmp_path):
    _run("--check", "--json", str(tmp_path / "check.json"))
    result = json.loads((tmp_path / "check.json").read_text())
    assert result["complete"] and result["failures"] == 0 and len(result["cases"]) == 8
    assert [c.get("max_norm") for c in result["cases"]].count("per-row") == 2
    assert [c.get("form") for c in result["cases"]].count("gram") == 3
    assert all(case["ok"] and case["deterministic"] for case in result["cases"])


def test_timing_mode_writes_every_row(tmp_path):
    variants = ["torch-eager", "triton", "head-ascend", "triton-graph"]
    _run("--variants", *variants, "--layers", "1", "--json", str(tmp_path / "b.json"),
         "--markdown", str(tmp_path / "b.md"))
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == variants * 2  # toy sizes: B = 1 and 3
    timed = [r for r in rows if r["variant"] != "triton-graph"]
    assert all(r["ms"] > 0 for r in timed)
    assert all(r["error"] == "needs CUDA" for r in rows if r["variant"] == "triton-graph")
    assert all(set(r["plans"]) == {"forward", "backward"} and r["plans"]["forward"]["block_m"]
               for r in rows if r["variant"] == "triton-graph")  # for onchip_model.py
    assert (tmp_path / "b.md").read_text().count("| head-ascend |") == 2


def test_warm_up_shards_compile_without_errors():
    run = _run("--warm-only", "--sweep", "--shard", "1", "--shards", "3")
    assert "warm shard 1/3:" in run.stdout and ", 0 failed" in run.stdout


def test_gram_variants_run_their_kernels():
    """triton-gram-graph (the Gram kernel on the head with G) and head-ascend-gram launch
    without errors (their graphs need CUDA; warm-only runs the plain launches)."""
    run = _run("--warm-only", "--variants", "triton-gram-graph", "head-ascend-gram",
               "--layers", "1", "2")
    assert "warm shard 0/1: 8 launches compiled, 0 failed" in run.stdout


def test_projected_variants_run_their_kernels_and_project():
    """The max_norm variants launch the projected kernels of both forms (warm-only: the
    plain launches) and head-ascend-norm caps each row at its own radius."""
    run = _run("--warm-only", "--variants", "triton-norm-graph", "triton-gram-norm-graph",
               "--layers", "2")
    assert "warm shard 0/1: 4 launches compiled, 0 failed" in run.stdout
    import torch

    bench = _load("bench_kernel")
    from vllm_recontrol import ascent

    gen = torch.Generator().manual_seed(2)
    mlp = bench.make_head(ascent, 40, [24], torch.float32, torch.device("cpu"), gen)
    with torch.no_grad():
        mlp.weights[0].mul_(20.0)  # steep enough that the free ascent leaves every radius
    states = torch.randn(7, 40, generator=gen)
    alpha, steps = torch.full((7,), 2.0), torch.full((7,), 3)
    args = bench.parse_args(["--device", "cpu"])
    heads = {"fp32": mlp, "bf16": mlp}
    run_variant = lambda name: bench.raw_variant(  # noqa: E731
        name, ascent, None, heads, states, alpha, steps, 3, torch.device("cpu"), args)
    free = (run_variant("head-ascend")() - states).norm(dim=1)
    capped = (run_variant("head-ascend-norm")() - states).norm(dim=1)
    radii = bench.per_row_radii(7)
    assert (free > 0.1).all()
    for row in range(7):
        if radii[row].isinf():
            assert capped[row] == free[row]
        else:
            assert capped[row] <= radii[row] * (1 + 1e-5) and capped[row] < free[row]


@pytest.mark.parametrize("widths", [[24], [24, 17]])
def test_gram_closed_form_of_the_benchmark_is_the_ascent(widths):
    """torch-gram-graph's closed form (products in the weights' dtype) against float64
    autograd, with fp32 weights, and near it with bf16 products."""
    import torch

    bench = _load("bench_kernel")
    from vllm_recontrol import ascent
    from vllm_recontrol.kernels.reference import reference_ascent

    gen = torch.Generator().manual_seed(5)
    mlp = bench.make_head(ascent, 40, widths, torch.float32, torch.device("cpu"), gen)
    states = torch.randn(6, 40, generator=gen)
    alpha, steps = torch.full((6,), 0.7), torch.tensor([0, 1, 2, 3, 3, 2])
    ref, _ = reference_ascent(mlp.weights, mlp.biases, states, alpha, steps, 3)
    u = bench.gram_form_ascent(ascent.with_first_gram(mlp), states, alpha, steps, 3)
    torch.testing.assert_close(u.double(), ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(u[0], torch.zeros(40))
    half = ascent.MLPWeights([w.bfloat16() for w in mlp.weights],
                             [b.bfloat16() for b in mlp.biases])
    u16 = bench.gram_form_ascent(ascent.with_first_gram(half), states, alpha, steps, 3)
    assert ((u16.double() - ref).norm() / ref.norm()).item() < 0.05


def test_l2_variant_runs_its_contiguous_head():
    """triton-l2-graph's head copy (hidden matrices in one buffer) runs through the kernel
    (its graph and L2 window need CUDA; warm-only runs the plain launch)."""
    run = _run("--warm-only", "--variants", "triton-l2-graph", "--layers", "2")
    assert "warm shard 0/1: 2 launches compiled, 0 failed" in run.stdout


def test_evict_variant_runs_and_only_where_weights_are_streamed():
    """triton-evict-graph runs its plan through the kernel (warm-only: the plain launch) and
    is planned only for batches of up to 64 rows."""
    run = _run("--warm-only", "--variants", "triton-evict-graph", "--layers", "2")
    assert "warm shard 0/1: 2 launches compiled, 0 failed" in run.stdout
    bench = _load("bench_kernel")
    args = bench.parse_args(["--variants", "triton-graph", "triton-evict-graph",
                             "--hidden-sizes", "64", "--layers", "1", "--steps", "2",
                             "--batch", "1", "64", "65", "256"])
    planned = [(t.case.batch, t.variant) for t in bench.tasks(args)]
    assert [b for b, v in planned if v == "triton-evict-graph"] == [1, 64]
    assert [b for b, v in planned if v == "triton-graph"] == [1, 64, 65, 256]


def test_bare_products_chain_the_ascents_matrix_products():
    """cublas-products-graph runs exactly the ascent's 2L products per step, with the
    forward and backward shapes, chained (checked against the same chain written out)."""
    import torch

    bench = _load("bench_kernel")
    from vllm_recontrol import ascent

    gen = torch.Generator().manual_seed(0)
    mlp = bench.make_head(ascent, 6, [5, 4], torch.float64, torch.device("cpu"), gen)
    states = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    w1, w2 = mlp.weights[0], mlp.weights[1]
    calls = []
    real_mm = torch.mm

    def counting_mm(*args, **kwargs):
        calls.append(tuple(args[1].shape))
        return real_mm(*args, **kwargs)

    run = bench.bare_products(mlp, states, 2)
    torch.mm = counting_mm
    try:
        got = run()
    finally:
        torch.mm = real_mm
    assert calls == [(6, 5), (5, 4), (4, 5), (5, 6)] * 2
    assert torch.equal(got, states @ w1.t() @ w2.t() @ w2 @ w1)


def test_onchip_model_recovers_the_limits_that_made_the_times(tmp_path):
    """onchip_model.py fits (aggregate, per-program) on unsplit rows; rows timed from known
    limits give those limits back, and a row of another kind is reported against them."""
    model = _load("onchip_model")
    rows = []
    for hidden in (1, 2):
        for batch, bm in ((128, 64), (128, 128), (256, 64), (256, 128), (512, 64), (512, 128)):
            row = {"d": 4096, "hidden": hidden, "steps": 30, "batch": batch, "weights": "bf16",
                   "variant": f"triton-graph bm{bm}",
                   "overrides": {"block_m": bm, "block_n": 128, "split_k": 1}}
            row["ms"] = model.predict_ms(row, model.plan_of(row), 6.0e12, 55e9)
            rows.append(row)
    split = {"d": 4096, "hidden": 1, "steps": 30, "batch": 256, "weights": "bf16",
             "variant": "triton-graph split2",
             "overrides": {"block_m": 128, "block_n": 128, "split_k": 2}}
    # a bench run's other programs at the same sizes (cuBLAS, the engine's call, the Gram
    # form) are not Triton tiles: given the default plan, they skewed the fit
    others = [{"d": 4096, "hidden": 1, "steps": 30, "batch": 512, "weights": "bf16",
               "variant": variant, "ms": 0.1}
              for variant in ("torch-graph", "head-ascend", "triton-gram-graph")]
    split["ms"] = 2 * model.predict_ms(split, model.plan_of(split), 6.0e12, 55e9)
    default = {"d": 4096, "hidden": 1, "steps": 30, "batch": 512, "weights": "bf16",
               "variant": "triton-graph default", "ms": 1.0}
    assert model.plan_of(default) == {"block_m": 128, "block_n": 128, "split_k": 1}
    recorded = dict(default, plans={"forward": {"block_m": 64, "block_n": 128, "split_k": 2},
                                    "backward": {"block_m": 64, "block_n": 128, "split_k": 2}})
    assert model.plan_of(recorded) == {"block_m": 64, "block_n": 128, "split_k": 2}
    recorded["plans"]["backward"] = {"block_m": 128, "block_n": 128, "split_k": 1}
    assert model.plan_of(recorded) is None  # one plan per row or none
    assert model.plan_of(dict(default, batch=128))["split_k"] == 2  # calls 5-7's default
    (tmp_path / "sweep.json").write_text(json.dumps({"rows": rows + [split] + others}))
    assert len(model.usable_rows(rows + [split] + others)) == len(rows) + 1
    fitted = model.fit(model.usable_rows(rows + [split] + others))
    assert (fitted["aggregate_tbs"], fitted["per_program_gbs"]) == (6.0, 55)
    assert fitted["median_error"] < 1e-9 and fitted["rows"] == len(rows)
    run = subprocess.run([sys.executable, str(SCRIPT.parent / "onchip_model.py"),
                          str(tmp_path / "sweep.json")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "aggregate 6.0 TB/s, per program 55 GB/s" in run.stdout
    assert "| 1 | 256 | 128x128 | 2 | 128 | split K | 1 | 2.00 |" in run.stdout


def _load(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", SCRIPT.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_contiguous_head_packs_the_hidden_matrices_in_one_buffer():
    import torch

    from vllm_recontrol import ascent
    from vllm_recontrol.ascent import MLPWeights

    bench = _load("bench_kernel")
    weights = [torch.randn(5, 3), torch.randn(4, 5), torch.randn(1, 4)]
    mlp = MLPWeights(weights, [torch.randn(5), torch.randn(4), torch.randn(1)])
    packed, base, nbytes = bench.contiguous_head(ascent, mlp)
    assert nbytes == (15 + 20) * 4 and packed.weights[0].data_ptr() == base
    assert packed.weights[1].data_ptr() == base + 15 * 4  # right behind the first
    assert all(torch.equal(a, b) for a, b in zip(packed.weights, weights))
    assert packed.weights[2] is weights[2] and packed.biases == mlp.biases


def test_l2_window_struct_matches_cuda_h():
    """CUaccessPolicyWindow {void*, size_t, float, enum, enum} inside a 64-byte union."""
    import ctypes

    l2 = _load("l2_window")
    window = l2.AccessPolicyWindow
    assert [getattr(window, f).offset for f in ("base_ptr", "num_bytes", "hitRatio", "hitProp",
                                                "missProp")] == [0, 8, 16, 20, 24]
    assert ctypes.sizeof(window) == 32 and ctypes.sizeof(l2.StreamAttrValue) == 64
    value = l2.window_value(4096, 1 << 20, 0.5)
    assert (value.accessPolicyWindow.num_bytes, value.accessPolicyWindow.hitProp) == (1 << 20, 2)


class _FakeDriver:
    """Records the CUDA driver calls l2_window makes (no GPU here)."""

    def __init__(self, l2=50 << 20, persisting=32 << 20, window=128 << 20):
        self.attrs = {38: l2, 108: persisting, 109: window}
        self.calls = []

    def cuDeviceGet(self, dev, ordinal):
        self.calls.append(("cuDeviceGet", ordinal))
        return 0

    def cuDeviceGetAttribute(self, value, attr, dev):
        value._obj.value = self.attrs[attr]
        return 0

    def cuCtxSetLimit(self, limit, value):
        self.calls.append(("cuCtxSetLimit", limit, value.value))
        return 0

    def cuStreamSetAttribute(self, stream, attr, value):
        window = value._obj.accessPolicyWindow
        self.calls.append(("cuStreamSetAttribute", stream.value, attr, window.base_ptr,
                           window.num_bytes, round(window.hitRatio, 4), window.hitProp,
                           window.missProp))
        return 0

    def cuCtxResetPersistingL2Cache(self):
        self.calls.append(("cuCtxResetPersistingL2Cache",))
        return 0


def test_l2_window_sets_aside_marks_and_releases(monkeypatch):
    """persist() caps the set-aside at the device's maximum and sets the hit ratio to the
    share that fits; release() drops the window, evicts and gives the set-aside back."""
    import types

    import torch

    l2 = _load("l2_window")
    fake = _FakeDriver()
    monkeypatch.setattr(l2, "_driver", lambda: fake)
    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    stream = types.SimpleNamespace(cuda_stream=0xABC, device=torch.device("cuda", 1))
    assert l2.persist(stream, 0x1000, 64 << 20) == 0.5  # 32 MB of a 64 MB head
    assert fake.calls == [("cuDeviceGet", 1), ("cuCtxSetLimit", 6, 32 << 20),
                          ("cuStreamSetAttribute", 0xABC, 1, 0x1000, 64 << 20, 0.5, 2, 1)]
    fake.calls.clear()
    l2.release(stream)
    assert fake.calls == [("cuStreamSetAttribute", 0xABC, 1, None, 0, 0.0, 2, 1),
                          ("cuCtxResetPersistingL2Cache",), ("cuCtxSetLimit", 6, 0)]
    fake.attrs[108] = 0  # no persistence (MIG, old GPU): a clear error, nothing set
    fake.calls.clear()
    with pytest.raises(RuntimeError, match="no L2 persistence"):
        l2.persist(stream, 0x1000, 1 << 20)
    assert [c[0] for c in fake.calls] == ["cuDeviceGet"]


RESOURCES = SCRIPT.parent / "sm90_resources.py"


def test_sm90_resources_compiles_the_plans_offline(tmp_path):
    """The offline register/spill report compiles real sm_90 kernels with Triton's own
    compiler (no GPU): the weight-streaming plan of B = 1 uses 16-row mma.sync tiles, the
    64-row batch-invariant tiles Hopper's wgmma, an evict-last plan's weight loads carry the
    L2 hint, and every launch fits the multiprocessor."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    evict = {"num_stages": 1, "evict_last": 1}
    run = subprocess.run([sys.executable, str(RESOURCES), "--batch", "1", "--overrides",
                          json.dumps(evict), "--json", str(tmp_path / "r.json")], env=env,
                         capture_output=True, text=True, timeout=600)
    if run.returncode != 0 and "ships no cuobjdump" in run.stderr:
        pytest.skip("this Triton has no NVIDIA tools")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    sources = ("default", "overrides " + json.dumps(evict, sort_keys=True), "invariant")
    assert {(r["source"], r["product"]) for r in rows} == {
        (s, p) for s in sources for p in ("fwd", "fwd-last", "bwd-mid", "bwd-update")}
    by_source = {s: [r for r in rows if r["source"] == s] for s in sources}
    assert {r["mma"] for r in by_source["default"]} == {"mma"}
    assert {r["plan"].split()[0] for r in by_source["default"]} == {"16x32x256"}
    assert {r["mma"] for r in by_source["invariant"]} == {"wgmma"}
    # the L2 evict-last hint survives on plain (1-stage) loads, not on the pipelined default
    assert all(r["hinted_loads"] == 0 for r in by_source["default"])
    assert all(r["hinted_loads"] > 0 for r in by_source[sources[1]])
    for r in rows:
        assert 0 < r["registers"] <= 255 and 0 < r["shared_kb"] <= 228, r
    assert "| 1 | default | bwd-update |" in run.stdout


PRECOMPILE = SCRIPT.parent / "precompile.py"


def test_precompiled_cache_is_stable_and_gpu_check_unpacks_it(tmp_path):
    """precompile.py fills a Triton cache through Triton's own JIT (compile, no launch) on a
    machine without a GPU: a second run finds every kernel cached (the keys do not depend on
    anything that changes between runs), and gpu_check.sh unpacks the archive to the recorded
    path and uses it (the device side, minus the GPU)."""
    import triton

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_CACHE_DIR")}
    cache, archive = tmp_path / "cache", tmp_path / "kernels.tgz"
    command = [sys.executable, str(PRECOMPILE), "--out", str(cache), "--archive", str(archive),
               "--phases", "bench", "--limit", "2", "--triton-version", triton.__version__]
    resources = tmp_path / "resources.json"  # the second run's kernels come from the cache
    runs = [subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
            for argv in (command, command + ["--resources", str(resources)])]
    for run in runs:
        if run.returncode != 0 and "no GPU here" in run.stdout + run.stderr:
            pytest.skip("this Triton's JIT needs more of the driver than the stand-in has")
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "2 ascents for bench, 0 failed" in runs[0].stdout
    assert ": 0 new files" in runs[1].stdout and ": 0 new files" not in runs[0].stdout
    usage = json.loads(resources.read_text())  # registers and spills of what was compiled
    assert usage and {r["kernel"] for r in usage} >= {"_ascent_gemm_kernel"}
    for r in usage:
        assert 0 < r["registers"] <= 255 and r["spill_bytes"] >= 0 and r["M"] > 0, r
    assert "| kernel | epilogue | projected | dot | launches | max registers | spilling |" \
        in runs[1].stdout
    manifest = json.loads((cache / "recontrol-precompile.json").read_text())
    assert manifest["path"] == str(cache) and manifest["triton"] == triton.__version__
    files = sorted(p.relative_to(cache) for p in cache.rglob("*") if p.is_file())
    assert any(p.suffix == ".cubin" for p in files) and not any(p.suffix == ".ptx" for p in files)

    import shutil
    shutil.rmtree(cache)
    out = tmp_path / "out"
    check = subprocess.run(["bash", str(SCRIPT.parent / "gpu_check.sh")], env={
        **env, "OUT": str(out), "PHASES": "none", "PYTHON": sys.executable,
        "CACHE_ARCHIVE": str(archive)}, capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-3000:]
    log = (out / "run.log").read_text()
    assert "warm-up processes" not in log  # none ran: no summary with empty counts
    assert f"precompiled Triton cache in {cache}:" in log
    assert "precompiled cache: 0 files added here" in log
    assert sorted(p.relative_to(cache) for p in cache.rglob("*") if p.is_file()) == files


def test_gpu_check_stops_at_once_without_cuda_and_never_reuses_an_earlier_run_s_files(
        tmp_path):
    """Without CUDA every phase used to start and fail alike (12 warm-up processes on the
    device); an earlier run's sweep.json in a reused $OUT was fitted and used as this run's."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the machine without a GPU")
    out = tmp_path / "out"
    out.mkdir()
    (out / "sweep.json").write_text('{"rows": []}')
    (out / "run.log").write_text("an earlier run\n")
    last_sweep = tmp_path / "last-sweep.json"  # kept for a later call's tuned bench rows
    last_sweep.write_text('{"rows": []}')
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    check = subprocess.run(["bash", str(SCRIPT.parent / "gpu_check.sh")], env={
        **env, "OUT": str(out), "PHASES": "sweep bench", "PYTHON": sys.executable,
        "CACHE_ARCHIVE": str(tmp_path / "none.tgz"), "LAST_SWEEP": str(last_sweep)},
        capture_output=True, text=True, timeout=300)
    assert check.returncode == 2, check.stdout[-3000:] + check.stderr[-3000:]
    assert "gpu_check: CUDA is not available here; every phase of 'sweep bench' needs a GPU" \
        in check.stdout
    assert not (out / "sweep.json").exists()
    assert not last_sweep.exists()  # this run's sweep, or none: no tuned rows from before
    log = (out / "run.log").read_text()
    assert "an earlier run" not in log and "warm-up" not in log
    broken = subprocess.run(["bash", str(SCRIPT.parent / "gpu_check.sh")], env={
        **env, "OUT": str(out), "PHASES": "check", "PYTHON": "false"},
        capture_output=True, text=True, timeout=300)
    assert broken.returncode == 2 and "torch and triton do not import with false" in \
        broken.stdout


def test_precompile_compiles_the_bench_phase_gpu_check_will_run():
    """--bench-args is gpu_check.sh's BENCH_ARGS: the launches precompiled are those of the
    variants asked for, projected where the variant projects."""
    code = ("import json, sys; sys.path[:0] = [sys.argv[1]]; import precompile; "
            "print(json.dumps([(s['rows'], s['form'], s['max_norm']) for s in "
            "precompile.bench_launches('bench', '--quick --variants triton-gram-norm-graph "
            "triton-graph --layers 2 --batch 8 256')]))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code, str(PRECOMPILE.parent)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    specs = json.loads(run.stdout.splitlines()[-1])
    assert specs == [[8, "gram", 0.05], [8, "direct", None], [256, "gram", 0.05],
                     [256, "direct", None]]


def test_sweep_summary_names_the_fastest_candidate_per_case():
    bench = _load("bench_kernel")

    def row(batch, variant, ms, floor=1.0):
        return dict(d=4096, hidden=2, steps=30, batch=batch, variant=variant, ms=ms,
                    x_floor=ms / floor)

    rows = [row(128, "triton-graph default", 2.7), row(128, "triton-graph bm128 s4 fix1", 1.8),
            row(128, "triton-graph bm64 s2", 2.9), row(128, "triton-graph default again", 2.5),
            row(256, "triton-graph default", 3.2), row(256, "triton-graph default again", 3.2),
            dict(d=4096, hidden=2, steps=30, batch=256, variant="triton-graph bm128",
                 error="OutOfResources"),
            row(512, "triton-graph bm128 s2", 3.0)]  # no default timing: no line
    table = bench.sweep_summary(rows).splitlines()
    assert len(table) == 3  # header, rule, B = 128 (B = 256 has no timed candidate)
    assert table[2] == "| 4096 | 2 | 30 | 128 | 2.600 | bm128 s4 fix1 | 1.800 | 1.44 | 1.80 |"


def test_controller_check_passes_here_and_fails_on_a_swapped_head():
    """The GPU check's controller case, run on the CPU with the torch backend."""
    import dataclasses

    import torch

    from vllm_recontrol.controller import EditController

    bench = _load("bench_kernel")
    ascent, _ = bench.import_project()
    assert bench.check_controller(torch.device("cpu"), ascent, 3, backend="torch")["ok"]
    original = EditController._ascend
    try:  # every group edited by the default head: the check must notice
        EditController._ascend = lambda self, group, states: original(
            self, type(group)(head="default", rows=group.rows, alpha=group.alpha,
                              steps=group.steps, max_steps=group.max_steps), states)
        assert not bench.check_controller(torch.device("cpu"), ascent, 3, backend="torch")["ok"]
        # the rows' own radii dropped: the check must notice that too
        EditController._ascend = lambda self, group, states: original(
            self, dataclasses.replace(group, radius=None), states)
        assert not bench.check_controller(torch.device("cpu"), ascent, 3, backend="torch")["ok"]
    finally:
        EditController._ascend = original


def test_plans_from_a_sweep_add_a_tuned_row_where_a_candidate_won(tmp_path):
    """--plans-from: the bench times the sweep's fastest plan of a case beside the default,
    only where it beat the mean of the default's two timings by 3 % (noise is not a win)."""
    bench = _load("bench_kernel")
    fast = {"block_m": 128, "block_n": 256, "split_k": 4, "fixup": 1, "tma": 1}
    rows = [  # B 128: a clear win; B 256: within noise of the default; B 512: failed only
        dict(d=64, hidden=1, steps=2, batch=128, variant="triton-graph default", ms=2.0),
        dict(d=64, hidden=1, steps=2, batch=128, variant="triton-graph a", ms=1.9,
             overrides={"split_k": 2}),
        dict(d=64, hidden=1, steps=2, batch=128, variant="triton-graph b", ms=1.5, overrides=fast),
        dict(d=64, hidden=1, steps=2, batch=128, variant="triton-graph default again", ms=2.2),
        dict(d=64, hidden=1, steps=2, batch=256, variant="triton-graph default", ms=3.0),
        dict(d=64, hidden=1, steps=2, batch=256, variant="triton-graph c", ms=2.95,
             overrides={"split_k": 2}),
        dict(d=64, hidden=1, steps=2, batch=512, variant="triton-graph default", ms=3.0),
        dict(d=64, hidden=1, steps=2, batch=512, variant="triton-graph d", error="boom",
             overrides={"split_k": 2}),
    ]
    (tmp_path / "sweep.json").write_text(json.dumps({"rows": rows}))
    args = bench.parse_args(["--variants", "torch-graph", "triton-graph", "--hidden-sizes", "64",
                             "--layers", "1", "--steps", "2", "--batch", "128", "256", "512",
                             "--plans-from", str(tmp_path / "sweep.json")])
    planned = [(t.case.batch, t.label or t.variant, t.overrides) for t in bench.tasks(args)]
    assert planned == [(128, "torch-graph", None), (128, "triton-graph", None),
                       (128, "triton-graph tuned b", fast),
                       (256, "torch-graph", None), (256, "triton-graph", None),
                       (512, "torch-graph", None), (512, "triton-graph", None)]


_COMPILE_ONE_ASCENT = """
import json, sys, torch
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/benchmarks"]
import precompile
with precompile.compile_only(90, 132) as va:
    precompile.ascend(va, 512, [512], 256, wdtype=torch.bfloat16, overrides=json.loads(sys.argv[2]))
"""


@pytest.mark.parametrize("plan,suffix,marker,expected", [
    ({"tma": 1, "warp_specialize": 1}, ".ttgir", "ttg.warp_specialize(", True),
    ({"tma": 1}, ".ttgir", "ttg.warp_specialize(", False),
    ({"tma": 1, "pdl": 1}, ".ptx", "griddepcontrol.wait", True),
    ({"tma": 1}, ".ptx", "griddepcontrol", False),
    ({"tma": 1, "pdl": 1, "split_k": 2}, "_splitk_reduce_kernel.ptx", "griddepcontrol.wait",
     True),
    ({"tma": 1, "split_k": 2}, "_splitk_reduce_kernel.ptx", "griddepcontrol", False),
])
def test_hopper_plan_options_reach_the_compiled_sm90_code(tmp_path, plan, suffix, marker,
                                                          expected):
    """The warp_specialize and pdl plan options reach Triton's compiler: compiled offline for
    sm_90 (no GPU), a 4-warp descriptor-load tile becomes producer/consumer partitions, and a
    pdl launch waits on the previous grid (griddepcontrol); the same plans without the
    options do neither."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    run = subprocess.run([sys.executable, "-c", _COMPILE_ONE_ASCENT, str(SCRIPT.parents[1]),
                          json.dumps(plan)], env=env, capture_output=True, text=True,
                         timeout=600)
    if run.returncode != 0 and "ptxas" in run.stderr:
        pytest.skip("this Triton cannot compile for NVIDIA GPUs here")
    assert run.returncode == 0, run.stderr[-3000:]
    texts = [p.read_text() for p in tmp_path.rglob("*" + suffix)]
    assert len(texts) >= 2  # forward and backward products (or their split-K reduces)
    found = sum(marker in text for text in texts)
    assert (found > 0) == expected, (found, len(texts))


def test_precompile_can_key_the_cache_as_the_devices_triton_build(tmp_path, monkeypatch):
    """Triton hashes its own libtriton into every cache key, and each Python version has its
    own build (the device's Python is 3.12): --key-wheel recomputes the key with that wheel's
    libtriton, so the device finds the kernels compiled here. Another libtriton gives another
    key, the same one the same key, and clearing Triton's cache of the key restores its own."""
    import zipfile

    import triton
    from triton.runtime import cache

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # precompile.py refuses it
    precompile = _load("precompile")
    own = precompile.triton_build_key()
    keys = []
    for name, payload in (("a", b"one build"), ("b", b"one build"), ("c", b"another build")):
        wheel = tmp_path / f"triton-{triton.__version__}-{name}.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr("triton/_C/libtriton.so", payload)
        try:
            keys.append(precompile.use_device_triton_key(wheel))
            assert precompile.triton_build_key() == keys[-1]
        finally:
            cache.triton_key.cache_clear()
    assert precompile.triton_build_key() == own and not hasattr(cache, "open")
    assert keys[0] == keys[1] and len({own, keys[0], keys[2]}) == 3


def test_the_quick_preset_fills_only_what_was_not_given():
    bench = _load("bench_kernel")
    args = bench.parse_args(["--quick", "--steps", "200", "--hidden-sizes", "8192"])
    assert (args.hidden_sizes, args.layers, args.steps) == ([8192], [1, 2], [200])
    assert args.batch == [1, 8, 16, 32, 128, 256, 512]
    args = bench.parse_args(["--quick"])
    assert (args.hidden_sizes, args.layers, args.steps) == ([4096], [1, 2], [30])
    with pytest.raises(SystemExit):  # an abbreviation would slip past the preset's checks
        bench.parse_args(["--quick", "--variant", "triton-graph"])


def test_the_sweep_preset_fills_flag_by_flag_and_bad_arguments_stop_before_timing(
        tmp_path, capsys):
    """--sweep with one size flag ran every default d and step count (360 cases instead of
    the preset's d 4096 at 30 steps); bad sizes were timed, a missing --plans-from ignored,
    and a --json folder that does not exist failed after the first timed row."""
    bench = _load("bench_kernel")
    args = bench.parse_args(["--sweep", "--batch", "256"])
    assert (args.hidden_sizes, args.layers, args.steps, args.batch) == ([4096], [1, 2], [30],
                                                                        [256])
    args = bench.parse_args(["--sweep"])
    assert args.batch == [128, 256, 512]
    for bad, message in ((["--batch", "0"], "--batch: must be a positive integer, got 0"),
                         (["--steps", "-1"], "--steps: must be a positive integer"),
                         (["--device", "foo"], "--device 'foo' is not a torch device"),
                         (["--plans-from", str(tmp_path / "none.json")], "no such file"),
                         (["--json", str(tmp_path / "no" / "x.json")], "does not exist")):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
        assert message in capsys.readouterr().err


def test_head_ascend_rows_name_the_products_the_head_runs_on_the_device():
    """Off CUDA the head's "auto" runs the torch closed form in fp32, not bf16 products."""
    from types import SimpleNamespace

    bench = _load("bench_kernel")
    on = SimpleNamespace(device="cpu", dtype="bf16", torch_dtype="bf16")
    assert bench.variant_dtype("head-ascend", on) == "fp32"
    assert bench.variant_dtype("head-ascend-gram", on) == "fp32"
    assert bench.variant_dtype("triton-graph", on) == "bf16"
    on.device = "cuda"
    assert bench.variant_dtype("head-ascend", on) == "bf16"




_INVARIANCE_SNIPPET = """
import importlib.util, json, sys, torch
spec = importlib.util.spec_from_file_location("bench_kernel", sys.argv[1])
bench = importlib.util.module_from_spec(spec); sys.modules["bench_kernel"] = bench
spec.loader.exec_module(bench)
ascent, va = bench.import_project()
if sys.argv[2] == "ignore-flag":  # the torch backend's slabs switched off, as before the fix
    import vllm_recontrol.value_head as vh
    ascent._slabbed = lambda mlp, s, a, n, r, ws, invariant, gram: (
        s, a, n, r, ascent.AscentWorkspace.allocate(mlp, s.shape[0], gram=gram or None))
    vh.product_rows = lambda rows, *_: rows
[row] = bench.check_batch_invariance(torch.device("cpu"), ascent, va, 5,
                                     cases=((24, [20, 12], "ieee"),))
print(json.dumps(row))
"""


@pytest.mark.parametrize("variant", ["as-is", "ignore-flag"])
def test_batch_invariance_check_covers_the_torch_backend(variant):
    """The GPU check's batch-invariance case on a toy head (interpreter): it passes and
    reports the torch backend, and fails when that backend ignores batch_invariant."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", _INVARIANCE_SNIPPET, str(SCRIPT), variant],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    row = json.loads(run.stdout.strip().splitlines()[-1])
    assert row["same_bits_direct"] and row["same_bits_graphs"]
    assert row["same_bits_torch"] is (variant == "as-is") and row["ok"] is (variant == "as-is")
