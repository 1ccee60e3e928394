"""ValueHead: artifact round trip, validation, and the closed-form ascent against autograd."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from oracle import autograd_ascent, load_head_as_sequential
from training_fakes import model_folder_lookalike
from vllm_recontrol import ValueHead, ValueHeadError
from vllm_recontrol.ascent import (AscentWorkspace, ascend_float32, ascend_gram_float32,
                                   gram_form_pays, with_first_gram)
from vllm_recontrol.backends import choose_form


def reference_ascent(head: ValueHead, states, alpha, steps, max_norm=None):
    """float64 autograd, one row at a time, projection after every step."""
    rows = []
    double = ValueHead(head.hidden_size, head.widths).double()
    double.load_state_dict({k: v.double() for k, v in head.state_dict().items()})
    for r in range(states.shape[0]):
        s = states[r:r + 1].double()
        u = torch.zeros_like(s)
        for _ in range(int(steps[r])):
            x = (s + u).requires_grad_(True)
            (g,) = torch.autograd.grad(double(x).sum(), x)
            u = u + float(alpha[r]) * g
            radius = max_norm[r] if isinstance(max_norm, (list, tuple)) else max_norm
            if radius is not None:
                u = u * min(1.0, radius / float(u.norm()))
        rows.append(s + u)
    return torch.cat(rows)


@pytest.mark.parametrize("form", ["direct", "gram"])
@pytest.mark.parametrize("widths", [[], [24], [31, 17], [16, 16, 9], [90]])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ascent_matches_float64_autograd(widths, seed, form):
    # Fixed seeds: a pre-activation within rounding distance of a ReLU kink may take the other
    # side in float32 than in float64, so fresh draws could fail by chance (the kernel tests,
    # which do draw fresh inputs, exclude such rows explicitly).
    torch.manual_seed(seed)
    head = ValueHead(40, widths, seed=seed)
    states = torch.randn(7, 40)
    alpha = torch.rand(7) * 0.5
    steps = torch.tensor([0, 1, 2, 5, 9, 3, 9])
    if form == "gram" and not widths:
        with pytest.raises(ValueError, match="needs a value head with a hidden layer"):
            head.ascend(states, alpha, steps, form=form)
        return
    got = head.ascend(states, alpha, steps, form=form)
    want = reference_ascent(head, states, alpha, steps)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
    assert torch.equal(got[0], states[0])  # steps == 0: bit-identical


def test_scalar_alpha_and_steps_and_max_norm():
    torch.manual_seed(4)
    head = ValueHead(20, [30], seed=4)
    states = torch.randn(5, 20)
    got = head.ascend(states, 0.8, 6, max_norm=0.05)
    want = reference_ascent(head, states, [0.8] * 5, [6] * 5, max_norm=0.05)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert float((got - states).norm(dim=1).max()) <= 0.05 + 1e-6


def test_per_row_max_norm():
    """One radius per row (inf: none): each row projected onto its own; unprojected rows are
    the same bits as with no max_norm at all."""
    torch.manual_seed(5)
    head = ValueHead(20, [30, 12], seed=5)
    states = torch.randn(4, 20)
    radii = [0.05, float("inf"), 0.02, float("inf")]
    got = head.ascend(states, 0.8, 6, max_norm=radii)
    want = reference_ascent(head, states, [0.8] * 4, [6] * 4, max_norm=radii)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    plain = head.ascend(states, 0.8, 6)
    assert torch.equal(got[[1, 3]], plain[[1, 3]])
    assert float((plain[0] - states[0]).norm()) > 0.1  # the caps bind
    assert torch.equal(head.ascend(states, 0.8, 6, max_norm=torch.tensor(radii)), got)


@pytest.mark.parametrize("form, alpha", [("direct", 1e30), ("direct", 1e37), ("gram", 1e30)])
def test_a_huge_alpha_under_max_norm_lands_on_the_ball(form, alpha):
    """||u||^2 overflows float32 from ||u|| ~ 1.8e19: the factor min(1, radius / ||u||) was
    then 0 and the edit vanished. Each step's u is now on the ball, along the gradient."""
    torch.manual_seed(7)
    head = ValueHead(20, [30, 12], seed=7)
    states = torch.randn(4, 20)
    got = head.ascend(states, alpha, 3, max_norm=0.5, form=form)
    want = reference_ascent(head, states, [alpha] * 4, [3] * 4, max_norm=0.5)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((got - states).norm(dim=1), torch.full((4,), 0.5), rtol=1e-5,
                               atol=0)


@pytest.mark.parametrize("widths", [[30], [30, 12]])
def test_gram_form_with_per_row_radii(widths):
    """The Gram form's projection (||u||^2 = c G c^T) against autograd's, per-row radii; a
    row with an infinite radius matches the Gram form without projection bit for bit."""
    torch.manual_seed(6)
    head = ValueHead(20, widths, seed=6)
    states = torch.randn(4, 20)
    radii = [0.05, float("inf"), 0.02, 0.3]
    got = head.ascend(states, 0.8, 6, max_norm=radii, form="gram")
    want = reference_ascent(head, states, [0.8] * 4, [6] * 4, max_norm=radii)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[1], head.ascend(states, 0.8, 6, form="gram")[1])
    assert float((got[0] - states[0]).norm()) <= 0.05 * (1 + 1e-5)


def test_auto_form_takes_the_gram_form_where_it_moves_fewer_weights():
    # 2 h1 d + (n - 1) h1^2 against 2 n h1 d
    assert gram_form_pays(64, 64, 30) and gram_form_pays(120, 64, 30)
    assert not gram_form_pays(128, 64, 30) and not gram_form_pays(64, 64, 1)
    assert gram_form_pays(64, 64, 2) and gram_form_pays(127, 64, 2)  # 2 h d + h^2 < 4 h d
    assert not gram_form_pays(0, 64, 30)
    assert choose_form("auto", "torch", [64, 64], 64) == "gram"
    assert choose_form("auto", "torch", [200], 64) == "direct"
    assert choose_form("auto", "torch", [], 64) == "direct"
    assert choose_form("auto", "triton", [64], 64) == "direct"  # not measured on a GPU yet
    assert choose_form("gram", "triton", [64], 64) == "gram"
    with pytest.raises(ValueError, match="not one of"):
        choose_form("fast", "torch", [64], 64)
    head = ValueHead(6, [40], seed=0)  # wide first layer: auto stays direct, bit for bit
    states = torch.randn(3, 6)
    assert torch.equal(head.ascend(states, 0.5, 5), head.ascend(states, 0.5, 5, form="direct"))
    head = ValueHead(6, [4], seed=0)
    assert torch.equal(head.ascend(states, 0.5, 5), head.ascend(states, 0.5, 5, form="gram"))


def test_one_head_switches_forms_with_its_workspace():
    """The head's grow-only workspace gains the Gram buffers on the first Gram-form call and
    keeps them; each form's result equals that of a head that only ever ran that form."""
    states = torch.randn(5, 10)
    head = ValueHead(10, [8, 6], seed=4)
    direct = head.ascend(states, 0.3, 4, form="direct")
    assert head._workspace.coef.shape[1] == 0
    gram = head.ascend(states, 0.3, 4, form="gram", max_norm=0.2)
    assert head._workspace.coef.shape[1] == 8
    assert torch.equal(head.ascend(states, 0.3, 4, form="direct"), direct)
    assert head._workspace.coef.shape[1] == 8
    fresh = ValueHead(10, [8, 6], seed=4)
    assert torch.equal(fresh.ascend(states, 0.3, 4, form="gram", max_norm=0.2), gram)
    assert torch.equal(ValueHead(10, [8, 6], seed=4).ascend(states, 0.3, 4, form="direct"),
                       direct)


def test_first_gram_is_symmetric_and_cached():
    head = ValueHead(12, [9, 5], seed=3)
    mlp = head._weights_as(torch.float32, gram=True)
    w = mlp.weights[0].double()
    torch.testing.assert_close(mlp.first_gram.double(), w @ w.t(), rtol=1e-6, atol=1e-7)
    assert torch.equal(mlp.first_gram, mlp.first_gram.t())
    assert head._weights_as(torch.float32, gram=True) is mlp
    with torch.no_grad():
        head.layers[0].weight.mul_(2.0)  # a changed parameter: G is recomputed
    assert not torch.equal(head._weights_as(torch.float32, gram=True).first_gram, mlp.first_gram)


@pytest.mark.parametrize("max_norm,message", [
    (0.0, "positive finite"), (float("inf"), "positive finite"), ("1", "positive finite"),
    ([0.1, 0.2], "2 entries but states have 3 rows"),
    ([0.1, 0.0, 1.0], "must be > 0"), ([0.1, float("nan"), 1.0], "must be > 0"),
    (1e-46, "0 in float32"), ([0.1, 1e-46, 1.0], "must be > 0"),  # a radius that rounds to 0
    ([0.1, "1", 1.0], "per-row max_norm must be numbers"),
])
def test_bad_max_norm_is_refused(max_norm, message):
    head = ValueHead(6, [5], seed=0)
    with pytest.raises(ValueError, match=message):
        head.ascend(torch.randn(3, 6), 0.5, 2, max_norm=max_norm)


def test_none_in_a_per_row_max_norm_means_unprojected():
    """A per-row list may say "no cap" with None, as RowControl does: that row gets the
    unprojected edit, the others their own radius."""
    head = ValueHead(6, [5], seed=0)
    states = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    mixed = head.ascend(states, 2.0, 4, max_norm=[0.05, None, 0.05], backend="torch")
    assert torch.equal(mixed, head.ascend(states, 2.0, 4, max_norm=[0.05, math.inf, 0.05],
                                          backend="torch"))
    assert torch.equal(mixed[1], head.ascend(states[1:2], 2.0, 4, backend="torch")[0])
    assert float((mixed[0] - states[0]).norm()) == pytest.approx(0.05, rel=1e-5)


@pytest.mark.parametrize("form", ["direct", "gram"])
def test_a_head_used_under_inference_mode_works_outside_it(form):
    """vLLM runs under torch.inference_mode(), which makes the head's reused buffers
    inference tensors; a later direct call without that mode (or with no_grad) gets the same
    edit instead of "Inplace update to inference tensor outside InferenceMode". A row that
    goes non-finite exercises the fallback tally too."""
    head = ValueHead(8, [6, 4], seed=0)
    states = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    states[2, 0] = float("inf")
    with torch.inference_mode():
        first = head.ascend(states, 0.5, 3, backend="torch", form=form)
    with torch.no_grad():
        second = head.ascend(states, 0.5, 3, backend="torch", form=form)
    third = head.ascend(states, 0.5, 3, backend="torch", form=form)
    assert torch.equal(first, second) and torch.equal(first, third)
    assert head.nonfinite_rows() == 3


@pytest.mark.parametrize("form", ["direct", "gram"])
def test_a_head_made_under_inference_mode_ascends_and_sees_later_changes(tmp_path, form):
    """A head built, loaded or moved inside ``torch.inference_mode()`` (a user's serving
    code) has inference-tensor parameters, which have no version counter: ascend failed
    inside and outside that mode. It now edits as a head made outside it, and a later
    change of its weights still reaches the cached copies."""
    states = torch.randn(3, 8, generator=torch.Generator().manual_seed(5))
    reference = ValueHead(8, [6, 4], seed=0)
    reference.save(tmp_path / "h")
    with torch.inference_mode():
        built, loaded = ValueHead(8, [6, 4], seed=0), ValueHead.load(tmp_path / "h")
        moved = ValueHead(8, [6, 4], seed=0).to(torch.float64).to(torch.float32)
        inside = loaded.ascend(states, 0.5, 3, backend="torch", form=form)
    expected = reference.ascend(states, 0.5, 3, backend="torch", form=form)
    assert torch.equal(inside, expected)
    for head in (built, loaded, moved):
        assert torch.equal(head.ascend(states, 0.5, 3, backend="torch", form=form), expected)
        with torch.no_grad():
            head.layers[0].weight.mul_(2.0)
    with torch.no_grad():
        reference.layers[0].weight.mul_(2.0)
    changed = reference.ascend(states, 0.5, 3, backend="torch", form=form)
    assert not torch.equal(changed, expected)
    for head in (built, loaded, moved):
        assert torch.equal(head.ascend(states, 0.5, 3, backend="torch", form=form), changed)


@pytest.mark.parametrize("form", ["direct", "gram"])
@pytest.mark.parametrize("needs_grad", ["alpha", "max_norm", "states"])
def test_ascend_takes_tensors_that_require_grad_and_stays_usable(form, needs_grad):
    """The edit is inference, never differentiated: tensors that require grad (a learnable
    alpha, states from a graph) give the plain edit, and the head's reused buffers are not
    left attached to autograd, which broke every later call outside torch.no_grad()."""
    states = torch.randn(3, 8, generator=torch.Generator().manual_seed(4))
    alpha, radius = torch.tensor(0.5), torch.tensor([0.3, math.inf, 0.2])
    given = {"alpha": alpha, "states": states, "max_norm": radius}
    given[needs_grad] = given[needs_grad].clone().requires_grad_(True)
    head, fresh = ValueHead(8, [6, 4], seed=0), ValueHead(8, [6, 4], seed=0)
    edited = head.ascend(given["states"], given["alpha"], 3, max_norm=given["max_norm"],
                         backend="torch", form=form)
    expected = fresh.ascend(states, 0.5, 3, max_norm=radius, backend="torch", form=form)
    assert torch.equal(edited, expected) and not edited.requires_grad
    later = head.ascend(states * 2, 0.25, 2, backend="torch", form=form)
    assert torch.equal(later, fresh.ascend(states * 2, 0.25, 2, backend="torch", form=form))


def test_float64_states_are_edited_in_float64():
    """float64 states get s + u rounded once in float64 (u is float32): a tiny edit stays
    tiny, it is not the float32 rounding of s (about 5e-8 on states of size 1)."""
    head = ValueHead(16, [12], seed=3)
    states = torch.randn(4, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    u = ascend_float32(head._weights_as(torch.float32), states.float(),
                       torch.full((4,), 1e-12), torch.full((4,), 2), 2).double()
    edited = head.ascend(states, 1e-12, 2, backend="torch")
    assert 0 < (edited - states).abs().max().item() < 1e-9
    torch.testing.assert_close(edited - states, u, rtol=1e-3, atol=1e-15)


def test_matches_the_oracle_autograd_head(tmp_path):
    torch.manual_seed(9)
    head = ValueHead(16, [12, 8], seed=9)
    sequential = load_head_as_sequential(head.save(tmp_path / "h"))
    state = torch.randn(1, 16)
    torch.testing.assert_close(head.ascend(state, 0.3, 5),
                               autograd_ascent(sequential, state, 0.3, 5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_precision_states_keep_dtype_and_untouched_rows(dtype):
    torch.manual_seed(5)
    head = ValueHead(32, [32], seed=5)
    states = torch.randn(4, 32).to(dtype)
    alpha = torch.tensor([0.0, 0.5, 0.5, 1.0])
    steps = torch.tensor([3, 0, 4, 4])
    got = head.ascend(states, alpha, steps)
    assert got.dtype == dtype
    assert torch.equal(got[:2], states[:2])  # alpha == 0 and steps == 0 rows
    want = reference_ascent(head, states.double(), alpha, steps).to(dtype)
    torch.testing.assert_close(got[2:], want[2:], rtol=1e-2, atol=1e-2)


def test_nonfinite_rows_fall_back_and_are_counted():
    head = ValueHead(8, [8], seed=1)
    states = torch.randn(3, 8)
    states[1, 0] = float("inf")
    got = head.ascend(states, 0.5, 2)
    assert torch.equal(got[1], states[1])
    assert torch.isfinite(got[[0, 2]]).all()
    assert head.nonfinite_rows() == 1


def test_workspace_is_reused_across_calls():
    head = ValueHead(8, [8], seed=1)
    head.ascend(torch.randn(6, 8), 0.1, 2)
    first = head._workspace
    head.ascend(torch.randn(3, 8), 0.1, 2)
    assert head._workspace is first  # smaller batches take views of the same buffers


def _allocations(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(1 for e in prof.events() if e.cpu_memory_usage > 0)


@pytest.mark.parametrize("widths", [[8], [8, 8], [8, 6, 4]])
def test_step_loop_allocates_nothing(widths):
    """With a workspace, 40 steps allocate exactly what 1 step does (nothing inside the loop)."""
    head = ValueHead(8, widths, seed=1)
    mlp = head.float32_weights()
    ws = AscentWorkspace.allocate(mlp, 4)
    states, alpha, steps = torch.randn(4, 8), torch.full((4,), 0.1), torch.full((4,), 40)
    run = lambda n: lambda: ascend_float32(mlp, states, alpha, steps, n, 1.0, workspace=ws)  # noqa: E731
    assert _allocations(run(40)) == _allocations(run(1))
    u = ascend_float32(mlp, states, alpha, steps, 3, workspace=ws)
    assert u.data_ptr() == ws.u.data_ptr()
    gram = with_first_gram(mlp)
    assert ws.coef.shape == (4, 0)  # the direct form's workspace carries no Gram buffers
    with pytest.raises(ValueError, match="Gram-form buffers"):
        ascend_gram_float32(gram, states, alpha, steps, 3, workspace=ws)
    ws = AscentWorkspace.allocate(gram, 4)
    assert ws.coef.shape == ws.base.shape == ws.image.shape == (4, widths[0])
    run = lambda n: lambda: ascend_gram_float32(gram, states, alpha, steps, n, 1.0, workspace=ws)  # noqa: E731
    assert _allocations(run(40)) == _allocations(run(1))


def test_save_load_round_trip(tmp_path):
    head = ValueHead(12, [10, 6], seed=3, base_model="tiny/llama", metadata={"epochs": 2})
    loaded = ValueHead.load(head.save(tmp_path / "h"), expected_hidden_size=12)
    assert loaded.widths == [10, 6] and loaded.base_model == "tiny/llama"
    assert loaded.metadata == {"epochs": 2}
    for a, b in zip(head.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    config = json.loads((tmp_path / "h" / "config.json").read_text())
    assert config["activation"] == "relu" and config["hidden_size"] == 12


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_head_files_get_the_umasks_mode(tmp_path, umask):
    """safetensors and mkstemp create files 0600: a head trained by one user could not be
    served by another. Both files get what open() would give them, and no temporary file
    is left behind (saving over an existing head included)."""
    import os
    import stat

    previous = os.umask(umask)
    try:
        head = ValueHead(12, [10], seed=3)
        head.save(tmp_path / "h")
        head.save(tmp_path / "h")
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "h").iterdir()}
    assert modes == {"config.json": 0o666 & ~umask, "model.safetensors": 0o666 & ~umask}


def test_the_umask_is_read_without_being_changed(monkeypatch):
    """Setting the umask to read it left a window in which another thread's new files were
    world-writable; on Linux it is read from /proc, the umask never touched."""
    import os
    import sys

    from vllm_recontrol.files import default_file_mode

    if not sys.platform.startswith("linux"):
        pytest.skip("/proc/self/status is Linux's")
    previous = os.umask(0o027)
    try:
        def untouchable(mask):
            raise AssertionError("the umask was set")

        monkeypatch.setattr(os, "umask", untouchable)
        assert default_file_mode() == 0o640
    finally:
        monkeypatch.undo()
        os.umask(previous)


def test_save_refuses_a_folder_holding_another_artifact(tmp_path):
    """head.save(model_dir), a slip, replaced the model's config.json and weights without a
    word; a folder holding a head is saved over as before."""
    model = model_folder_lookalike(tmp_path / "model", 12, b"the model's weights")
    with pytest.raises(ValueHeadError, match=r"cannot save the value head to .*model: the "
                                             r"folder holds a config.json that is not a value "
                                             r"head's.*save it into a folder of its own"):
        ValueHead(12, [10], seed=3).save(model)
    assert (model / "model.safetensors").read_bytes() == b"the model's weights"
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]
    ValueHead(12, [10], seed=3).save(tmp_path / "head")
    ValueHead(12, [4], seed=4).save(tmp_path / "head")  # another head over a head: fine
    assert ValueHead.load(tmp_path / "head").widths == [4]


def test_seed_gives_the_same_head():
    a, b = ValueHead(8, [4], seed=7), ValueHead(8, [4], seed=7)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def _saved(tmp_path):
    return ValueHead(12, [6], seed=0).save(tmp_path / "h")


@pytest.mark.parametrize("mutate, message", [
    (lambda p: (p / "config.json").unlink(), "config.json is missing"),
    (lambda p: (p / "model.safetensors").unlink(), "model.safetensors are missing"),
    (lambda p: (p / "config.json").write_text("{oops"), "not valid JSON"),
    (lambda p: (p / "config.json").write_text('{"widths": [6]}'), "lacks the key 'hidden_size'"),
    (lambda p: (p / "config.json").write_text('{"model_type": "llama", "hidden_size": 12}'),
     r"is a model's config \(model_type 'llama'\), not a value head's"),
    (lambda p: (p / "config.json").write_text('{"hidden_size": 12, "widths": [7]}'),
     r"layers.0.weight has shape \[6, 12\], expected \[7, 12\]"),
    (lambda p: (p / "config.json").write_text(
        '{"hidden_size": 12, "widths": [6], "activation": "gelu"}'), "activation 'gelu'"),
    (lambda p: (p / "config.json").write_text('{"hidden_size": 12, "widths": [6, 6]}'),
     "missing"),
    (lambda p: (p / "model.safetensors").write_bytes(b"garbage"), "cannot be read as safetensors"),
    (lambda p: (p / "config.json").write_text("[" * 100_000), "not valid JSON"),  # too deep
    (lambda p: (p / "config.json").write_text(
        '{"hidden_size": 12, "widths": [6], "base_model": 123}'), "base_model must be a model name"),
    (lambda p: (p / "config.json").write_text(
        '{"hidden_size": 12, "widths": [6], "metadata": "abc"}'), "metadata must be a JSON object"),
    (lambda p: (p / "config.json").write_text(
        '{"hidden_size": 12, "widths": [6], "format": "lora"}'), "format 'lora' is not a value"),
])
def test_load_rejects_bad_artifacts(tmp_path, mutate, message):
    path = _saved(tmp_path)
    mutate(path)
    with pytest.raises(ValueHeadError, match=message):
        ValueHead.load(path)


def _replaced(path, make):
    path.unlink()
    make(path)


@pytest.mark.parametrize("name, make, message", [
    ("config.json", os.mkfifo, "config .*config.json is not a regular file"),  # would hang
    ("config.json", lambda p: p.symlink_to("/dev/zero"), "is not a regular file"),
    ("config.json", lambda p: p.mkdir(), "config .*config.json is a folder"),
    ("config.json", lambda p: p.symlink_to(p.parent / "gone"),
     r"is missing \(a link to .*gone that leads to no file\)"),
    ("model.safetensors", os.mkfifo, "weights .*model.safetensors are not a regular file"),
    ("model.safetensors", lambda p: p.mkdir(), "model.safetensors are a folder"),
])
def test_load_names_a_file_that_is_no_regular_file(tmp_path, name, make, message):
    """Reported as missing before; a FIFO must not be read (it would block)."""
    path = _saved(tmp_path)
    _replaced(path / name, make)
    with pytest.raises(ValueHeadError, match=message):
        ValueHead.load(path)


def _long_folder(tmp_path):
    """A head folder whose own path fits PATH_MAX (4096) but whose files' paths do not: the
    look at its config.json is an OSError (ENAMETOOLONG), as a folder the user may not search
    is (EACCES, which root, running the tests, never gets)."""
    folder = tmp_path
    while len(str(folder)) < 4080 - 200:
        folder = folder / ("d" * 200)
    folder = folder / ("h" * (4085 - len(str(folder)) - 1))
    os.makedirs(folder)
    return folder


def test_a_head_file_that_cannot_be_looked_at_is_a_head_error(tmp_path):
    """A bare OSError before (it also stopped `inspect` at that head and was not named by
    its value_heads key at engine start)."""
    folder = _long_folder(tmp_path)
    with pytest.raises(ValueHeadError, match=r"config.json cannot be looked at \(File name too "
                       r"long\)"):
        ValueHead.load(folder)
    with pytest.raises(ValueHeadError, match=r"cannot be looked at \(File name too long\)"):
        ValueHead.load(tmp_path / ("x" * 300))  # the folder itself


def _config(path, text: str):
    (path / "config.json").write_text(text, encoding="utf-8")


def test_an_untrusted_config_costs_little_to_refuse_and_its_messages_stay_short(tmp_path):
    """A config of megabytes made messages of megabytes; 7 million one-wide layers took 68 s
    and 3.8 GB before they were refused."""
    path = _saved(tmp_path)
    for config, message in (
            ({"hidden_size": "A" * 100_000, "widths": [6]}, "hidden_size must be a positive"),
            ({"hidden_size": 12, "widths": ["x" * 100_000] * 50}, "widths must be a list"),
            ({"hidden_size": 12, "widths": [6], "activation": "g" * 100_000}, "activation"),
            ({"hidden_size": 12, "widths": [6], "format": "f" * 100_000}, "format"),
            ({"hidden_size": 12, "widths": [6], "format_version": "9" * 100_000},
             "format_version"),
            ({"hidden_size": 12, "widths": [6], "base_model": ["m"] * 100_000}, "base_model"),
            ({"hidden_size": 12, "widths": [1] * 2_000_000}, "widths lists 2000000 hidden "
             "layers, more than a value head has \\(at most 64"),
            ({"hidden_size": int("9" * 4299), "widths": [6]}, "layers.0.weight has shape")):
        _config(path, json.dumps(config))
        with pytest.raises(ValueHeadError, match=message) as refused:
            ValueHead.load(path)
        assert len(str(refused.value)) < 500, (message, len(str(refused.value)))
    with pytest.raises(ValueHeadError, match="widths lists 65 hidden layers"):
        ValueHead(12, [2] * 65)


@pytest.mark.parametrize("text, message", [
    ('{"hidden_size": 16, "widths": [6], "hidden_size": 12}',
     "is ambiguous JSON: the key 'hidden_size' appears twice"),
    ('{"hidden_size": 12, "widths": [6], "metadata": {"a": 1, "a": 2}}', "'a' appears twice"),
    ('{"hidden_size": 12, "widths": [6], "format_version": true}', "format_version True is not"),
    ('{"hidden_size": 12, "widths": [6], "format_version": 1.0}', "format_version 1.0 is not"),
])
def test_a_config_two_readers_could_read_differently_is_refused(tmp_path, text, message):
    """Duplicate keys loaded with the last one winning (another tool reads the first);
    format_version true and 1.0 passed as 1."""
    path = _saved(tmp_path)
    config = json.loads((path / "config.json").read_text())
    _config(path, text[:-1] + f', "save_id": "{config["save_id"]}"}}')
    with pytest.raises(ValueHeadError, match=message):
        ValueHead.load(path)


def test_a_config_is_read_as_utf8_whatever_the_locale(tmp_path):
    """Read with the locale's encoding before: under an ASCII locale a UTF-8 config was
    "not valid JSON"."""
    import subprocess
    import sys

    path = ValueHead(12, [6], seed=0, base_model="org/modèle-ü").save(tmp_path / "h")
    config = json.loads((path / "config.json").read_text())  # saved escaped: as ASCII
    _config(path, json.dumps(config, ensure_ascii=False))  # as a hand-written config is
    assert "modèle".encode() in (path / "config.json").read_bytes()
    script = ("import sys, locale; from vllm_recontrol import ValueHead; "
              "print(locale.getpreferredencoding(False)); "
              "print(ValueHead.load(sys.argv[1]).base_model.encode('unicode_escape').decode())")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0",
           "PYTHONUTF8": "0"}
    done = subprocess.run([sys.executable, "-X", "utf8=0", "-c", script, str(path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    encoding, name = done.stdout.split()
    assert encoding.upper() != "UTF-8"  # the locale the bug needed
    assert name == "org/mod\\xe8le-\\xfc"


def test_a_weights_check_that_runs_out_of_memory_is_a_head_error(tmp_path, monkeypatch):
    """torch's allocation failure in the finiteness check was a bare RuntimeError."""
    from vllm_recontrol import head_files

    path = _saved(tmp_path)

    def no_memory(tensor):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(head_files.torch, "isfinite", no_memory)
    with pytest.raises(ValueHeadError, match=r"layers.0.weight \(72 values\) could not be "
                       r"checked: DefaultCPUAllocator"):
        ValueHead.load(path)


def test_the_finiteness_check_reads_every_chunk(monkeypatch):
    from vllm_recontrol import head_files

    monkeypatch.setattr(head_files, "FINITE_CHUNK", 5)
    values = torch.zeros(3, 7)
    assert head_files.all_finite(values)
    for index in ((0, 0), (2, 6), (1, 3)):
        bad = values.clone()
        bad[index] = math.nan
        assert not head_files.all_finite(bad), index


@pytest.mark.parametrize("kwargs, message", [
    ({"dtype": torch.int32}, "dtype must be one of torch.float32, .* got torch.int32"),
    ({"dtype": torch.complex64}, "got torch.complex64"),  # loaded as a complex head before
    ({"dtype": "float8"}, "got 'float8'"),
    ({"device": "meta"}, "device 'meta' holds no values"),
    ({"device": "nonsense"}, "device 'nonsense' is not a torch device"),
])
def test_load_refuses_a_device_or_dtype_no_head_can_live_on(tmp_path, kwargs, message):
    path = _saved(tmp_path)
    with pytest.raises(ValueHeadError, match=message):
        ValueHead.load(path, **kwargs)


def test_load_refuses_weights_that_do_not_match_their_save_id(tmp_path):
    """The save id is the weights' digest: one flipped bit in a tensor's data (the header
    and metadata intact) loaded silently before."""
    import struct

    path = _saved(tmp_path)
    ValueHead.load(path)  # intact
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8 + struct.unpack("<Q", data[:8])[0] + 5] ^= 0x01  # a bit of the first tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueHeadError, match=r"model.safetensors do not match their save id "
                                             r"\(a digest of the weights\): the file is "
                                             "corrupted or was edited"):
        ValueHead.load(path)


def test_load_takes_a_dtype_by_name(tmp_path):
    head = ValueHead.load(_saved(tmp_path), dtype="bfloat16")
    assert {p.dtype for p in head.parameters()} == {torch.bfloat16}


def test_load_rejects_nan_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    path = _saved(tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    tensors["layers.1.bias"][0] = float("nan")
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ValueHeadError, match="NaN"):
        ValueHead.load(path)


def test_a_save_killed_between_its_two_files_is_refused_not_served_mixed(tmp_path, monkeypatch):
    """Each file is replaced atomically, not both: killed after the weights, a save leaves
    new weights beside the old config. Same shapes, so the mix would load as a head that
    no training produced; the save ids tell the two saves apart."""
    import vllm_recontrol.value_head as value_head_module

    ValueHead(4, [8], seed=0, base_model="model-A").save(tmp_path / "h")

    def killed(*args, **kwargs):
        raise OSError("killed before the config was written")

    monkeypatch.setattr(value_head_module, "write_text_atomic", killed)
    with pytest.raises(OSError, match="killed"):
        ValueHead(4, [8], seed=1, base_model="model-B").save(tmp_path / "h")
    with pytest.raises(ValueHeadError, match="config.json and model.safetensors come from "
                                             "different saves .* save the head again"):
        ValueHead.load(tmp_path / "h")
    monkeypatch.undo()
    head = ValueHead(4, [8], seed=1, base_model="model-B")
    head.save(tmp_path / "h")  # saving again mends it
    assert ValueHead.load(tmp_path / "h").base_model == "model-B"


def test_the_same_head_saves_to_the_same_bytes(tmp_path):
    """The save id is a digest of the weights, and the weights file's metadata one sorted
    key (safetensors writes a metadata map in hash order: two keys came out in either order)."""
    head = ValueHead(4, [8], seed=0, metadata={"b": 1, "a": 2})
    saved = {(p / name).read_bytes() for p in (head.save(tmp_path / str(i)) for i in range(8))
             for name in ("model.safetensors",)}
    configs = {(tmp_path / str(i) / "config.json").read_text() for i in range(8)}
    assert len(saved) == 1 and len(configs) == 1


def test_weights_copied_from_another_head_are_refused(tmp_path):
    import shutil

    ValueHead(4, [8], seed=0).save(tmp_path / "a")
    ValueHead(4, [8], seed=1).save(tmp_path / "b")
    shutil.copy(tmp_path / "b" / "model.safetensors", tmp_path / "a" / "model.safetensors")
    with pytest.raises(ValueHeadError, match="come from different saves"):
        ValueHead.load(tmp_path / "a")


def test_a_head_written_by_hand_without_save_ids_loads(tmp_path):
    """Heads converted from elsewhere carry no save id in either file: nothing to compare."""
    from safetensors.torch import save_file

    source = ValueHead(4, [8], seed=2)
    folder = tmp_path / "converted"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"hidden_size": 4, "widths": [8]}))
    loaded = ValueHead.load(folder)
    assert all(torch.equal(a, b) for a, b in zip(source.parameters(), loaded.parameters()))
    config = json.loads((tmp_path / "converted" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "save_id": 7}))
    with pytest.raises(ValueHeadError, match="save_id must be a string, got 7"):
        ValueHead.load(folder)


def test_save_refuses_weights_that_load_would_refuse(tmp_path):
    head = ValueHead(8, [4], seed=0)
    with torch.no_grad():
        head.layers[0].weight[1, 2] = float("inf")
    with pytest.raises(ValueHeadError, match=r"cannot save .*layers\.0\.weight holds NaN or inf"):
        head.save(tmp_path / "h")
    assert not (tmp_path / "h").exists()  # nothing written


@pytest.mark.parametrize("metadata, message", [
    ({"mse": np.float32(0.1)}, r'metadata\["mse"\] is a float32'),
    ({"tags": {"a", "b"}}, r'metadata\["tags"\] is a set'),
    ({"w": torch.tensor(1.0)}, r'metadata\["w"\] is a Tensor'),
    ({"metrics": {(1, 2): 3}}, r'metadata\["metrics"\] has the key \(1, 2\)'),
    ({"metrics": {"pearson_s0": float("nan")}},
     r'metadata\["metrics"\]\["pearson_s0"\] is nan'),
    ({"history": [1.0, float("inf")]}, r'metadata\["history"\]\[1\] is inf'),
    ({"it's": {1: 2}}, r'metadata\["it\'s"\] has the key 1 \(int\)'),
])
def test_save_refuses_metadata_json_cannot_hold_and_writes_nothing(tmp_path, metadata, message):
    """A save that fails half-way would leave new weights beside the old config.json, a
    mixed head that loads cleanly: the config is checked before any file is written."""
    old = ValueHead(4, [8], seed=0, base_model="model-A")
    old.save(tmp_path / "h")
    with pytest.raises(ValueHeadError, match=message):
        ValueHead(4, [8], seed=1, base_model="model-B", metadata=metadata).save(tmp_path / "h")
    loaded = ValueHead.load(tmp_path / "h")
    assert loaded.base_model == "model-A"
    for a, b in zip(old.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == ["config.json",
                                                                   "model.safetensors"]


def test_save_refuses_a_base_model_or_metadata_load_would_refuse(tmp_path):
    head = ValueHead(4, [8], seed=0)
    head.base_model = 123
    with pytest.raises(ValueHeadError, match="base_model must be a model name .* got 123"):
        head.save(tmp_path / "h")
    head.base_model, head.metadata = None, [1, 2]
    with pytest.raises(ValueHeadError, match="metadata must be a dict .* got list"):
        head.save(tmp_path / "h")
    assert not (tmp_path / "h").exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"metadata": [1, 2]}, "metadata must be a dict .* got list"),
    ({"base_model": 123}, "base_model must be a model name .* got 123"),
])
def test_constructor_refuses_metadata_and_base_model_of_the_wrong_type(kwargs, message):
    with pytest.raises(ValueHeadError, match=message):
        ValueHead(4, [8], **kwargs)


def test_save_keeps_json_values_and_numpy_float64(tmp_path):
    """numpy's float64 is a Python float: it saves as the number it is."""
    metadata = {"mse": np.float64(0.25), "big": 10 ** 30, "nested": {"a": [1, None, True, "x"]}}
    ValueHead(4, [8], seed=0, metadata=metadata).save(tmp_path / "h")
    assert ValueHead.load(tmp_path / "h").metadata == metadata


def _resaved(path, change):
    """The head's weights changed in place, as a tool that writes tensors would: both files
    then carry the changed weights' save id (the id is their digest; load checks it)."""
    from safetensors.torch import load_file, save_file

    from vllm_recontrol.head_files import weights_id, weights_metadata

    stored = load_file(str(path / "model.safetensors"))
    layers = len(stored) // 2  # in save's order: each layer's weight, then its bias
    names = [f"layers.{i}.{kind}" for i in range(layers) for kind in ("weight", "bias")]
    tensors = {name: change(name, stored[name]) for name in names}
    save_id = weights_id(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata=weights_metadata(save_id))
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "save_id": save_id}))


def test_load_refuses_weights_that_overflow_the_load_dtype(tmp_path):
    """Finite on disk, inf once cast: every edit would silently fall back, so refuse."""
    path = _saved(tmp_path)
    _resaved(path, lambda k, v: v.double().fill_(1e39) if k == "layers.0.weight" else v)
    with pytest.raises(ValueHeadError, match="layers.0.weight has values that do not fit "
                                             "torch.float32"):
        ValueHead.load(path)
    _resaved(path, lambda k, v: v.float().fill_(1e6) if k == "layers.0.weight" else v.float())
    assert torch.isfinite(ValueHead.load(path).layers[0].weight).all()  # fits float32
    with pytest.raises(ValueHeadError, match="do not fit torch.float16"):
        ValueHead.load(path, dtype=torch.float16)


def test_load_refuses_unsupported_float_dtypes_by_name(tmp_path):
    path = _saved(tmp_path)
    _resaved(path, lambda k, v: v.to(torch.float8_e4m3fn) if k == "layers.1.weight" else v)
    with pytest.raises(ValueHeadError, match="layers.1.weight has dtype torch.float8_e4m3fn, "
                                             "expected one of torch.float32"):
        ValueHead.load(path)


def test_load_rejects_a_file_where_a_folder_is_expected(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueHeadError, match="is not a folder"):
        ValueHead.load(tmp_path / "file")


def test_ascend_rejects_wrong_shapes():
    head = ValueHead(8, [4])
    with pytest.raises(ValueError, match=r"states must be \[B, 8\]"):
        head.ascend(torch.randn(2, 9), 0.1, 1)
    with pytest.raises(ValueError, match="alpha has 3 entries"):
        head.ascend(torch.randn(2, 8), torch.ones(3), 1)


@pytest.mark.parametrize("alpha, steps, message", [
    (-1.0, 2, "alpha must be finite and >= 0"), (float("nan"), 2, "alpha must be finite"),
    (float("inf"), 2, "alpha must be finite"), (1e39, 2, "alpha must be finite"),
    (torch.tensor([0.5, -0.1]), 2, "alpha must be finite and >= 0"),
    (0.5, 2.7, "steps must be whole numbers >= 0"), (0.5, -3, "steps must be whole numbers"),
    (0.5, torch.tensor([1.0, 1.5]), "steps must be whole numbers"),
    (0.5, "3", "steps must be a number or a sequence of numbers, got '3'"),
    (0.5, 10 ** 20, r"steps must be at most 1000000 \(STEPS_LIMIT\), got 10{20}"),
    (0.5, [1, 1_000_001], r"steps must be at most 1000000 .* got \[1, 1000001\]"),
    (0.5, torch.tensor([2 ** 62, 1]), "steps must be at most 1000000"),
])
def test_ascend_refuses_bad_alpha_and_steps(alpha, steps, message):
    with pytest.raises(ValueError, match=message):
        ValueHead(8, [4], seed=0).ascend(torch.randn(2, 8), alpha, steps)


@pytest.mark.parametrize("steps, num_iterations, message", [
    (5, 2, "num_iterations = 2 is below the largest steps = 5"),
    ([1, 5], 0, "num_iterations = 0 is below the largest steps = 5"),
    (torch.tensor([4, 1]), 3, "num_iterations = 3 is below the largest steps = 4"),
    (3, -1, "num_iterations must be an integer >= 0 .* got -1"),
    (0, -1, "num_iterations must be an integer >= 0 .* got -1"),
    (3, 3.0, r"num_iterations must be an integer >= 0 .* got 3.0 \(float\)"),
    (3, True, r"num_iterations must be an integer >= 0 .* got True \(bool\)"),
    (3, torch.tensor(3), r"num_iterations must be an integer >= 0 .* \(Tensor\)"),
    (3, 10 ** 20, r"num_iterations must be at most 1000000 \(STEPS_LIMIT\), got 10{20}"),
    (torch.tensor([0, 0]), 1_000_001, "num_iterations must be at most 1000000"),
])
def test_ascend_refuses_num_iterations_that_would_cut_rows_short(steps, num_iterations,
                                                                  message):
    """num_iterations is the loop count, which callers pass to spare a device sync: below
    the largest steps it silently cut every row short (0 or less left them unedited)."""
    with pytest.raises(ValueError, match=message):
        ValueHead(8, [4], seed=0).ascend(torch.randn(2, 8), 0.5, steps,
                                         num_iterations=num_iterations)


def test_num_iterations_at_or_above_the_largest_steps_changes_nothing():
    head, states = ValueHead(8, [4], seed=0), torch.randn(2, 8)
    expected = head.ascend(states, 0.5, [2, 4])
    for count in (4, np.int64(4), 9):
        assert torch.equal(head.ascend(states, 0.5, [2, 4], num_iterations=count), expected)
    assert torch.equal(head.ascend(states, 0.5, 0, num_iterations=0), states)


def test_ascend_takes_a_radius_as_any_real_number_or_a_0d_tensor():
    import numpy as np

    head, states = ValueHead(8, [4], seed=0), torch.randn(3, 8)
    expected = head.ascend(states, 2.0, 3, max_norm=0.25)
    assert float((expected - states).norm(dim=1).max()) <= 0.25 * (1 + 1e-5)
    for radius in (np.float32(0.25), torch.tensor(0.25), [0.25] * 3):
        torch.testing.assert_close(head.ascend(states, 2.0, 3, max_norm=radius), expected,
                                   rtol=0, atol=1e-6)
    assert torch.equal(head.ascend(states, 2.0, 3.0), head.ascend(states, 2.0, 3))


def test_base_model_mismatch_compares_model_names_not_paths():
    head = ValueHead(4, [4], base_model="lmsys/vicuna-7b-v1.5")
    assert head.base_model_mismatch("lmsys/vicuna-7b-v1.5") is None
    assert head.base_model_mismatch("/models/Vicuna-7B-v1.5/") is None  # a local copy
    message = head.base_model_mismatch("meta-llama/Llama-2-7b-hf")
    assert "'lmsys/vicuna-7b-v1.5'" in message and "'meta-llama/Llama-2-7b-hf'" in message
    assert ValueHead(4, [4]).base_model_mismatch("anything") is None  # nothing recorded
    # a model collected from the hub cache's snapshot folder is that repository
    snapshot = "/root/.cache/huggingface/hub/models--lmsys--vicuna-7b-v1.5/snapshots/" + "a" * 40
    assert ValueHead(4, [4], base_model=snapshot).base_model_mismatch(
        "lmsys/vicuna-7b-v1.5") is None
    assert head.base_model_mismatch(snapshot + "/") is None
    assert ValueHead(4, [4], base_model=snapshot).base_model_mismatch("meta-llama/Llama-2-7b")


def test_local_model_folders_are_compared_by_their_own_names(tmp_path, monkeypatch):
    """"." and ".." name the folders they stand for; train records a local folder's
    absolute path, so a head names its model wherever it is inspected from."""
    from vllm_recontrol.training.trainer import recorded_model_name

    model = tmp_path / "tiny-llama"
    (model / "sub").mkdir(parents=True)
    monkeypatch.chdir(model)
    assert ValueHead(4, [4], base_model=".").base_model_mismatch(str(model)) is None
    assert ValueHead(4, [4], base_model=str(model)).base_model_mismatch(".") is None
    monkeypatch.chdir(model / "sub")
    assert ValueHead(4, [4], base_model="..").base_model_mismatch("org/tiny-llama") is None
    assert ValueHead(4, [4], base_model=".").base_model_mismatch("org/tiny-llama")  # "sub"
    # a manifest of an earlier release (the path as given): resolved where train runs
    assert recorded_model_name({"model": ".."}) == str(model.resolve())
    assert recorded_model_name({"model": "lmsys/vicuna-7b-v1.5"}) == "lmsys/vicuna-7b-v1.5"
    assert recorded_model_name({}) is None
    # collect records the folder it resolved: train run from elsewhere names that one
    assert recorded_model_name({"model": ".", "model_folder": "/m/vicuna"}) == "/m/vicuna"
    assert recorded_model_name({"model": "org/m", "model_folder": None}) == "org/m"


@pytest.mark.parametrize("form", ["direct", "gram"])
@pytest.mark.parametrize("radius", [None, 0.3, "per-row"])
def test_a_rows_edit_does_not_depend_on_its_batchs_step_count(form, radius):
    """The batch runs as many iterations as its longest row; a row that finished earlier
    keeps its bits (it used to be projected again at every later iteration), and the form
    is chosen without the step count (the auto form used to switch at one step)."""
    head = ValueHead(8, [6, 5], seed=4)
    mlp = with_first_gram(head.float32_weights())
    run = ascend_gram_float32 if form == "gram" else ascend_float32
    gen = torch.Generator().manual_seed(5)
    states = torch.randn(5, 8, generator=gen)
    alpha = torch.tensor([3.0, 0.0, 2.0, 4.0, 1.5])
    steps = torch.tensor([1, 3, 0, 4, 2])
    max_norm = (torch.tensor([0.2, 0.3, float("inf"), 0.1, 0.25]) if radius == "per-row"
                else radius)
    batch = run(mlp, states, alpha, steps, 4, max_norm).clone()
    assert torch.equal(batch, run(mlp, states, alpha, steps, 11, max_norm))
    for r in range(5):  # each row alone, for its own steps (other BLAS shapes: not bitwise)
        own_radius = max_norm[r:r + 1] if isinstance(max_norm, torch.Tensor) else max_norm
        own = run(mlp, states[r:r + 1], alpha[r:r + 1], steps[r:r + 1], int(steps[r]),
                  own_radius)
        torch.testing.assert_close(own, batch[r:r + 1], rtol=1e-5, atol=1e-6)
    if radius is not None:  # the projection is on: these steps overshoot it
        expected = 0.1 if radius == "per-row" else 0.3
        assert float(batch[3].norm()) == pytest.approx(expected, rel=1e-5)
    assert choose_form("auto", "torch", [6, 5], 8) == "gram"  # whatever the steps


@pytest.mark.parametrize("form", ["direct", "gram"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("widths", [[48, 24], [6, 64], [7, 100, 30]])
def test_batch_invariant_torch_ascent_gives_a_row_the_same_bits_in_any_batch(form, dtype,
                                                                              widths):
    """``batch_invariant`` on the torch backend: a row's edit is bit-identical alone, in a
    batch of 40 and in sub-batches at other offsets (plain torch products differ by ~1e-6
    there: BLAS picks its kernel by the row count, and batch_invariant used to be ignored on
    this backend). Heads with a narrow layer too: in 16-row slabs MKL (an AMD EPYC) gave a
    row other bits by its position in the slab. Per-row steps (0 included), alpha
    (0 included) and radii (inf included), on fresh random inputs each run."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    head = ValueHead(40, widths, seed=int(torch.randint(0, 1000, ())))
    rows = 40
    states = (torch.randn(rows, 40, generator=gen) * 3).to(dtype)
    alpha = torch.rand(rows, generator=gen) * 2
    alpha[::7] = 0.0
    steps = torch.randint(0, 9, (rows,), generator=gen)
    radius = torch.where(torch.rand(rows, generator=gen) < 0.5, torch.full((rows,), math.inf),
                         torch.rand(rows, generator=gen) + 0.1)
    run = lambda s, a, n, r, invariant: head.ascend(  # noqa: E731
        s, a, n, max_norm=r, backend="torch", form=form, batch_invariant=invariant)
    full = run(states, alpha, steps, radius, True)
    for r in range(rows):
        alone = run(states[r:r + 1], alpha[r:r + 1], steps[r:r + 1], radius[r:r + 1], True)
        assert torch.equal(alone[0], full[r]), f"row {r}"
    for start, count in ((3, 17), (5, 33), (0, 16)):
        part = slice(start, start + count)
        assert torch.equal(run(states[part], alpha[part], steps[part], radius[part], True),
                           full[part])
    plain = run(states, alpha, steps, radius, False)  # the same ascent, up to rounding
    torch.testing.assert_close(plain.float(), full.float(), rtol=2e-2 if dtype != torch.float32
                               else 1e-5, atol=2e-2 if dtype != torch.float32 else 1e-5)


def test_expected_hidden_size_must_be_an_int(tmp_path):
    """A string "4" was compared with 4 and reported as 'hidden_size 4 but the model's 4';
    NumPy's integers are integers (they were refused as not ints)."""
    ValueHead(4, [8], seed=0).save(tmp_path / "h")
    for bad in ("4", True, 4.0):
        with pytest.raises(ValueHeadError, match="expected_hidden_size must be a positive "
                                                 f"integer, got {bad!r}"):
            ValueHead.load(tmp_path / "h", expected_hidden_size=bad)
    assert ValueHead.load(tmp_path / "h", expected_hidden_size=4).hidden_size == 4
    assert ValueHead.load(tmp_path / "h", expected_hidden_size=np.int64(4)).hidden_size == 4


def test_numpy_integers_are_integers_and_bools_are_not_numbers():
    """NumPy sizes and seeds build a head (the engine's config takes them too); a float seed
    is a clear error, not torch's; bools inside per-row lists are refused as a single bool
    is (True became a radius of 1.0, an alpha of 1); a per-row NumPy radius is taken as a
    per-row list is."""
    head = ValueHead(np.int64(8), [np.int32(4)], seed=np.int64(3))
    assert head.hidden_size == 8 and head.widths == [4] and type(head.hidden_size) is int
    assert all(torch.equal(a, b) for a, b in zip(head.parameters(),
                                                 ValueHead(8, [4], seed=3).parameters()))
    with pytest.raises(ValueHeadError, match="seed must be an integer or None, got 1.5"):
        ValueHead(8, [4], seed=1.5)
    states = torch.randn(3, 8)
    for options, message in ((dict(alpha=[True, 0.5, 0.5]), "alpha must be numbers, not bools"),
                             (dict(steps=[1, True, 2]), "steps must be numbers, not bools"),
                             (dict(max_norm=[1.0, True, None]),
                              "per-row max_norm must be numbers, not bools")):
        with pytest.raises(ValueError, match=message):
            head.ascend(states, **{"alpha": 0.5, "steps": 2, **options})
    radii = np.array([0.1, 1.0, np.inf])
    assert torch.equal(head.ascend(states, 0.5, 2, max_norm=radii),
                       head.ascend(states, 0.5, 2, max_norm=[0.1, 1.0, None]))


@pytest.mark.parametrize("options, message", [
    (dict(alpha=torch.full((2, 2), 0.5)),
     r"alpha must be one value or one per row, got shape \[2, 2\]"),
    (dict(steps=torch.ones(2, 2, dtype=torch.int64)), r"steps must be one value or one per row"),
    (dict(max_norm=torch.ones(2, 2)), r"max_norm must be one radius or one per row"),
    (dict(steps=True), "steps must be a number, not a bool"),
    (dict(alpha=torch.tensor([True, False, True, True])), "alpha must be a number, not a bool"),
])
def test_row_controls_of_the_wrong_shape_or_kind_are_refused(options, message):
    """A [2, 2] alpha for 4 rows was read as four rows; True as one step."""
    head = ValueHead(8, [8], seed=0)
    arguments = {"alpha": 0.5, "steps": 3, **options}
    with pytest.raises(ValueError, match=message):
        head.ascend(torch.randn(4, 8), **arguments)


def _matmul_settings():
    """The process-wide fp32 matmul settings: the global one and cuBLAS's and oneDNN's."""
    return (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.fp32_precision,
            torch.backends.mkldnn.matmul.fp32_precision)


@pytest.fixture
def restore_matmul_precision():
    saved = _matmul_settings()
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cuda.matmul.fp32_precision = saved[1]
    torch.backends.mkldnn.matmul.fp32_precision = saved[2]


def _lower_precision(setting):
    """The caller's settings: through the global call (as vLLM does), or only cuBLAS's
    through the per-backend API, which leaves the global value disagreeing with it (torch
    then refuses to read the global value)."""
    if setting == "cuda tf32 alone":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    else:
        torch.set_float32_matmul_precision(setting)
    return (torch.backends.cuda.matmul.fp32_precision,
            torch.backends.mkldnn.matmul.fp32_precision)


@pytest.mark.parametrize("setting", ["high", "medium", "cuda tf32 alone"])
def test_torch_ascent_runs_its_products_in_full_fp32_and_restores_the_setting(
        setting, restore_matmul_precision, monkeypatch):
    """vLLM sets the process-wide precision from VLLM_FLOAT32_MATMUL_PRECISION; "high" or
    "medium" let cuBLAS use TF32 (and oneDNN bf16), but the torch path is the exact one.
    Every product of both forms runs with full-precision ("ieee") fp32 on both backends,
    with the global value agreeing ("highest": torch raises where they disagree), and the
    caller's settings are back afterwards, also when the ascent raises."""
    import vllm_recontrol.ascent as ascent

    seen = []
    matmul_into = ascent._matmul_into

    def recording(a, b, out, bias):
        seen.append(_matmul_settings())
        matmul_into(a, b, out, bias)

    monkeypatch.setattr(ascent, "_matmul_into", recording)
    head = ValueHead(16, [12, 8], seed=2)
    states = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    before = _lower_precision(setting)
    assert "tf32" in before  # the setting really lowers them
    for form in ("direct", "gram"):
        head.ascend(states, 0.5, 3, backend="torch", form=form)
        assert (torch.backends.cuda.matmul.fp32_precision,
                torch.backends.mkldnn.matmul.fp32_precision) == before
        if setting != "cuda tf32 alone":
            assert torch.get_float32_matmul_precision() == setting
    assert seen and set(seen) == {("highest", "ieee", "ieee")}
    mlp = head.float32_weights()  # no first_gram: the Gram form raises inside
    with pytest.raises(ValueError, match="first_gram"):
        ascend_gram_float32(mlp, states, torch.full((5,), 0.5), torch.full((5,), 3), 3)
    assert (torch.backends.cuda.matmul.fp32_precision,
            torch.backends.mkldnn.matmul.fp32_precision) == before


@pytest.mark.parametrize("form", ["direct", "gram"])
def test_torch_ascent_bits_do_not_depend_on_the_matmul_precision_setting(
        form, restore_matmul_precision):
    """On this machine's CPU (AVX512-BF16), "medium" changes the bits of fp32 products of
    these shapes through oneDNN; the ascent must give the same bits as under "highest". (On
    a CPU where "medium" changes nothing this cannot fail; the test above still checks the
    setting inside.)"""
    head = ValueHead(256, [256, 64], seed=3)
    states = torch.randn(32, 256, generator=torch.Generator().manual_seed(1))
    torch.set_float32_matmul_precision("highest")
    exact = head.ascend(states, 0.5, 6, backend="torch", form=form)
    for setting in ("medium", "high"):
        torch.set_float32_matmul_precision(setting)
        assert torch.equal(head.ascend(states, 0.5, 6, backend="torch", form=form), exact), \
            setting


def test_pinned_precision_regions_of_two_threads_leave_the_callers_setting(
        restore_matmul_precision):
    """Two threads' ascents overlapping: the second waits for the first (the settings are the
    process's), so neither restores the other's pin: the caller's "high" is back after both
    (before, the thread leaving last restored "highest" for good)."""
    import threading
    import time

    from vllm_recontrol.ascent import exact_fp32_products

    torch.set_float32_matmul_precision("high")
    inside, first_left, seen = threading.Event(), threading.Event(), []

    def first():
        with exact_fp32_products():
            inside.set()
            time.sleep(0.3)  # the second thread tries to enter meanwhile
            seen.append(torch.get_float32_matmul_precision())
        first_left.set()

    def second():
        inside.wait(5)
        with exact_fp32_products():
            first_left.wait(5)  # stay inside until the first has left
            seen.append(torch.get_float32_matmul_precision())

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert seen == ["highest", "highest"]
    assert torch.get_float32_matmul_precision() == "high"


class _RecordingSafeOpen:
    """safetensors.safe_open, recording which tensors are read whole."""

    def __init__(self, real, read):
        self.real, self.read = real, read

    def __call__(self, *args, **kwargs):
        recording = self

        class Handle:
            def __enter__(self):
                self.inner = recording.real(*args, **kwargs).__enter__()
                return self

            def __exit__(self, *exc):
                return self.inner.__exit__(*exc)

            def __getattr__(self, name):
                return getattr(self.inner, name)

            def get_tensor(self, name):
                recording.read.append(name)
                return self.inner.get_tensor(name)

        return Handle()


@pytest.mark.parametrize("change, message", [
    ({"junk": torch.zeros(256, 256)}, r"unexpected \['junk'\]"),
    ({"layers.0.weight": torch.zeros(256, 256)}, r"layers.0.weight has shape \[256, 256\]"),
])
def test_bad_weights_are_refused_from_the_header_before_any_tensor_is_read(
        tmp_path, monkeypatch, change, message):
    import safetensors
    from safetensors.torch import load_file, save_file

    path = _saved(tmp_path)
    tensors = {**load_file(str(path / "model.safetensors")), **change}
    save_file(tensors, str(path / "model.safetensors"))
    read = []
    monkeypatch.setattr(safetensors, "safe_open", _RecordingSafeOpen(safetensors.safe_open, read))
    with pytest.raises(ValueHeadError, match=message):
        ValueHead.load(path)
    assert read == []
    _saved(tmp_path)  # a good head still loads through the recording: it reads each tensor
    ValueHead.load(path)
    assert sorted(read) == ["layers.0.bias", "layers.0.weight", "layers.1.bias",
                            "layers.1.weight"]


def test_an_oversized_config_is_refused_before_it_is_read(tmp_path, monkeypatch):
    from vllm_recontrol import head_files

    path = _saved(tmp_path)
    monkeypatch.setattr(head_files, "MAX_CONFIG_BYTES", 64)
    with pytest.raises(ValueHeadError, match=r"config.json is \d+ bytes, more than a head's"):
        ValueHead.load(path)


def test_threads_sharing_a_head_get_their_own_edits(monkeypatch):
    """The ascent's buffers are the head's own and reused: a second thread's ascent with
    the same head, run between the first's ascent and its reading of the result,
    overwrote it (seen as 5-60 of 3000 edits wrong, by up to the whole edit). Here the
    second thread is started at exactly that point and given a second to run to its end:
    the head is held meanwhile, so it waits, and both get their own edits."""
    import threading

    from vllm_recontrol import value_head as module

    head = ValueHead(64, [64], seed=2)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 64, generator=gen), 3 * torch.randn(16, 64, generator=gen)
    want_x, want_y = head.ascend(x, 0.5, 10), head.ascend(y, 0.5, 10)
    original = {name: getattr(module, name) for name in ("ascend_float32", "ascend_gram_float32")}
    second: dict = {}

    def interleaving(name):
        def run(*args, **kwargs):
            u = original[name](*args, **kwargs)  # a view of the head's buffer
            if threading.current_thread() is threading.main_thread() and not second:
                second["thread"] = threading.Thread(
                    target=lambda: second.setdefault("out", head.ascend(y, 0.5, 10)))
                second["thread"].start()
                second["thread"].join(timeout=1.0)
            return u
        return run

    for name in original:
        monkeypatch.setattr(module, name, interleaving(name))
    got_x = head.ascend(x, 0.5, 10)
    second["thread"].join()
    assert torch.equal(got_x, want_x) and torch.equal(second["out"], want_y)


def test_a_float64_head_loads_as_float64_exactly_and_loading_draws_no_random_numbers(
        tmp_path):
    """load built the head in float32 and converted after the copy: float64 weights were
    rounded (its bytes and save id changed on the next save); and torch's initialisation of
    the layers it overwrote drew from the global generator."""
    head = ValueHead(4, [3], seed=0).double()
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.add_(1e-12)
    head.save(tmp_path / "h")
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    loaded = ValueHead.load(tmp_path / "h", dtype=torch.float64)
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(a, b) for a, b in zip(head.parameters(), loaded.parameters()))
    loaded.save(tmp_path / "again")
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == \
        (tmp_path / "h" / "model.safetensors").read_bytes()
    with torch.no_grad():
        head.layers[0].bias[0] = 1e200
    head.save(tmp_path / "big")
    assert ValueHead.load(tmp_path / "big", dtype=torch.float64).layers[0].bias[0] == 1e200
    with pytest.raises(ValueHeadError, match=r"layers.0.bias has values that do not fit "
                                             r"torch.float32"):
        ValueHead.load(tmp_path / "big")


def test_nan_or_infinity_in_a_config_is_refused_by_name(tmp_path):
    """Python's json reads them; the head then printed invalid JSON in inspect --json and
    could not be saved again."""
    ValueHead(4, [3], seed=0, metadata={"mse": 1.0}).save(tmp_path)
    config = tmp_path / "config.json"
    text = config.read_text()
    config.write_text(text.replace('"mse": 1.0', '"mse": NaN'))
    with pytest.raises(ValueHeadError, match=r"config.json is not valid JSON: NaN is not a "
                                             r"JSON value"):
        ValueHead.load(tmp_path)
    config.write_text(text.replace('"mse": 1.0', '"mse": -1e400'))  # read as -inf
    with pytest.raises(ValueHeadError, match=r"not valid JSON: -1e400 is beyond a float's"):
        ValueHead.load(tmp_path)


def test_a_path_that_cannot_be_looked_at_is_a_value_head_error():
    with pytest.raises(ValueHeadError, match=r"cannot be looked at \(File name too long\)"):
        ValueHead.load("/tmp/" + "x" * 300)


def test_a_path_that_cannot_be_looked_at_is_named_whatever_pathlib_answers(tmp_path,
                                                                          monkeypatch):
    """Whether Path.exists raises or answers False on a lookup that fails (a name too long,
    a folder the user may not search) depends on the Python version; with False the head
    read as missing, or as a hub repository. Here pathlib answers as os.path does (False)."""
    import os.path
    import pathlib

    for name, lenient in (("exists", os.path.exists), ("is_dir", os.path.isdir),
                          ("is_file", os.path.isfile)):
        monkeypatch.setattr(pathlib.Path, name, lambda self, _f=lenient, **kw: _f(self))
    with pytest.raises(ValueHeadError, match=r"cannot be looked at \(File name too long\)"):
        ValueHead.load("/tmp/" + "x" * 300)
    with pytest.raises(ValueHeadError, match=r"config.json cannot be looked at \(File name too "
                       r"long\)"):
        ValueHead.load(_long_folder(tmp_path))


def test_a_weights_file_with_a_header_no_head_has_is_refused_unparsed(tmp_path):
    """A model's weights renamed, or a hostile file: an 89 MB header took 2.2 GB to parse
    and its tensor names made a 17 MB message; the length (the first 8 bytes) decides."""
    import struct

    ValueHead(4, [3], seed=0).save(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(struct.pack("<Q", 50 * 1024 * 1024) + b"{" + b" " * 64)
    with pytest.raises(ValueHeadError, match=r"a safetensors header of 52428800 bytes, more "
                                             r"than a head of 4 tensors holds"):
        ValueHead.load(tmp_path)
    weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n")
    with pytest.raises(ValueHeadError, match=r"is a Git LFS pointer, not the weights: fetch "
                                             r"them \(git lfs pull\)"):
        ValueHead.load(tmp_path)


def test_a_weights_file_with_many_unexpected_tensors_names_ten(tmp_path):
    from safetensors.torch import save_file

    ValueHead(4, [3], seed=0).save(tmp_path)
    tensors = {f"extra.{i:03d}": torch.zeros(1) for i in range(500)}
    save_file({**tensors, "layers.0.weight": torch.zeros(3, 4)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueHeadError) as caught:
        ValueHead.load(tmp_path)
    message = str(caught.value)
    assert "'extra.009'] and 490 more" in message and "extra.010" not in message
    assert len(message) < 1000


def test_the_first_edit_that_falls_back_on_a_cpu_is_logged_at_once(caplog):
    """A direct caller whose alpha is too large got every row back unedited and no word,
    unless it read nonfinite_rows(); later fallbacks wait for that read (the engine's)."""
    head = ValueHead(8, [8], seed=0)
    # seeded: about 1 draw in 200 has a row whose gradient is 0 (that row stays finite)
    states = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)).half()
    with caplog.at_level("WARNING", logger="vllm.recontrol"):
        out = head.ascend(states, 1e6, 50)
        assert torch.equal(out, states)
        assert [r.getMessage() for r in caplog.records if "not finite" in r.getMessage()] == [
            "RE-Control edit was not finite for 4 row(s) (total 4); those rows were left "
            "unedited. Lower alpha or steps."]
        head.ascend(states, 1e6, 50)
        assert sum("not finite" in r.getMessage() for r in caplog.records) == 1
        assert head.nonfinite_rows() == 8
        assert sum("not finite" in r.getMessage() for r in caplog.records) == 2


def test_load_leaves_the_global_generator_alone_and_fills_every_value(tmp_path):
    """Loading draws no random number (a seeded script's later numbers would depend on a
    load) and allocates without initialising, so every value must come from the file:
    a head of other values saved over the same shapes loads as itself, bit for bit."""
    saved = ValueHead(16, [12, 8], seed=3)
    saved.save(tmp_path / "h")
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    loaded = ValueHead.load(tmp_path / "h")
    assert torch.equal(torch.rand(4), expected)
    for (name, a), b in zip(saved.named_parameters(), loaded.parameters()):
        assert torch.equal(a, b), name
    for dtype in (torch.float64, torch.bfloat16):
        again = ValueHead.load(tmp_path / "h", dtype=dtype)
        for a, b in zip(saved.parameters(), again.parameters()):
            assert torch.equal(a.to(dtype), b)
