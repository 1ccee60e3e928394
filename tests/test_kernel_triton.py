"""The Triton ascent kernel against an independent float64 reference, in Triton's interpreter.

How Triton (3.9) reads TRITON_INTERPRET: at decoration time. ``@triton.jit`` consults
``triton.knobs.runtime.interpret`` (the environment) and returns an interpreted or a compiled
function for good. That holds for Triton's own library too (``tl.zeros``, ``tl.sum``, ... are
``@jit`` functions decorated when triton is first imported), so setting the variable after
triton was imported does not help, even if the kernel module is re-imported. Hence: the
variable is set at the very top, before anything here imports triton; if triton was already
imported in compiled mode by an earlier test module, the in-process tests are skipped and one
test runs this file again in a fresh interpreter with TRITON_INTERPRET=1 (its failures fail
that test). The variable is restored as soon as triton is imported (every xdist worker
imports this module when it collects) and set again only while the ``kernels`` fixture
imports the kernels, whose module is put back as it was when the module's tests end; note
that once triton was imported under the interpreter, it stays so for the whole process.

Inputs are fresh random draws every run; the seed is in every failure message, and
RECONTROL_TEST_SEED=<n> replays one. Tolerances follow the device METHOD note: fp32 products
land far under 1e-3 of the float64 reference (we ask 1e-4; seen: under 2e-7). The kernel's
bf16 mode is compared with a float64 reference that rounds the same operands to bf16 (the
mode's documented contract), within 1e-3 (seen: under 1e-7; truncating instead of rounding to
nearest gives about 3e-3). The gradient of a ReLU net is
piecewise constant, so a unit whose pre-activation is within rounding distance of 0 may take
the other side in the kernel than in the reference and change that row's gradient by a
large step; rows whose reference trajectory comes that close to a kink are left out of the
norm comparison (they still must be finite), and draws are repeated until most rows count.
"""

from __future__ import annotations

import math
import os

_PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this module

import importlib  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

# True when triton itself was first imported under the interpreter (see the module doc).
IN_PROCESS = type(triton.language.standard.zeros).__name__ == "InterpretedFunction"
in_process = pytest.mark.skipif(
    not IN_PROCESS, reason="triton was imported before TRITON_INTERPRET=1; see test_in_subprocess")

from vllm_recontrol.ascent import MLPWeights  # noqa: E402
from vllm_recontrol.ascent import with_first_gram  # noqa: E402
from vllm_recontrol.kernels.reference import gram_reference_ascent, reference_ascent  # noqa: E402


def _restore_interpret_variable() -> None:
    if _PREVIOUS_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREVIOUS_INTERPRET


# Back as it was once triton is imported: every xdist worker imports this module when it
# collects, and the variable left set made the others' later imports of the kernel module
# interpreted (test_backends then found Triton runnable on the CPU). The kernels fixture
# sets it again while it imports the kernels.
_restore_interpret_variable()

FP32_TOL = 1e-4          # fp32 products vs float64 (METHOD: far under 1e-3)
BF16_EMULATED_TOL = 1e-3  # bf16 products vs float64 with the same bf16 operand rounding
DIM, WIDTHS = 40, [24, 17, 20]  # not multiples of the 16/32-wide blocks


KERNEL_MODULE = "vllm_recontrol.kernels.value_ascent"


@pytest.fixture(scope="module")
def kernels():
    """The kernel module with interpreted kernels (re-imported if an earlier import compiled
    them while triton's own library is interpreted). Afterwards the variable and the
    process's kernel module are as they were: later tests in this worker that import the
    kernels get them as the environment says, not interpreted."""
    if not IN_PROCESS:
        pytest.skip("triton was imported before TRITON_INTERPRET=1; see test_in_subprocess")
    package = sys.modules["vllm_recontrol.kernels"]
    earlier = sys.modules.get(KERNEL_MODULE)
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import vllm_recontrol.kernels.value_ascent as va
        if type(va._ascent_gemm_kernel).__name__ != "InterpretedFunction":
            va = importlib.reload(va)  # the same module object, its kernels interpreted
        assert type(va._ascent_gemm_kernel).__name__ == "InterpretedFunction"
        yield va
    finally:
        _restore_interpret_variable()
        if earlier is None:
            sys.modules.pop(KERNEL_MODULE, None)
            if hasattr(package, "value_ascent"):
                delattr(package, "value_ascent")
        else:
            importlib.reload(earlier)  # compiled again, as before this module


@pytest.fixture
def seed():
    return int(os.environ.get("RECONTROL_TEST_SEED", random.SystemRandom().randrange(2**31)))


# ----------------------------------------------------------------------------- inputs
def _draw(seed, rows, widths, weight_dtype=torch.float32, state_dtype=torch.float32):
    """A random head and batch: normal weights (variance 1/fan-in), some rows with steps 0 or
    alpha 0, steps mixed below and at the iteration count."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [DIM, *widths, 1]
    weights = [(torch.randn(o, i, generator=gen) / i ** 0.5).to(weight_dtype)
               for i, o in zip(sizes[:-1], sizes[1:])]
    biases = [(0.3 * torch.randn(o, generator=gen)).to(weight_dtype) for o in sizes[1:]]
    states = torch.randn(rows, DIM, generator=gen).to(state_dtype)
    alpha = 0.5 + 1.5 * torch.rand(rows, generator=gen)
    steps = torch.randint(1, 4, (rows,), generator=gen)
    if rows >= 3:
        steps[0] = 0      # never moves
        alpha[1] = 0.0    # moves by nothing
        steps[2] = 3      # runs to the end
    return MLPWeights(weights, biases), states, alpha, steps


def _draw_clean(seed, rows, widths, num_iterations, max_norm=None, emulate_bf16=False,
                margin=1e-4, **dtypes):
    """Draw until at least half of the moving rows (and at least one) are clean."""
    for attempt in range(50):
        mlp, states, alpha, steps = _draw(seed + attempt, rows, widths, **dtypes)
        ref, clean = reference_ascent(mlp.weights, mlp.biases, states, alpha, steps,
                                      num_iterations, max_norm, emulate_bf16, margin)
        moving = (steps > 0) & (alpha != 0)
        if (clean & moving).sum() >= max(1, int(moving.sum()) // 2):
            return mlp, states, alpha, steps, ref, clean, seed + attempt
    raise AssertionError(f"no well-conditioned draw from seed {seed}")


def _run(kernels, mlp, states, alpha, steps, num_iterations, max_norm=None, **kwargs):
    """The kernel with its output and scratch poisoned with NaN before the call."""
    out = torch.full((states.shape[0], states.shape[1]), float("nan"))
    u = kernels.triton_ascend(mlp, states, alpha, steps, num_iterations, max_norm, out=out,
                              poison_scratch=True, **kwargs)
    assert u is out
    return u


def _check(u, ref, clean, steps, alpha, tol, seed, what):
    """Every element written and finite, idle rows exactly 0, clean rows within ``tol``."""
    assert torch.isfinite(u).all(), f"{what}: non-finite or unwritten output (seed {seed})"
    idle = (steps == 0) | (alpha == 0)
    assert torch.equal(u[idle], torch.zeros_like(u[idle])), f"{what}: idle row moved (seed {seed})"
    rows = clean & ~idle
    err = ((u[rows].double() - ref[rows]).norm() / ref[rows].norm()).item()
    assert err < tol, f"{what}: relative error {err:.3g} >= {tol} on {int(rows.sum())} rows (seed {seed})"


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("hidden", [1, 2, 3])
def test_matches_float64_reference(kernels, seed, hidden):
    mlp, states, alpha, steps, ref, clean, seed = _draw_clean(seed, 6, WIDTHS[:hidden], 3)
    u = _run(kernels, mlp, states, alpha, steps, 3)
    _check(u, ref, clean, steps, alpha, FP32_TOL, seed, f"fp32, {hidden} hidden")


def test_batch_of_one_with_fp16_states(kernels, seed):
    mlp, states, alpha, steps, ref, clean, seed = _draw_clean(seed, 1, WIDTHS[:2], 2,
                                                              state_dtype=torch.float16)
    u = _run(kernels, mlp, states, alpha, steps, 2)
    _check(u, ref, clean, steps, alpha, FP32_TOL, seed, "B = 1, fp16 states")


@pytest.mark.parametrize("hidden", [1, 2])
def test_max_norm_projection(kernels, seed, hidden):
    # a bound below most rows' unprojected norm, so that the projection acts on most steps
    mlp, states, alpha, steps, free, _, seed = _draw_clean(seed, 6, WIDTHS[:hidden], 3)
    max_norm = 0.5 * free.norm(dim=1).max().item()
    ref, clean = reference_ascent(mlp.weights, mlp.biases, states, alpha, steps, 3, max_norm)
    u = _run(kernels, mlp, states, alpha, steps, 3, max_norm)
    _check(u, ref, clean, steps, alpha, FP32_TOL, seed, "max_norm")
    assert (u.norm(dim=1) <= max_norm * (1 + 1e-5)).all(), f"norm above the bound (seed {seed})"


@pytest.mark.parametrize("form", ["direct", "gram"])
def test_a_huge_alpha_under_max_norm_lands_on_the_ball(kernels, seed, form):
    """||u||^2 overflows float32 from ||u|| ~ 1.8e19: the factor radius / inf was 0 and the
    edit vanished. With alpha = 1e30 every moving row ends on its ball, as in float64."""
    mlp, states, alpha, steps, _, _, seed = _draw_clean(seed, 6, WIDTHS[:2], 3)
    alpha = torch.where(alpha != 0, torch.full_like(alpha, 1e30), alpha)
    radius = torch.tensor([0.5, 2.0, 0.5, math.inf, 1.0, 0.25])
    ref, clean = reference_ascent(mlp.weights, mlp.biases, states, alpha, steps, 3, radius)
    run = _run if form == "direct" else _run_gram
    u = run(kernels, mlp, states, alpha, steps, 3, max_norm=radius)
    capped = torch.isfinite(radius)
    _check(u[capped], ref[capped], clean[capped], steps[capped], alpha[capped], FP32_TOL, seed,
           f"{form} form, alpha 1e30")
    moved = capped & (steps > 0) & (alpha != 0)
    torch.testing.assert_close(u[moved].norm(dim=1), radius[moved], rtol=1e-5, atol=0,
                               msg=f"{form} form: off the ball (seed {seed})")


@pytest.mark.parametrize("precision", ["ieee", "bf16"])
def test_per_row_max_norm(kernels, seed, precision):
    """One radius per row (inf: none): capped rows match the float64 reference projected
    onto their own radius, and uncapped rows are the same bits as in an unprojected run,
    so a request without a cap is not changed by a capped one in its batch."""
    bf16 = precision == "bf16"
    mlp, states, alpha, steps, free, _, seed = _draw_clean(
        seed, 6, WIDTHS[:2], 3, emulate_bf16=bf16, margin=2e-3 if bf16 else 1e-4,
        weight_dtype=torch.bfloat16 if bf16 else torch.float32)
    radius = free.norm(dim=1).float() * torch.tensor([1, 0.5, 1, 0.3, 1, 0.6])
    radius[[0, 2, 4]] = float("inf")
    ref, clean = reference_ascent(mlp.weights, mlp.biases, states, alpha, steps, 3,
                                  radius, emulate_bf16=bf16)
    u = _run(kernels, mlp, states, alpha, steps, 3, radius, precision=precision)
    _check(u, ref, clean, steps, alpha, BF16_EMULATED_TOL if bf16 else FP32_TOL, seed,
           "per-row")
    capped = torch.isfinite(radius)
    assert (u[capped].norm(dim=1) <= radius[capped] * (1 + 1e-5)).all(), f"seed {seed}"
    plain = _run(kernels, mlp, states, alpha, steps, 3, None, precision=precision)
    assert torch.equal(u[~capped], plain[~capped]), f"uncapped rows changed (seed {seed})"


def test_bf16_states_and_weights_with_fp32_products(kernels, seed):
    mlp, states, alpha, steps, ref, clean, seed = _draw_clean(
        seed, 5, WIDTHS[:2], 3, weight_dtype=torch.bfloat16, state_dtype=torch.bfloat16)
    u = _run(kernels, mlp, states, alpha, steps, 3, precision="ieee")
    _check(u, ref, clean, steps, alpha, FP32_TOL, seed, "bf16 inputs, fp32 products")


@pytest.mark.parametrize("hidden", [1, 2, 3])
def test_bf16_products_match_rounded_reference(kernels, seed, hidden):
    # the default for bf16 weights; the reference rounds the same operands to bf16
    mlp, states, alpha, steps, ref, clean, seed = _draw_clean(
        seed, 5, WIDTHS[:hidden], 3, emulate_bf16=True, margin=2e-3,
        weight_dtype=torch.bfloat16, state_dtype=torch.bfloat16)
    u = _run(kernels, mlp, states, alpha, steps, 3)
    _check(u, ref, clean, steps, alpha, BF16_EMULATED_TOL, seed, f"bf16 products, {hidden} hidden")


@pytest.mark.parametrize("hidden,max_norm", [(2, None), (3, 0.5)])
def test_split_k_and_multiple_row_tiles(kernels, seed, hidden, max_norm):
    # K split in two (partials reduced by the second kernel) and 2 row tiles of 16
    mlp, states, alpha, steps, ref, clean, seed = _draw_clean(seed, 19, WIDTHS[:hidden], 3,
                                                              max_norm=max_norm)
    u = _run(kernels, mlp, states, alpha, steps, 3, max_norm,
             plan_overrides={"split_k": 2, "block_k": 16})
    _check(u, ref, clean, steps, alpha, FP32_TOL, seed, f"split K, {hidden} hidden")


SPLIT_PLAN = {"split_k": 3, "block_k": 16, "block_n": 32}
# 32-row product tiles: the reduce kernel runs 16-row programs (REDUCE_BLOCK_M) under them
TALL_SPLIT_PLAN = {"split_k": 3, "block_k": 16, "block_m": 32, "block_n": 16}


@pytest.mark.parametrize("hidden,max_norm,precision,plan", [
    (1, None, "ieee", SPLIT_PLAN), (2, None, "bf16", SPLIT_PLAN), (3, 0.5, "ieee", SPLIT_PLAN),
    (2, None, "ieee", TALL_SPLIT_PLAN), (2, 0.5, "ieee", TALL_SPLIT_PLAN)])
def test_split_k_fixup_equals_the_reduce_kernel(kernels, seed, hidden, max_norm, precision,
                                                plan):
    """The in-place split-K fix-up (last split adds the partials) gives the reduce kernel's
    bits, with 3 uneven splits, 2 row tiles and 32-column tiles (finished 16 columns at a
    time, but whole under max_norm), every epilogue kind included; its counters are left at
    zero for the next call. Under 32-row product tiles the reduce's programs are smaller
    than the tiles the fix-up finishes (also with max_norm's per-row sums of squares)."""
    assert plan is SPLIT_PLAN or kernels.REDUCE_BLOCK_M < plan["block_m"]
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    mlp, states, alpha, steps = _draw(seed, 19, WIDTHS[:hidden], weight_dtype=dtype)
    reduce = _run(kernels, mlp, states, alpha, steps, 3, max_norm, plan_overrides=plan)
    fixup = _run(kernels, mlp, states, alpha, steps, 3, max_norm,
                 plan_overrides={**plan, "fixup": 1})
    assert torch.isfinite(fixup).all() and torch.isfinite(reduce).all(), \
        f"unwritten output (seed {seed})"
    assert torch.equal(fixup, reduce), f"fix-up differs from the reduce kernel (seed {seed})"


def test_evict_last_plan_changes_no_bits(kernels, seed):
    """The L2 evict-last hint on the weight loads (a plan option for heads that fit in L2)
    is a cache hint only: the same bits as the default plan, with and without split K."""
    mlp, states, alpha, steps = _draw(seed, 7, WIDTHS[:2], weight_dtype=torch.bfloat16)
    for plan in ({}, {"split_k": 3, "block_k": 16, "fixup": 1}):
        plain = _run(kernels, mlp, states, alpha, steps, 3, plan_overrides=plan or None)
        hinted = _run(kernels, mlp, states, alpha, steps, 3,
                      plan_overrides={**plan, "num_stages": 1, "evict_last": 1})
        assert torch.isfinite(hinted).all() and torch.equal(hinted, plain), (seed, plan)


@pytest.mark.parametrize("widths,described", [([24, 40], 4), ([24, 17], 2)])
def test_tma_plan_gives_the_plain_loads_bits(kernels, seed, monkeypatch, widths, described):
    """Tiles loaded through tensor descriptors (Hopper's bulk copies; zero padding past the
    edges instead of masks) give the plain loads' bits and the bf16 reference's values, with
    and without split K; products whose rows are not a multiple of 16 bytes (width 17) keep
    plain loads. Descriptors are built once per product and ascent, not per launch."""
    built = []
    make = kernels._descriptors
    monkeypatch.setattr(kernels, "_descriptors", lambda p: built.append(p) or make(p))
    mlp, states, alpha, steps, ref, clean, seed = _draw_clean(
        seed, 19, widths, 3, emulate_bf16=True, margin=2e-3, weight_dtype=torch.bfloat16)
    for plan in ({}, {"split_k": 3, "block_k": 16, "fixup": 1}, {"split_k": 2, "block_k": 16}):
        built.clear()
        plain = _run(kernels, mlp, states, alpha, steps, 3, plan_overrides=plan or None)
        tma = _run(kernels, mlp, states, alpha, steps, 3, plan_overrides={**plan, "tma": 1})
        assert len(built) == described, (seed, plan, len(built))
        assert torch.isfinite(tma).all() and torch.equal(tma, plain), (seed, plan)
        _check(tma, ref, clean, steps, alpha, BF16_EMULATED_TOL, seed, f"tma {plan}")


def test_tma_plan_under_max_norm_keeps_plain_loads_where_it_must(kernels, seed, monkeypatch):
    """Under max_norm the first product builds its left operand from s and u, so it keeps
    plain loads while the others use descriptors; the result is the plain plan's bits."""
    built = []
    make = kernels._descriptors
    monkeypatch.setattr(kernels, "_descriptors", lambda p: built.append(p) or make(p))
    mlp, states, alpha, steps = _draw(seed, 19, [24, 40], weight_dtype=torch.bfloat16)
    plain = _run(kernels, mlp, states, alpha, steps, 3, 0.5)
    tma = _run(kernels, mlp, states, alpha, steps, 3, 0.5, plan_overrides={"tma": 1})
    assert len(built) == 3, (seed, len(built))  # 4 products, the first from s and u
    assert torch.isfinite(tma).all() and torch.equal(tma, plain), seed


def test_finished_rows_stop_and_results_are_deterministic(kernels, seed):
    mlp, states, alpha, steps, *_ = _draw(seed, 6, WIDTHS[:2])
    once = _run(kernels, mlp, states, alpha, steps, 1, plan_overrides={"split_k": 2, "block_k": 16})
    thrice = _run(kernels, mlp, states, alpha, steps, 3, plan_overrides={"split_k": 2, "block_k": 16})
    again = _run(kernels, mlp, states, alpha, steps, 3, plan_overrides={"split_k": 2, "block_k": 16})
    assert torch.equal(thrice, again), f"two runs differ (seed {seed})"
    done = steps <= 1
    assert torch.equal(thrice[done], once[done]), f"a finished row kept moving (seed {seed})"


@pytest.mark.parametrize("form", ["direct", "gram"])
@pytest.mark.parametrize("precision", ["ieee", "bf16"])
def test_projected_rows_keep_their_bits_whatever_the_batchs_step_count(kernels, seed, form,
                                                                       precision):
    """Under max_norm a row that finished is never projected again: its edit is the same
    bits whether its batch runs 3 iterations or 7 (one radius and per-row radii), and the
    same as the torch path's within fp32 (each row's last step projected the same way)."""
    from vllm_recontrol.ascent import ascend_float32, ascend_gram_float32

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    mlp, states, alpha, steps, *_ = _draw(seed, 7, WIDTHS[:2], weight_dtype=dtype)
    alpha = alpha * 4  # steps that overshoot the radius
    run = _run_gram if form == "gram" else _run
    exact = ascend_gram_float32 if form == "gram" else ascend_float32
    for radius in (0.2, torch.tensor([0.2, 0.1, float("inf"), 0.3, 0.05, 0.2, 1.0])):
        three = run(kernels, mlp, states, alpha, steps, 3, max_norm=radius, precision=precision)
        seven = run(kernels, mlp, states, alpha, steps, 7, max_norm=radius, precision=precision)
        assert torch.equal(three, seven), f"{form}: a finished row moved (seed {seed})"
        if precision == "ieee":
            gram = with_first_gram(mlp) if form == "gram" else mlp
            torch.testing.assert_close(three, exact(gram, states, alpha, steps, 7, radius),
                                       rtol=1e-4, atol=1e-6, msg=f"{form} (seed {seed})")


def test_zero_iterations_and_empty_batch(kernels, seed):
    mlp, states, alpha, steps, *_ = _draw(seed, 4, WIDTHS[:1])
    assert torch.equal(_run(kernels, mlp, states, alpha, steps, 0), torch.zeros_like(states))
    empty = kernels.triton_ascend(mlp, states[:0], alpha[:0], steps[:0], 3)
    assert empty.shape == (0, DIM)


@pytest.mark.parametrize("widths", [[], [24, 17, 20, 9]])
def test_rejects_unsupported_depth(kernels, seed, widths):
    mlp, states, alpha, steps, *_ = _draw(seed, 3, widths)
    with pytest.raises(ValueError, match="1 to 3 hidden layers"):
        kernels.triton_ascend(mlp, states, alpha, steps, 2)


def test_rejects_bad_arguments(kernels, seed):
    mlp, states, alpha, steps, *_ = _draw(seed, 3, WIDTHS[:1])
    with pytest.raises(ValueError, match="bfloat16 weight"):
        kernels.triton_ascend(mlp, states, alpha, steps, 2, precision="bf16")
    with pytest.raises(ValueError, match="states must be"):
        kernels.triton_ascend(mlp, states[:, :-1], alpha, steps, 2)
    with pytest.raises(ValueError, match="max_norm"):
        kernels.triton_ascend(mlp, states, alpha, steps, 2, max_norm=0.0)


def test_small_batch_plans_fill_the_chip(kernels):
    # pure host logic: the decode-size plans give every multiprocessor work, splits tile K
    for M in (1, 8, 16, 32, 64):
        for N, K in ((4096, 4096), (2048, 8192), (8192, 2048), (1024, 4096)):
            for k_contig in (True, False):
                plan = kernels.plan_gemm(M, N, K, w_k_contiguous=k_contig, weight_bytes=2,
                                         precision="bf16", n_programs=132, interpret=False)
                splits = plan.splits(K)
                programs = -(-N // plan.block_n) * -(-M // plan.block_m) * splits
                assert programs >= 0.75 * 132 or splits >= K // (2 * plan.block_k), plan
                assert plan.k_split(K) % plan.block_k == 0 and splits * plan.k_split(K) >= K
                assert (splits - 1) * plan.k_split(K) < K, plan


def test_exact_products_of_bf16_weights_use_shallow_k_tiles(kernels):
    # compiled for sm_90, exact (FMA) products of bf16 weights spilled registers at 128- and
    # 256-deep tiles (benchmarks/results/kernel-h100.md); fp32 weights keep 128
    def depth(weight_bytes, precision):
        return kernels.plan_gemm(1, 4096, 4096, w_k_contiguous=True, weight_bytes=weight_bytes,
                                 precision=precision, n_programs=132, interpret=False).block_k
    assert depth(2, "ieee") == 64 and depth(4, "ieee") == 128
    assert depth(2, "bf16") == 256 and depth(4, "tf32") == 128  # the H100-tuned plans


def test_batch_invariant_plans_ignore_the_row_count(kernels):
    for precision in ("ieee", "tf32", "bf16"):
        for N, K in ((4096, 4096), (2048, 8192), (300, 257)):
            for k_contig in (True, False):
                plans = {kernels.plan_gemm(M, N, K, w_k_contiguous=k_contig, weight_bytes=2,
                                           precision=precision, n_programs=132,
                                           interpret=interpret, batch_invariant=True)
                         for M in (1, 5, 16, 64, 130, 512) for interpret in (False, True)}
                assert len(plans) == 1, (precision, N, K, plans)
    with pytest.raises(ValueError, match="exclude each other"):
        kernels.plan_gemm(4, 64, 64, w_k_contiguous=True, weight_bytes=4, precision="ieee",
                          n_programs=4, interpret=True, overrides={"split_k": 2},
                          batch_invariant=True)


@pytest.mark.parametrize("precision", ["ieee", "bf16"])
def test_batch_invariant_rows_get_the_same_bits_in_any_batch(kernels, seed, precision,
                                                           monkeypatch):
    """With batch_invariant, row r's u is bit-identical alone, in a batch of 7 and in one of
    70 (two 64-row tiles), whatever the other rows hold; and it is the ascent (fp32 case
    checked against the float64 reference). The launches really use the invariant plan
    (under the interpreter the default plans are fixed too, so that is checked apart)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    mlp, states, alpha, steps, ref, clean, seed = _draw_clean(seed, 70, WIDTHS[:2], 3,
                                                              weight_dtype=dtype)
    plans = []
    plan_gemm = kernels.plan_gemm
    monkeypatch.setattr(kernels, "plan_gemm",
                        lambda *a, **kw: plans.append(plan_gemm(*a, **kw)) or plans[-1])
    full = _run(kernels, mlp, states, alpha, steps, 3, batch_invariant=True)
    assert plans and all(p.block_m >= 32 for p in plans), plans  # not the interpreter's 16x16
    if precision == "ieee":
        _check(full, ref, clean, steps, alpha, FP32_TOL, seed, "batch-invariant plan")
    for rows in ([2], [66, 2, 40, 3, 0, 1, 69]):
        part = _run(kernels, mlp, states[rows], alpha[rows], steps[rows], 3, batch_invariant=True)
        assert torch.equal(part, full[rows]), f"rows {rows} changed with the batch (seed {seed})"


def test_cuda_tensors_are_refused_under_the_interpreter(kernels, monkeypatch):
    """TRITON_INTERPRET=1 left set on a GPU machine: the interpreter would take CUDA tensors
    and multiply their bf16 operands as raw integers (finite garbage edits). The kernel
    refuses them, naming the variable, and "auto" picks torch there (no GPU needed: the
    device check runs before any tensor is touched; CUDA's presence is stubbed)."""
    from vllm_recontrol import kernels as package
    from vllm_recontrol.backends import BACKEND_ENV, choose_backend

    with pytest.raises(RuntimeError, match="Triton's interpreter.*unset TRITON_INTERPRET"):
        kernels._check_backend(torch.device("cuda", 0))
    kernels._check_backend(torch.device("cpu"))  # what the interpreter is for
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert package.kernels_interpreted()
    assert not package.triton_available("cuda") and package.triton_available("cpu")
    assert choose_backend("auto", torch.device("cuda", 0), 2) == "torch"
    with pytest.raises(ValueError, match="cannot run here.*TRITON_INTERPRET unset"):
        choose_backend("triton", torch.device("cuda", 0), 2)


def test_kernels_launch_inside_the_states_device_context(kernels, seed, monkeypatch):
    """Triton launches on the current CUDA device, not the tensors': both ascents run their
    launches inside ``launch_device(states.device)``, which on CUDA makes the states' device
    current (a second GPU cannot be tried here: the context is recorded on CPU instead)."""
    import contextlib

    guard = kernels.launch_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(kernels.launch_device(torch.device("cpu")), contextlib.nullcontext)

    entered, launches = [], []

    @contextlib.contextmanager
    def recording(device):
        entered.append(device)
        yield
        entered.append(None)

    launch = kernels._launch

    def checked_launch(p, ctx, step):
        launches.append(entered[-1])  # the device whose context is open, None if none
        launch(p, ctx, step)

    monkeypatch.setattr(kernels, "launch_device", recording)
    monkeypatch.setattr(kernels, "_launch", checked_launch)
    mlp, states, alpha, steps = _draw(seed, 5, [24, 17])
    kernels.triton_ascend(mlp, states, alpha, steps, 2)
    kernels.triton_ascend_gram(with_first_gram(mlp), states, alpha, steps, 2)
    assert entered == [states.device, None] * 2
    assert launches and all(device == states.device for device in launches)


def test_row_buckets():
    from vllm_recontrol.ascent_graphs import bucket_rows
    assert [bucket_rows(r) for r in (1, 16, 17, 32, 33, 64, 65, 128, 129, 256, 300)] == \
        [16, 16, 32, 32, 64, 64, 128, 128, 192, 256, 320]
    with pytest.raises(ValueError):
        bucket_rows(0)


def test_bucketed_runner_matches_direct_calls(kernels, seed):
    """The graph runner's padding and static buffers (without capture, which needs CUDA):
    each batch gets exactly the rows' own answer, whatever ran through the buffers before."""
    from vllm_recontrol.ascent_graphs import AscentGraphs

    runner = AscentGraphs(capture=False)
    mlp, states, alpha, steps = _draw(seed, 70, [24, 17])
    # shrinking batches leave stale rows in the shared buffers; 70 rows grows them (bucket 128)
    radii = torch.linspace(0.1, 1.0, 70)
    radii[::3] = float("inf")
    # each kind of radius (none, one, one per row) after a larger and after a smaller batch
    for rows, max_norm in ((40, radii[:40]), (3, None), (70, 0.4), (1, radii[:1]), (40, None),
                           (3, radii[:3])):
        got = runner.run(mlp, states[:rows], alpha[:rows], steps[:rows], 3, max_norm,
                         "ieee").clone()
        want = kernels.triton_ascend(mlp, states[:rows], alpha[:rows], steps[:rows], 3,
                                     max_norm)
        assert got.shape == (rows, DIM)
        assert torch.equal(got, want), (seed, rows, max_norm)


def _padded_closed_form(mlp, states, alpha, steps, iterations, max_norm):
    """ascend_float32 on the batch padded to its graph bucket (zero rows, steps 0, radius
    inf), as the graph runner pads it: BLAS may round a row by the row count of its product
    (MKL on an AMD EPYC does), so the unpadded batch is not the same computation."""
    from vllm_recontrol.ascent import ascend_float32
    from vllm_recontrol.ascent_graphs import bucket_rows

    rows = states.shape[0]
    extra = bucket_rows(rows) - rows
    if isinstance(max_norm, torch.Tensor):
        max_norm = torch.cat([max_norm, torch.full((extra,), float("inf"))])
    return ascend_float32(mlp, torch.cat([states, states.new_zeros(extra, states.shape[1])]),
                          torch.cat([alpha, alpha.new_zeros(extra)]),
                          torch.cat([steps, steps.new_zeros(extra)]), iterations,
                          max_norm)[:rows]


def test_graph_cache_keys_on_projection_not_on_the_radius(kernels, seed, monkeypatch):
    """Every radius (one, or one per row) replays the one projected graph of a shape: the
    radii go through a buffer, so per-request max_norm values cannot multiply captures."""
    from vllm_recontrol import ascent_graphs

    monkeypatch.setattr(ascent_graphs.torch.cuda, "graph_pool_handle", lambda: "pool")
    monkeypatch.setattr(ascent_graphs, "capture_graph",
                        lambda fn, device, pool: _ReplayingGraph(fn))
    runner = ascent_graphs.AscentGraphs()
    mlp, states, alpha, steps = _draw(seed, 12, [24, 17])
    per_row = torch.tensor([0.05, float("inf"), 0.2] * 4)
    for rows, max_norm in ((12, 0.4), (12, per_row), (12, 0.1), (7, per_row[:7]), (12, None)):
        got = runner.run(mlp, states[:rows], alpha[:rows], steps[:rows], 3, max_norm,
                         "fp32", backend="torch").clone()
        want = _padded_closed_form(mlp, states[:rows], alpha[:rows], steps[:rows], 3, max_norm)
        assert torch.equal(got, want), (seed, max_norm)
    assert runner.captures == 2  # projected and unprojected, bucket 16, 3 steps


def test_buckets_up_to():
    from vllm_recontrol.ascent_graphs import buckets_up_to
    assert buckets_up_to(1) == [16]
    assert buckets_up_to(40) == [16, 32, 64]
    assert buckets_up_to(256) == [16, 32, 64, 128, 192, 256]
    assert buckets_up_to(300) == [16, 32, 64, 128, 192, 256, 320]


def test_bucketed_runner_replays_the_torch_closed_form(kernels, seed):
    """backend="torch" in the graph runner (the exact-fp32 path on CUDA): the same padding
    and buffers around ascend_float32 give its own answer on the padded batch, bit for bit."""
    from vllm_recontrol.ascent_graphs import AscentGraphs

    runner = AscentGraphs(capture=False)
    mlp, states, alpha, steps = _draw(seed, 40, [24, 17])
    radii = torch.linspace(0.1, 1.0, 40)
    radii[::3] = float("inf")
    for rows in (40, 3, 17):
        for max_norm in (None, 0.4, radii[:rows]):
            got = runner.run(mlp, states[:rows], alpha[:rows], steps[:rows], 3, max_norm,
                             "fp32", backend="torch").clone()
            want = _padded_closed_form(mlp, states[:rows], alpha[:rows], steps[:rows], 3,
                                       max_norm)
            assert torch.equal(got, want), (seed, rows, max_norm)


def test_graph_buffers_made_in_inference_mode_serve_calls_outside_it(seed):
    """vLLM runs the warm-up and the edits under torch.inference_mode(); a later direct call
    outside it (a script, a benchmark) writes the same static buffers in place, which
    inference tensors refuse. Each call still gets its own answer (CPU: the torch closed
    form through the graph runner's buffers, without capture)."""
    from vllm_recontrol.ascent_graphs import AscentGraphs

    runner = AscentGraphs(capture=False)
    mlp, states, alpha, steps = _draw(seed, 12, [24, 17])
    want = _padded_closed_form(mlp, states, alpha, steps, 3, None)
    with torch.inference_mode():
        inside = runner.run(mlp, states, alpha, steps, 3, None, "fp32", backend="torch").clone()
    outside = runner.run(mlp, states, alpha, steps, 3, None, "fp32", backend="torch").clone()
    with torch.inference_mode():
        again = runner.run(mlp, states, alpha, steps, 3, 0.3, "fp32", backend="torch").clone()
    assert torch.equal(inside, want) and torch.equal(outside, want), seed
    assert torch.equal(again, _padded_closed_form(mlp, states, alpha, steps, 3, 0.3)), seed


class _ReplayingGraph:
    """Stands in for a CUDA graph on CPU: replay() runs the captured function again, on
    whatever the static buffers hold then (what a real replay does)."""

    def __init__(self, fn):
        self.fn = fn
        fn()

    def replay(self):
        self.fn()


def test_graph_cache_captures_once_per_key_evicts_and_logs(kernels, seed, monkeypatch, caplog):
    """The graph cache's logic on CPU, with capture stubbed: one capture per key, replays give
    each batch its own answer, past max_graphs the least recently used graph captured while
    serving is evicted (never the warm-up's), a failed capture
    is logged once and its key runs eagerly from then on, and captures after the warm-up
    are logged (they stall a live batch)."""
    import logging

    from vllm_recontrol import ascent_graphs

    monkeypatch.setattr(ascent_graphs.torch.cuda, "graph_pool_handle", lambda: "pool")
    monkeypatch.setattr(ascent_graphs, "capture_graph",
                        lambda fn, device, pool: _ReplayingGraph(fn))
    runner = ascent_graphs.AscentGraphs(max_graphs=2)
    mlp, states, alpha, steps = _draw(seed, 40, [24, 17])
    runner.reserve(64, DIM, states.device)  # as the warm-up does: no regrowth drops graphs

    def run(rows, n, offset=0):
        got = runner.run(mlp, states[offset:offset + rows], alpha[:rows], steps[:rows], n,
                         None, "fp32", backend="torch").clone()
        want = _padded_closed_form(mlp, states[offset:offset + rows], alpha[:rows],
                                   steps[:rows], n, None)
        assert torch.equal(got, want), (seed, rows, n, offset)

    caplog.set_level(logging.INFO, logger=ascent_graphs.logger.name)
    runner.pinning = True  # as ValueHead.warm_up sets it around its captures
    run(5, 3)
    run(9, 3, offset=20)  # same bucket (16) and steps: a replay on new inputs
    assert runner.captures == 1 and len(runner) == 1
    assert not [r for r in caplog.records if "while serving" in r.getMessage()]
    runner.pinning, runner.warm = False, True
    run(20, 3)  # bucket 32: a new capture, now logged
    assert runner.captures == 2
    served = [r.getMessage() for r in caplog.records if "while serving" in r.getMessage()]
    assert len(served) == 1 and "32-row batches with 3 steps" in served[0]
    keys = lambda: {(k[0], k[3]) for k in runner._graphs}  # noqa: E731 - (bucket, steps)
    run(5, 2)  # two captured while serving: within max_graphs
    assert keys() == {(16, 3), (32, 3), (16, 2)}
    run(5, 4)  # a third evicts the oldest captured while serving, not the warm-up's
    assert keys() == {(16, 3), (16, 2), (16, 4)}
    run(20, 3)  # captured again
    run(9, 3)  # the warm-up's graph: replayed
    assert runner.captures == 5

    def broken(fn, device, pool):
        raise RuntimeError("capture not supported here")

    monkeypatch.setattr(ascent_graphs, "capture_graph", broken)
    caplog.clear()
    run(40, 1)
    run(33, 1)  # same key: eager, no second attempt or warning
    failures = [r for r in caplog.records if "capture of the ascent failed" in r.getMessage()]
    assert len(failures) == 1 and "capture not supported here" in failures[0].getMessage()
    assert runner.captures == 5


def test_without_a_warm_up_every_graph_is_held_to_the_bound(kernels, monkeypatch):
    """With warmup_steps [] (or a warm-up that failed) nothing is pinned: every graph
    captured is one of the max_graphs most recently used (capture stubbed, CPU)."""
    from vllm_recontrol import ascent_graphs

    monkeypatch.setattr(ascent_graphs.torch.cuda, "graph_pool_handle", lambda: "pool")
    monkeypatch.setattr(ascent_graphs, "capture_graph",
                        lambda fn, device, pool: _ReplayingGraph(fn))
    runner = ascent_graphs.AscentGraphs(max_graphs=3)
    mlp, states, alpha, steps = _draw(0, 40, [24, 17])
    runner.reserve(64, DIM, states.device)
    for n in range(1, 9):
        runner.run(mlp, states[:5], alpha[:5], steps[:5], n, None, "fp32", backend="torch")
    assert len(runner) == 3 and {k[3] for k in runner._graphs} == {6, 7, 8}


def test_graph_buffers_are_shared_and_grow(kernels):
    """Every bucket reads leading rows of one buffer set; growing it drops the graphs that
    point at the old buffers (CPU: the bookkeeping only, no capture)."""
    from vllm_recontrol.ascent_graphs import AscentGraphs

    runner = AscentGraphs(capture=False)
    small = runner.reserve(64, DIM, torch.device("cpu"))
    assert runner.reserve(16, DIM, torch.device("cpu")) is small  # never shrinks
    runner._graphs[(64, DIM, torch.device("cpu"), 2)] = (None, None)
    runner._graphs[(64, DIM + 1, torch.device("cpu"), 2)] = (None, None)
    grown = runner.reserve(128, DIM, torch.device("cpu"))
    assert grown is not small and grown.states.shape == (128, DIM)
    assert list(runner._graphs) == [(64, DIM + 1, torch.device("cpu"), 2)]


def test_warm_up_runs_every_bucket_and_edits_nothing(kernels, seed, monkeypatch):
    """ValueHead.warm_up runs one ascent per (row bucket up to max_rows, step count), with
    alpha 0, and leaves the head untouched (CPU: interpreted kernels, no graphs)."""
    from vllm_recontrol import ValueHead

    head = ValueHead(DIM, [24, 17], seed=seed % 1000)
    before = [t.clone() for t in head.state_dict().values()]
    calls, radii = [], []
    ascend = head.ascend

    def spy(states, alpha, steps, **kw):
        out = ascend(states, alpha, steps, **kw)
        calls.append((states.shape[0], float(alpha), steps, kw["num_iterations"], kw["backend"]))
        assert torch.equal(out, states)  # alpha 0: nothing moves
        radius = kw["max_norm"]
        radii.append(None if radius is None else radius if isinstance(radius, float)
                     else tuple(radius.tolist()))
        return out

    monkeypatch.setattr(head, "ascend", spy)
    assert head.warm_up(40, [2, 1, 2, 0], backend="triton") == 6
    assert calls == [(rows, 0.0, n, n, "triton") for rows in (16, 32, 64) for n in (1, 2)]
    assert all(torch.equal(a, b) for a, b in zip(before, head.state_dict().values()))
    assert head.nonfinite_rows() == 0
    assert head.warm_up(40, [2], backend="torch") == 0  # nothing to compile
    assert len(calls) == 6
    with pytest.raises(ValueError, match="max_rows"):
        head.warm_up(0, [2], backend="triton")
    # also_projected: each (bucket, count) once more with an infinite radius per row
    calls.clear(), radii.clear()
    assert head.warm_up(20, [3], backend="triton", also_projected=True) == 4
    assert calls == [(rows, 0.0, 3, 3, "triton") for rows in (16, 32) for _ in range(2)]
    assert radii == [None, (math.inf,) * 16, None, (math.inf,) * 32]
    radii.clear()
    assert head.warm_up(20, [3], backend="triton", max_norm=0.5, also_projected=True) == 2
    assert radii == [0.5, 0.5]  # a head with its own radius is warmed projected already


def test_value_head_products_follow_the_precision(kernels, seed):
    """ValueHead.ascend on the Triton backend: "bf16" reads bf16 weights (the kernel's bf16
    path, bit for bit), "fp32" the exact path; both move rows as the torch reference does."""
    from vllm_recontrol import ValueHead

    head = ValueHead(DIM, [24, 17], seed=seed % 1000)
    _, states, alpha, steps = _draw(seed, 6, [24, 17])
    exact = head.ascend(states, alpha, steps, backend="triton", precision="fp32")
    torch_ref = head.ascend(states, alpha, steps, backend="torch")
    torch.testing.assert_close(exact, torch_ref, rtol=1e-4, atol=1e-5)
    fast = head.ascend(states, alpha, steps, backend="triton", precision="bf16")
    bf16 = head._weights_as(torch.bfloat16)
    u = kernels.triton_ascend(bf16, states, alpha, steps, int(steps.max()), precision="bf16")
    torch.testing.assert_close(fast, states + u, rtol=0, atol=0)
    assert head.ascend(states, alpha, steps, backend="triton").equal(fast)  # auto = bf16


# ----------------------------------------------------------------------------- Gram form
def _run_gram(kernels, mlp, states, alpha, steps, num_iterations, **kwargs):
    """The Gram-form kernel with its output and scratch poisoned with NaN before the call."""
    out = torch.full((states.shape[0], states.shape[1]), float("nan"))
    u = kernels.triton_ascend_gram(with_first_gram(mlp), states, alpha, steps, num_iterations,
                                   out=out, poison_scratch=True, **kwargs)
    assert u is out
    return u


@pytest.mark.parametrize("hidden", [1, 2, 3])
def test_gram_form_matches_float64_reference(kernels, seed, hidden):
    """fp32 products: the Gram form computes the direct form's ascent (autograd, float64)."""
    mlp, states, alpha, steps, ref, clean, seed = _draw_clean(seed, 6, WIDTHS[:hidden], 3)
    u = _run_gram(kernels, mlp, states, alpha, steps, 3)
    _check(u, ref, clean, steps, alpha, FP32_TOL, seed, f"Gram form, fp32, {hidden} hidden")


@pytest.mark.parametrize("hidden", [1, 2, 3])
def test_gram_reference_is_the_ascent(seed, hidden):
    """The Gram-form reference without rounding equals autograd's ascent (the algebra)."""
    mlp, states, alpha, steps = _draw(seed, 6, [*WIDTHS, 50][-hidden:])  # also h1 > d
    ref, _ = reference_ascent(mlp.weights, mlp.biases, states, alpha, steps, 3)
    gram = with_first_gram(MLPWeights([w.double() for w in mlp.weights], mlp.biases)).first_gram
    u, _ = gram_reference_ascent(mlp.weights, mlp.biases, gram, states, alpha, steps, 3)
    torch.testing.assert_close(u, ref, rtol=1e-9, atol=1e-12, msg=f"seed {seed}")


@pytest.mark.parametrize("hidden", [1, 2, 3])
def test_gram_form_bf16_matches_its_rounded_reference(kernels, seed, hidden):
    """bf16 products: the kernel rounds where the Gram form's reference rounds (operands of
    s, c, activations, backward products; G as stored)."""
    for attempt in range(50):
        mlp, states, alpha, steps = _draw(seed + attempt, 7, WIDTHS[:hidden],
                                          weight_dtype=torch.bfloat16)
        gram = with_first_gram(mlp).first_gram
        ref, clean = gram_reference_ascent(mlp.weights, mlp.biases, gram, states, alpha, steps,
                                           3, emulate_bf16=True)
        if (clean & (steps > 0) & (alpha != 0)).any():
            break
    u = _run_gram(kernels, mlp, states, alpha, steps, 3)
    _check(u, ref, clean, steps, alpha, BF16_EMULATED_TOL, seed + attempt,
           f"Gram form, bf16, {hidden} hidden")


@pytest.mark.parametrize("hidden,plan", [(1, SPLIT_PLAN), (2, TALL_SPLIT_PLAN),
                                         (3, {"split_k": 2, "block_k": 16, "fixup": 1})])
def test_gram_form_split_k_rows_and_determinism(kernels, seed, hidden, plan):
    """Split K (reduce kernel or fix-up), 19 rows over two row tiles, finished rows stop, and
    the same bits twice."""
    mlp, states, alpha, steps, ref, clean, seed = _draw_clean(seed, 19, WIDTHS[:hidden], 3)
    u = _run_gram(kernels, mlp, states, alpha, steps, 3, plan_overrides=plan)
    _check(u, ref, clean, steps, alpha, FP32_TOL, seed, f"Gram form, split K, {hidden} hidden")
    assert torch.equal(u, _run_gram(kernels, mlp, states, alpha, steps, 3,
                                    plan_overrides=plan)), f"two runs differ (seed {seed})"
    once = _run_gram(kernels, mlp, states, alpha, steps, 1, plan_overrides=plan)
    done = steps <= 1
    assert torch.equal(u[done], once[done]), f"a finished row kept moving (seed {seed})"


@pytest.mark.parametrize("hidden", [1, 2, 3])
def test_gram_form_projection_matches_float64_reference(kernels, seed, hidden):
    """max_norm in the Gram form (fp32): one radius below most rows' free norm, and per-row
    radii with some rows uncapped, against autograd's projected ascent; the uncapped rows
    have the unprojected Gram kernel's bits."""
    mlp, states, alpha, steps, free, _, seed = _draw_clean(seed, 6, WIDTHS[:hidden], 3)
    radius = 0.5 * free.norm(dim=1).max().item()
    ref, clean = reference_ascent(mlp.weights, mlp.biases, states, alpha, steps, 3, radius)
    u = _run_gram(kernels, mlp, states, alpha, steps, 3, max_norm=radius)
    _check(u, ref, clean, steps, alpha, FP32_TOL, seed, f"Gram form, max_norm, {hidden} hidden")
    assert (u.norm(dim=1) <= radius * (1 + 1e-5)).all(), f"norm above the bound (seed {seed})"
    radii = torch.tensor([0.5 * radius, math.inf, radius, math.inf, 0.25 * radius, math.inf])
    ref, clean = reference_ascent(mlp.weights, mlp.biases, states, alpha, steps, 3, radii)
    u = _run_gram(kernels, mlp, states, alpha, steps, 3, max_norm=radii)
    _check(u, ref, clean, steps, alpha, FP32_TOL, seed, f"Gram form, per-row radii, {hidden}")
    free_u = _run_gram(kernels, mlp, states, alpha, steps, 3)
    uncapped = torch.isinf(radii)
    assert torch.equal(u[uncapped], free_u[uncapped]), f"an uncapped row moved (seed {seed})"


@pytest.mark.parametrize("hidden,plan", [(1, None), (2, SPLIT_PLAN), (3, TALL_SPLIT_PLAN),
                                         (2, {"split_k": 2, "block_k": 16, "fixup": 1})])
def test_gram_form_projection_bf16_and_split_k(kernels, seed, hidden, plan):
    """bf16 products under per-row radii against the rounded Gram-form reference (same
    projection arithmetic), with split K through the reduce kernel and the fix-up."""
    for attempt in range(50):
        mlp, states, alpha, steps = _draw(seed + attempt, 19, WIDTHS[:hidden],
                                          weight_dtype=torch.bfloat16)
        gram = with_first_gram(mlp).first_gram
        free, _ = gram_reference_ascent(mlp.weights, mlp.biases, gram, states, alpha, steps, 3)
        radii = 0.5 * free.norm(dim=1).clamp_min(1e-3)
        radii[::3] = math.inf
        ref, clean = gram_reference_ascent(mlp.weights, mlp.biases, gram, states, alpha, steps,
                                           3, radii, emulate_bf16=True)
        if (clean & (steps > 0) & (alpha != 0)).sum() >= 3:
            break
    u = _run_gram(kernels, mlp, states, alpha, steps, 3, max_norm=radii.float(),
                  plan_overrides=plan)
    _check(u, ref, clean, steps, alpha, BF16_EMULATED_TOL, seed + attempt,
           f"Gram form, bf16, per-row radii, {hidden} hidden, plan {plan}")
    assert torch.equal(u, _run_gram(kernels, mlp, states, alpha, steps, 3,
                                    max_norm=radii.float(), plan_overrides=plan))


def test_gram_form_edge_cases_and_bad_input(kernels, seed):
    mlp, states, alpha, steps, *_ = _draw(seed, 4, WIDTHS[:1])
    assert torch.equal(_run_gram(kernels, mlp, states, alpha, steps, 0), torch.zeros_like(states))
    gram_mlp = with_first_gram(mlp)
    assert kernels.triton_ascend_gram(gram_mlp, states[:0], alpha[:0], steps[:0], 3).shape == (0, DIM)
    with pytest.raises(ValueError, match="first_gram"):
        kernels.triton_ascend_gram(mlp, states, alpha, steps, 3)  # no G
    bad = MLPWeights(mlp.weights, mlp.biases, first_gram=gram_mlp.first_gram[:-1])
    with pytest.raises(ValueError, match="first_gram"):
        kernels.triton_ascend_gram(bad, states, alpha, steps, 3)


def test_value_head_gram_form_on_triton(kernels, seed):
    """ValueHead.ascend(form="gram") on Triton runs the Gram kernel (bit for bit) and agrees
    with the torch path, also with a radius; auto stays direct on Triton."""
    from vllm_recontrol import ValueHead

    head = ValueHead(DIM, [24, 17], seed=seed % 1000)
    _, states, alpha, steps = _draw(seed, 6, [24, 17])
    gram = head.ascend(states, alpha, steps, backend="triton", precision="fp32", form="gram")
    u = kernels.triton_ascend_gram(head._weights_as(torch.float32, gram=True), states, alpha,
                                   steps, int(steps.max()), precision="ieee")
    torch.testing.assert_close(gram, states + u, rtol=0, atol=0)
    torch.testing.assert_close(gram, head.ascend(states, alpha, steps, backend="torch"),
                               rtol=1e-4, atol=1e-5)
    radius = 0.5 * float((gram - states).norm(dim=1).max())
    capped = head.ascend(states, alpha, steps, max_norm=radius, backend="triton",
                         precision="fp32", form="gram")
    torch.testing.assert_close(capped, head.ascend(states, alpha, steps, max_norm=radius,
                                                   backend="torch", form="direct"),
                               rtol=1e-4, atol=1e-5)
    assert not torch.equal(capped, gram)  # the cap binds
    assert head.ascend(states, alpha, steps, backend="triton", precision="fp32").equal(
        head.ascend(states, alpha, steps, backend="triton", precision="fp32", form="direct"))

def test_controller_runs_the_gram_kernel_with_per_row_radii(kernels, seed):
    """The GPU check's controller case on the interpreter, Triton backend, Gram form: two
    heads, uncontrolled rows, every fourth row its own radius; each head's rows equal its
    own eager ascent of them alone (the per-row radii reach triton_ascend_gram)."""
    import dataclasses

    from vllm_recontrol import ascent
    from vllm_recontrol.controller import EditController

    bench = _load_bench()
    run = lambda: bench.check_controller(torch.device("cpu"), ascent, seed % 1000,  # noqa: E731
                                         backend="triton", form="gram", d=104,
                                         widths=((88, 40), (72,)))["ok"]
    assert run()
    original = EditController._ascend
    try:  # the rows' own radii dropped on the way to the kernel: the check must notice
        EditController._ascend = lambda self, group, states: original(
            self, dataclasses.replace(group, radius=None), states)
        assert not run()
    finally:
        EditController._ascend = original


def _load_bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kernel.py"
    spec = importlib.util.spec_from_file_location("bench_kernel_for_kernel_tests", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module

@in_process
def test_triton_available():
    from vllm_recontrol.kernels import triton_available
    assert triton_available("cpu")
    assert not triton_available("meta")


@pytest.mark.skipif(IN_PROCESS, reason="the tests above ran in this process")
def test_in_subprocess():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-o", "addopts=", "-k", "not test_in_subprocess", __file__], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, f"interpreted kernel tests failed:\n{run.stdout[-6000:]}{run.stderr[-2000:]}"
    summary = run.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, run.stdout[-2000:]
