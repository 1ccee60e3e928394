#!/usr/bin/env python3
"""Compile the ascent kernels for a CUDA target on a machine without a GPU, into a Triton cache
folder that a GPU run then reads (``TRITON_CACHE_DIR``).

Why: the device is lent for minutes, and ``gpu_check.sh`` spends a good part of them in Triton
compiles (a background warm-up phase, and the check phase's own kernels). Triton's on-disk cache
key is a hash of the kernel source, its specialisation (argument types, 16-byte alignment of
pointers, divisibility of integers by 16, constexprs), the launch options, the Triton version and
the compiler back end, none of which needs the GPU itself. So this script runs
``triton_ascend``'s host code for every launch the GPU run will make, on "meta" tensors (shapes
and alignments without memory), with Triton's driver replaced by one that names the target and
its JIT told to compile without launching. Run it with the Triton version the device has (3.6.0
in the device image; the version is checked) and carry the archive to the device; a launch it
did not foresee compiles there as before.

Triton's cache records its files by absolute path, so the cache must sit at the same path on
both machines: it is built in ``--out`` (default /tmp/triton-sm90) and packed into
``--archive`` (default .triton-sm90.tgz in the repository, ignored by git), which
``gpu_check.sh`` unpacks to the path recorded in it. Only binaries are kept
(``TRITON_STORE_BINARY_ONLY``), to stay within what the device tool carries.

    PYTHONPATH=/path/to/triton-3.6 python benchmarks/precompile.py
    # device: run(..., carry=[".triton-sm90.tgz"]); gpu_check.sh finds and unpacks it
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import sys
import tarfile
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET"):
    sys.exit("precompile.py compiles real kernels: unset TRITON_INTERPRET")

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
MANIFEST = "recontrol-precompile.json"  # what built the cache: gpu_check.sh prints it


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/triton-sm90"),
                   help="Triton cache folder to fill (the same absolute path on the device)")
    p.add_argument("--archive", default=str(ROOT / ".triton-sm90.tgz"),
                   help="tar.gz of the folder, to carry to the device ('' = none)")
    p.add_argument("--arch", type=int, default=90, help="compute capability (90: H100/H200)")
    p.add_argument("--sms", type=int, default=132, help="multiprocessors the plans assume")
    p.add_argument("--triton-version", default="3.6.0",
                   help="refuse to run under another Triton (the cache would not match)")
    p.add_argument("--phases", nargs="+", default=["check", "bench", "sweep", "extra", "grid"],
                   choices=["check", "bench", "sweep", "extra", "grid"],
                   help="gpu_check.sh phases whose launches to compile")
    p.add_argument("--bench-args", default="--quick",
                   help="bench_kernel.py's arguments in the bench phase: what gpu_check.sh "
                        "gets as BENCH_ARGS (default --quick, as there)")
    p.add_argument("--limit", type=int, help="compile only the first N ascents (smoke tests)")
    p.add_argument("--resources", type=Path,
                   help="also write each compiled launch's registers and spills (cuobjdump "
                        "-res-usage of its cubin) with its constexprs, as JSON, and print a "
                        "summary per product kind: a spill found here costs no device time")
    p.add_argument("--key-wheel", type=Path,
                   help="the device's Triton wheel (same version, the device's Python, e.g. "
                        "cp312): cache keys are computed with its libtriton, as the device "
                        "computes them (Triton hashes its own binary into every key)")
    return p.parse_args(argv)


class _TargetOnlyDriver:
    """Stands in for Triton's CUDA driver: names the target, device 0 and a null stream, which
    is all the JIT asks for before it compiles."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def __getattr__(self, name):
        raise AttributeError(f"no GPU here: the precompile driver has no {name!r}")


# What tells one compiled launch from another in a report: its constexprs and launch
# options, and the sizes of the first launch that compiled it.
REPORTED_CONSTANTS = ("M", "N", "K", "PROLOGUE", "EPILOGUE", "PROJECT", "DOT", "ACT_BF16", "BM",
                      "BN", "BK", "FIXUP", "W_K_CONTIGUOUS",
                      "TMA", "WARP_SPECIALIZE", "PDL", "W_EVICT", "num_warps", "num_stages")


@contextlib.contextmanager
def compile_only(arch: int, sms: int, record: list | None = None):
    """Triton's JIT compiles without launching; the kernels module plans for ``sms``
    multiprocessors and accepts meta tensors. ``record`` collects (kernel name, reported
    constexprs, compiled kernel) per launch."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    from kernels import value_ascent as va

    run = JITFunction.run
    saved = (va._device_programs, va._check_backend)
    active = driver._active  # there is no real driver to reset to on this machine

    def compile_instead(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        if record is not None:
            constants = {k: _plain(kwargs[k]) for k in REPORTED_CONSTANTS if k in kwargs}
            record.append((self.fn.__name__, constants, kernel))
        return kernel

    driver.set_active(_TargetOnlyDriver(arch))
    JITFunction.run = compile_instead
    va._device_programs = lambda device: sms
    va._check_backend = lambda device: None
    try:
        yield va
    finally:
        JITFunction.run = run
        va._device_programs, va._check_backend = saved
        driver._active = active


def _plain(value):
    """A constexpr as JSON can hold it (Triton wraps some in ``tl.constexpr``)."""
    value = getattr(value, "value", value)
    return value if isinstance(value, (bool, int, float, str)) or value is None else repr(value)


def resource_report(record: list, path: Path) -> None:
    """Registers and spills of every distinct compiled launch (by cache hash), written to
    ``path`` as JSON, with a summary: the most registers and any spill per kernel kind."""
    from kernels import value_ascent as va
    from sm90_resources import resource_usage

    epilogues = {v.value: n.removeprefix("EPI_").lower() for n, v in vars(va).items()
                 if n.startswith("EPI_")}
    rows, seen = [], set()
    for name, constants, kernel in record:
        if kernel.hash in seen:
            continue
        seen.add(kernel.hash)
        usage = resource_usage(kernel.asm["cubin"])
        rows.append(dict(kernel=name, **constants, registers=usage["REG"],
                         spill_bytes=usage.get("STACK", 0),
                         shared_kb=round(kernel.metadata.shared / 1024, 1), hash=kernel.hash))
    path.write_text(json.dumps(rows, indent=1))
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (row["kernel"].strip("_"), epilogues.get(row.get("EPILOGUE"), row.get("EPILOGUE")),
               row.get("PROJECT"), row.get("DOT"))
        groups.setdefault(key, []).append(row)
    print(f"{len(rows)} distinct launches compiled; registers and spills ({path}):")
    print("| kernel | epilogue | projected | dot | launches | max registers | spilling |")
    print("|---|---|---|---|---|---|---|")
    for key in sorted(groups, key=repr):
        group = groups[key]
        spilling = [r for r in group if r["spill_bytes"]]
        worst = max(spilling, key=lambda r: r["spill_bytes"], default=None)
        spill_text = (f"{len(spilling)} (worst {worst['spill_bytes']} B: BM {worst.get('BM')} "
                      f"BN {worst.get('BN')} BK {worst.get('BK')} TMA {worst.get('TMA')})"
                      if worst else "0")
        print(f"| {' | '.join(str(k) for k in key)} | {len(group)} | "
              f"{max(r['registers'] for r in group)} | {spill_text} |")


def meta_head(d: int, widths: list[int], dtype):
    """An MLPWeights of meta tensors: shapes and dtypes, no memory."""
    import torch

    from vllm_recontrol.ascent import MLPWeights

    sizes = [d, *widths, 1]
    meta = torch.device("meta")
    weights = [torch.empty(o, i, device=meta, dtype=dtype) for i, o in zip(sizes[:-1], sizes[1:])]
    biases = [torch.empty(o, device=meta, dtype=dtype) for o in sizes[1:]]
    gram = torch.empty(widths[0], widths[0], device=meta, dtype=dtype) if widths else None
    return MLPWeights(weights, biases, first_gram=gram)


def ascend(va, d, widths, rows, *, wdtype, state_dtype=None, precision=None, max_norm=None,
           overrides=None, batch_invariant=False, form="direct") -> None:
    """One two-step ascent: every kernel of the plan compiles (steps 0 and 1 share code);
    ``form`` "gram" the Gram-form kernel's (``triton_ascend_gram``)."""
    import torch

    meta = torch.device("meta")
    states = torch.empty(rows, d, device=meta, dtype=state_dtype or torch.float32)
    alpha = torch.empty(rows, device=meta)
    steps = torch.empty(rows, device=meta, dtype=torch.int64)
    if form == "gram":
        va.triton_ascend_gram(meta_head(d, widths, wdtype), states, alpha, steps, 2, max_norm,
                              precision=precision, plan_overrides=overrides,
                              batch_invariant=batch_invariant)
        return
    va.triton_ascend(meta_head(d, widths, wdtype), states, alpha, steps, 2, max_norm,
                     precision=precision, plan_overrides=overrides,
                     batch_invariant=batch_invariant)


def bench_launches(phase: str, bench_args: str = "--quick") -> list[dict]:
    """The Triton launches of one timed phase of gpu_check.sh (its bench_kernel.py args;
    ``bench_args``: the bench phase's, gpu_check.sh's BENCH_ARGS)."""
    import torch

    import bench_kernel as bench
    from vllm_recontrol.ascent_graphs import bucket_rows

    argv = {"bench": shlex.split(bench_args), "sweep": ["--sweep"],
            "extra": ["--hidden-sizes", "2048", "4096", "8192", "--steps", "30",
                      "--variants", "triton-graph", "--layers", "2", "--batch", "1", "32", "256"],
            "grid": ["--variants", "triton-graph"]}[phase]
    args = bench.parse_args(argv)
    out = []
    for task in bench.tasks(args):
        name, case = task.variant, task.case
        if not name.startswith(("triton", "head-ascend")):
            continue
        engine = name.startswith("head-ascend")
        wdtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[
            bench.variant_dtype(name, args) if not engine else "bf16"]
        rows = bucket_rows(case.batch) if engine else case.batch
        out.append(dict(d=case.d, widths=[case.d] * case.hidden, rows=rows, wdtype=wdtype,
                        precision=bench.VARIANT_PRECISION.get(name),
                        overrides=bench.variant_overrides(name, task.overrides),
                        form="gram" if "gram" in name else "direct",
                        # a radius tensor compiles the kernels a scalar radius does
                        max_norm=0.05 if "norm" in name else None))
    return out


def check_launches() -> list[dict]:
    """The launches of bench_kernel.py --check on a GPU: its cases, the batch-invariance rows
    (alone and in batches, both plan kinds) and the engine path's row buckets."""
    import torch

    import bench_kernel as bench
    from vllm_recontrol.ascent_graphs import bucket_rows

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    out = []
    for c in bench.check_cases(torch.device("cuda")):
        wdtype = dtypes[c["wdtype"]]  # the check's states are bf16 beside bf16 weights
        out.append(dict(d=c["d"], widths=c["widths"], rows=c["rows"], wdtype=wdtype,
                        state_dtype=wdtype, precision=c["precision"],
                        max_norm=(0.05 if c.get("max_norm") == bench.PER_ROW  # same kernels
                                  else c.get("max_norm")), overrides=c.get("overrides"),
                        form=c.get("form", "direct")))
    for d, widths, precision in bench.INVARIANCE_CASES:
        wdtype = torch.float32 if precision == "ieee" else torch.bfloat16
        for rows in (1, 15, 40, 130):
            for invariant in (True, False):
                out.append(dict(d=d, widths=widths, rows=rows, wdtype=wdtype,
                                precision=precision, batch_invariant=invariant))
                out.append(dict(d=d, widths=widths, rows=bucket_rows(rows), wdtype=wdtype,
                                precision=precision, batch_invariant=invariant))
    for rows in (16, 32, 64, 128):  # graph cache and warm-up: d 304, buckets up to 70 rows
        out.append(dict(d=304, widths=[264, 136], rows=rows, wdtype=torch.float32,
                        precision="ieee"))
        out.append(dict(d=304, widths=[264, 136], rows=rows, wdtype=torch.bfloat16,
                        precision="bf16"))
        out.append(dict(d=304, widths=[264, 136], rows=rows, wdtype=torch.bfloat16,
                        precision="bf16", form="gram"))
    # the controller's second head: 12-13 rows each, alone and in the 16-row bucket; both
    # heads also projected (every fourth row has its own radius)
    out.append(dict(d=304, widths=[200], rows=16, wdtype=torch.bfloat16, precision="bf16"))
    for widths in ([264, 136], [200]):
        out.append(dict(d=304, widths=widths, rows=16, wdtype=torch.bfloat16, precision="bf16",
                        max_norm=0.05))
        for max_norm in (None, 0.05):  # the controller case again in the Gram form
            out.append(dict(d=304, widths=widths, rows=16, wdtype=torch.bfloat16,
                            precision="bf16", max_norm=max_norm, form="gram"))
    return out


def count_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file())


def ptxas_release(version_text: str) -> str:
    """'release 12.8, V12.8.93' out of ``ptxas --version`` (part of Triton's cache key)."""
    found = re.search(r"release [\d.]+, V[\d.]+", version_text)
    return found.group(0) if found else version_text.strip()


def triton_build_key() -> str:
    """A short hash of Triton's own part of every cache key (its Python sources and
    libtriton): the device run prints its own beside this one, so a cache that misses says
    whether the Triton builds differ (2026-11-27: most precompiled kernels were compiled again
    on the device although version and ptxas matched; the archive had been keyed with the
    cp311 build, the device runs Python 3.12, hence ``--key-wheel``)."""
    import hashlib

    from triton.runtime.cache import triton_key
    return hashlib.sha256(triton_key().encode()).hexdigest()[:16]


def use_device_triton_key(wheel: Path) -> str:
    """Make Triton's cache keys those of another build of the same version: ``triton_key()``
    hashes Triton's Python sources (the same in every wheel of a version) and its compiled
    libtriton (one per Python version), so its computation is rerun reading libtriton from
    ``wheel``. The kernels compiled here are the same (same compiler code and ptxas); only
    the keys under which the device looks them up differ. Returns the new key's hash."""
    import zipfile

    from triton.runtime import cache

    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist()
                 if n.startswith("triton/_C/libtriton.") and n.endswith(".so")]
        if len(names) != 1:
            raise SystemExit(f"{wheel}: expected one triton/_C/libtriton*.so, found {names}")

        def open_device_build(path, *args, **kwargs):
            if Path(path).name.startswith("libtriton."):
                return archive.open(names[0])
            return open(path, *args, **kwargs)

        cache.triton_key.cache_clear()
        cache.open = open_device_build  # shadows the builtin inside triton_key only
        try:
            cache.triton_key()  # computed once and kept by its lru_cache
        finally:
            del cache.open
    return triton_build_key()


def main(argv=None) -> int:
    args = parse_args(argv)
    import triton

    if triton.__version__ != args.triton_version:
        sys.exit(f"Triton {triton.__version__} is importable, the device has "
                 f"{args.triton_version}: its cache keys would not match (put that version first "
                 f"on PYTHONPATH, or pass --triton-version)")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["TRITON_CACHE_DIR"] = str(args.out)
    from triton import knobs
    knobs.cache.dir = str(args.out)  # in case Triton read the variable already
    knobs.compilation.store_binary_only = True

    if args.key_wheel:
        wheel_version = args.key_wheel.name.split("-")[1]
        if wheel_version != triton.__version__:
            sys.exit(f"{args.key_wheel.name} is Triton {wheel_version}, this is {triton.__version__}")
        print(f"cache keys with {args.key_wheel.name}'s libtriton: triton_key "
              f"{use_device_triton_key(args.key_wheel)}", flush=True)
    launches = []
    for phase in args.phases:
        launches += (check_launches() if phase == "check"
                     else bench_launches(phase, args.bench_args))
    unique = {repr(sorted((k, repr(v)) for k, v in spec.items())): spec for spec in launches}
    specs = list(unique.values())[:args.limit]
    before = count_files(args.out)
    started = time.perf_counter()
    failed = 0
    record = [] if args.resources else None
    with compile_only(args.arch, args.sms, record) as va:
        for i, spec in enumerate(specs):
            try:
                ascend(va, **spec)
            except Exception as exc:  # one bad launch must not cost the others
                failed += 1
                print(f"failed: {spec}: {type(exc).__name__}: {exc}", flush=True)
            if (i + 1) % 50 == 0:
                print(f"{i + 1}/{len(specs)} ascents, {time.perf_counter() - started:.0f} s",
                      flush=True)
    after = count_files(args.out)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file()) / 2**20
    from triton.backends.nvidia.compiler import get_ptxas_version
    manifest = dict(triton=triton.__version__, ptxas=ptxas_release(get_ptxas_version(args.arch)),
                    triton_key=triton_build_key(),
                    key_wheel=args.key_wheel.name if args.key_wheel else None,
                    arch=args.arch, sms=args.sms, phases=args.phases, path=str(args.out),
                    kernels=sum(1 for _ in args.out.rglob("*.cubin")))
    (args.out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if record is not None:
        resource_report(record, args.resources)
    print(f"Triton {triton.__version__}, sm_{args.arch}: {len(specs)} ascents for "
          f"{' '.join(args.phases)}, {failed} failed; cache {args.out}: {after - before} new "
          f"files, {after} in all, {size:.1f} MiB, {time.perf_counter() - started:.0f} s")
    if args.archive:
        with tarfile.open(args.archive, "w:gz") as tar:
            tar.add(args.out, arcname=".")
        print(f"archive {args.archive}: {Path(args.archive).stat().st_size / 2**20:.1f} MiB")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
