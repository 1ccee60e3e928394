"""RowControls mirrors vLLM's persistent-batch updates and arms exactly one logits call."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch

from vllm_recontrol.config import RowControl
from vllm_recontrol.controller import RowControls, rows_for_engine


def whole_batch(rows, count):
    """The single group of a sampling call whose controlled rows share one head."""
    groups = rows.take(count)
    assert len(groups) == 1 and groups[0].rows is None
    return groups[0].alpha, groups[0].steps, groups[0].max_steps


def fresh(batch):
    rows = RowControls()
    rows.reset(torch.device("cpu"))
    for i, control in enumerate(batch):
        rows.set(i, control)
    rows.resize(len(batch))
    return rows


def test_take_is_valid_once_per_pass():
    rows = fresh([RowControl(0.5, 3), RowControl(0.0, 0)])
    assert rows.take(2) is None  # not armed: a profiling or warm-up call
    rows.arm()
    alpha, steps, max_steps = whole_batch(rows, 2)
    assert alpha.tolist() == [0.5, 0.0] and steps.tolist() == [3, 0] and max_steps == 3
    assert rows.take(2) is None  # a second call in the same pass (prompt logprobs)


def test_wrong_row_count_passes_through():
    rows = fresh([RowControl(0.5, 3)])
    rows.arm()
    assert rows.take(5) is None


def test_no_controlled_row_costs_only_a_check():
    rows = fresh([RowControl(0.0, 5), RowControl(1.0, 0)])
    rows.arm()
    assert rows.take(2) is None


def test_swap_move_and_remove_follow_vllm_semantics():
    rows = fresh([RowControl(1.0, 1), RowControl(2.0, 2), RowControl(3.0, 3)])
    rows.clear(0)             # removed
    rows.swap(1, 2)           # SWAP
    rows.move(2, 0)           # UNIDIRECTIONAL: 0 takes 2's request, 2 empties
    rows.resize(2)
    rows.arm()
    alpha, steps, _ = whole_batch(rows, 2)
    assert alpha.tolist() == [2.0, 3.0] and steps.tolist() == [2, 3]


def test_uncontrolled_rows_get_zero_steps_on_device():
    rows = fresh([RowControl(0.0, 9), RowControl(0.7, 2)])
    rows.arm()
    alpha, steps, max_steps = whole_batch(rows, 2)
    assert steps.tolist() == [0, 2] and max_steps == 2


def test_rows_of_several_heads_form_one_group_per_head():
    rows = fresh([RowControl(1.0, 3, head="b"), RowControl(0.5, 2), RowControl(0.0, 9, head="b"),
                  RowControl(2.0, 5, head="b"), RowControl(0.7, 0), RowControl(0.2, 1)])
    rows.arm()
    groups = rows.take(6)
    assert [g.head for g in groups] == ["b", "default"]
    b, default = groups
    assert b.rows.tolist() == [0, 3] and b.alpha.tolist() == [1.0, 2.0]
    assert b.steps.tolist() == [3, 5] and b.max_steps == 5
    assert default.rows.tolist() == [1, 5] and default.steps.tolist() == [2, 1]
    assert default.max_steps == 2


def test_one_head_in_use_takes_the_whole_batch_even_if_it_is_not_the_default():
    rows = fresh([RowControl(1.0, 3, head="b"), RowControl(0.0, 0), RowControl(0.5, 2, head="b")])
    rows.arm()
    (group,) = rows.take(3)
    assert group.head == "b" and group.rows is None and group.steps.tolist() == [3, 0, 2]


def test_each_row_is_edited_by_the_head_it_named():
    """Rows of two heads (different depths) in one call: each equals the autograd ascent of
    its own head on that row alone; uncontrolled rows come back untouched."""
    from oracle import autograd_ascent
    from vllm_recontrol import ValueHead
    from vllm_recontrol.config import EngineSettings, HeadSpec
    from vllm_recontrol.controller import EditController

    heads = {"default": ValueHead(8, [16], seed=1), "deep": ValueHead(8, [12, 6], seed=2)}
    for head in heads.values():
        with torch.no_grad():
            head.layers[0].weight.mul_(3.0)
    batch = [RowControl(1.0, 3, head="deep"), RowControl(0.5, 2), RowControl(0.0, 0),
             RowControl(2.0, 5, head="deep"), RowControl(1.5, 4)]
    settings = EngineSettings(value_head="h", value_heads=(("deep", HeadSpec("h2")),),
                              backend="torch")
    controller = EditController(heads, settings, fresh(batch))
    states = torch.randn(len(batch), 8, generator=torch.Generator().manual_seed(0))
    controller.rows.arm()
    edited = controller.maybe_edit(states)
    for i, control in enumerate(batch):
        if not control.active:
            assert torch.equal(edited[i], states[i])
            continue
        with torch.enable_grad():
            expected = autograd_ascent(heads[control.head], states[i:i + 1], control.alpha,
                                       control.steps)[0]
        assert torch.allclose(edited[i], expected, atol=1e-5), (i, control)
        other = "default" if control.head == "deep" else "deep"
        with torch.enable_grad():
            wrong = autograd_ascent(heads[other], states[i:i + 1], control.alpha, control.steps)
        assert not torch.allclose(edited[i], wrong[0], atol=1e-3), (i, control)


def test_each_row_is_projected_onto_its_own_radius():
    """Radii as requests resolve them: a head's own max_norm caps its rows, the engine's the
    others, and a request's own can tighten but not loosen it. Each row equals the autograd
    ascent projected onto its radius (which its unprojected ascent exceeds), and a row
    without a cap is the same bits as in a batch where nothing is capped."""
    from oracle import autograd_ascent
    from vllm_recontrol import ValueHead
    from vllm_recontrol.config import EngineSettings, HeadSpec, resolve_request
    from vllm_recontrol.controller import EditController

    heads = {"default": ValueHead(8, [16], seed=1), "deep": ValueHead(8, [12, 6], seed=2),
             "free": ValueHead(8, [10], seed=3)}
    for head in heads.values():
        with torch.no_grad():
            head.layers[0].weight.mul_(3.0)
    settings = EngineSettings(value_head="h", max_norm=0.3, backend="torch", value_heads=(
        ("deep", HeadSpec("h2", max_norm=0.05)), ("free", HeadSpec("h3"))))
    requests = [({"recontrol_head": "deep", "recontrol_alpha": 1.0, "recontrol_steps": 3}, 0.05),
                ({"recontrol_alpha": 2.0, "recontrol_steps": 4}, 0.3),
                ({"recontrol_alpha": 2.0, "recontrol_steps": 4, "recontrol_max_norm": 0.1}, 0.1),
                ({"recontrol_alpha": 2.0, "recontrol_steps": 5, "recontrol_max_norm": 5.0}, 0.3),
                ({"recontrol_head": "deep", "recontrol_alpha": 2.0, "recontrol_steps": 5}, 0.05)]
    batch = [resolve_request(args, settings) for args, _ in requests]
    assert [c.max_norm for c in batch] == [cap for _, cap in requests]
    controller = EditController(heads, settings, fresh(batch))
    states = torch.randn(len(batch), 8, generator=torch.Generator().manual_seed(0))
    controller.rows.arm()
    edited = controller.maybe_edit(states)
    for i, control in enumerate(batch):
        head, cap = heads[control.head], control.max_norm
        with torch.enable_grad():
            free = autograd_ascent(head, states[i:i + 1], control.alpha, control.steps)[0]
            capped = autograd_ascent(head, states[i:i + 1], control.alpha, control.steps,
                                     max_norm=cap)[0]
        assert float((free - states[i]).norm()) > 1.5 * cap, (i, "the cap must bind")
        assert float((edited[i] - states[i]).norm()) <= cap * (1 + 1e-5)
        assert torch.allclose(edited[i], capped, atol=1e-5), (i, control)

    # The "free" head has no radius anywhere: its rows run unprojected unless they ask.
    free_settings = EngineSettings(value_head="h", backend="torch", value_heads=(
        ("free", HeadSpec("h3")),))
    mixed = [resolve_request({"recontrol_head": "free", "recontrol_steps": 4, **extra},
                             free_settings)
             for extra in ({}, {"recontrol_max_norm": 0.05}, {})]
    assert [c.max_norm for c in mixed] == [None, 0.05, None]
    uncapped = [mixed[0], mixed[0], mixed[2]]
    runs = []
    for rows in (mixed, uncapped):
        ctl = EditController(heads, free_settings, fresh(rows))
        ctl.rows.arm()
        runs.append(ctl.maybe_edit(states[:3]))
    assert torch.equal(runs[0][[0, 2]], runs[1][[0, 2]])  # inf radius: the same bits
    assert float((runs[0][1] - states[1]).norm()) <= 0.05 * (1 + 1e-5)
    assert not torch.equal(runs[0][1], runs[1][1])


def test_stats_line_counts_calls_and_controlled_rows_per_head(monkeypatch, caplog):
    """Every stats interval (vLLM's VLLM_LOG_STATS_INTERVAL, passed by the adapter) the
    controller logs the sampling calls it edited and the controlled rows per head
    (uncontrolled rows not counted), then starts over."""
    from vllm_recontrol import ValueHead
    from vllm_recontrol.config import EngineSettings, HeadSpec
    from vllm_recontrol.controller import EditController

    heads = {"default": ValueHead(8, [4], seed=1), "deep": ValueHead(8, [4, 4], seed=2)}
    settings = EngineSettings(value_head="h", value_heads=(("deep", HeadSpec("h2")),),
                              backend="torch")
    batch = [RowControl(1.0, 3, head="deep"), RowControl(0.5, 2), RowControl(0.0, 0),
             RowControl(2.0, 5, head="deep")]
    controller = EditController(heads, settings, fresh(batch), stats_interval=3600)
    states = torch.randn(len(batch), 8, generator=torch.Generator().manual_seed(0))
    with caplog.at_level("INFO", logger="vllm.recontrol.controller"):
        for _ in range(3):
            controller.rows.arm()
            controller.maybe_edit(states)
        assert "sampling calls edited" not in caplog.text  # the hour has not passed
        controller._stats.since -= 3600
        controller.rows.arm()
        controller.maybe_edit(states)
    lines = [r.getMessage() for r in caplog.records if "sampling calls edited" in r.getMessage()]
    assert len(lines) == 1
    # the hour moved back plus the seconds the test took (a stalled machine: more than one)
    assert re.match(r"RE-Control: 4 sampling calls edited in the last 36\d\d\.\d s", lines[0])
    assert "12 controlled rows (deep 8, default 4); 0 non-finite" in lines[0]
    assert controller._stats.calls == 0 and not controller._stats.rows  # a new window


def test_engines_do_not_share_rows():
    assert rows_for_engine("a") is rows_for_engine("a")
    assert rows_for_engine("a") is not rows_for_engine("b")


def test_warm_up_only_on_cuda_with_steps():
    from vllm_recontrol.config import EngineSettings
    from vllm_recontrol.controller import warm_up_rows

    on = EngineSettings(value_head="h")
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert warm_up_rows(cuda, on, 256) == 256
    assert warm_up_rows(cpu, on, 256) is None
    assert warm_up_rows(cuda, on, None) is None
    assert warm_up_rows(cuda, EngineSettings(value_head="h", warmup_steps=()), 256) is None
    assert warm_up_rows(cuda, EngineSettings(value_head="h", steps=0), 256) is None


def test_first_pass_through_call_warms_up_once():
    """vLLM's profiling run is the first logits call with no armed pass: the controller warms
    up there, once, and the call passes through."""
    from vllm_recontrol import ValueHead
    from vllm_recontrol.config import EngineSettings
    from vllm_recontrol.controller import EditController

    head = ValueHead(8, [4], seed=0)
    with torch.no_grad():  # every hidden unit active at the states below: the edit moves them
        head.layers[0].bias.fill_(100.0)
    settings = EngineSettings(value_head="h", backend="torch", warmup_steps=(5, 9))
    rows = fresh([RowControl(alpha=1.0, steps=2)])
    controller = EditController(head, settings, rows, max_rows=48)
    assert controller._warm_rows is None  # torch on CPU: nothing to warm
    calls = []
    head.warm_up = lambda max_rows, counts, **kw: calls.append((max_rows, counts, kw)) or 7
    controller._warm_rows = 48  # as on CUDA with the Triton backend
    states = torch.randn(1, 8, generator=torch.Generator().manual_seed(0))
    assert controller.maybe_edit(states) is states  # not armed: profiling, passes through
    assert calls == [(48, (5, 9), dict(max_norm=None, backend="torch", precision="auto",
                                       cuda_graphs=True, batch_invariant=False,
                                       also_projected=False, form="auto"))]
    assert controller.maybe_edit(states) is states
    rows.arm()
    assert not torch.equal(controller.maybe_edit(states), states)  # a real edit
    assert len(calls) == 1


def test_a_failing_ascent_at_warm_up_fails_engine_start():
    """A deterministic failure of the ascent itself (a kernel that does not compile for this
    GPU, ...) would kill the running engine at the first controlled request: at warm-up it
    is a ConfigError naming the head, the resolved backend, precision and form, and the
    original error."""
    from vllm_recontrol import ValueHead
    from vllm_recontrol.config import EngineSettings, HeadSpec
    from vllm_recontrol.controller import EditController
    from vllm_recontrol.errors import ConfigError

    heads = {"default": ValueHead(8, [4], seed=0), "td": ValueHead(8, [6, 3], seed=1)}
    settings = EngineSettings(value_head="h", backend="torch", ascent_form="gram",
                              value_heads=(("td", HeadSpec("t")),))
    controller = EditController(heads, settings, fresh([]), max_rows=16)
    heads["default"].warm_up = lambda rows, counts, **kw: 3

    def broken(rows, counts, **kw):
        raise RuntimeError("no kernel image is available for execution on the device")

    heads["td"].warm_up = broken
    controller._warm_rows = 16  # as on CUDA
    with pytest.raises(ConfigError, match=r"value head 'td' failed at engine start \(torch "
                                          r"backend, fp32 products, gram form\): RuntimeError: "
                                          r"no kernel image .*\"backend\""):
        controller.warm_up()
    assert controller._warm_rows is None  # not retried on the next call

    def out_of_memory(rows, counts, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    heads["td"].warm_up = out_of_memory  # memory, not the backend: the advice says so
    controller._warm_rows = 16
    with pytest.raises(ConfigError, match=r"OutOfMemoryError: CUDA out of memory.*lower "
                                          r"--max-num-seqs or --gpu-memory-utilization"):
        controller.warm_up()


def test_a_failed_graph_capture_at_warm_up_only_logs(monkeypatch, caplog):
    """A capture that fails while the eager ascent works loses only the speed-up: the
    warm-up completes, the failure is one warning, and the shape runs eagerly with the
    right answer; if the ascent itself fails too, engine start fails. (CPU: the head's
    warm-up runs the graph runner, the path a CUDA head's warm-up takes, with capture
    stubbed.)"""
    from vllm_recontrol import ValueHead, ascent_graphs
    from vllm_recontrol.ascent import ascend_float32
    from vllm_recontrol.config import EngineSettings
    from vllm_recontrol.controller import EditController
    from vllm_recontrol.errors import ConfigError

    def no_capture(fn, device, pool):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(ascent_graphs.torch.cuda, "graph_pool_handle", lambda: "pool")
    monkeypatch.setattr(ascent_graphs, "capture_graph", no_capture)
    head = ValueHead(8, [4], seed=0)
    states = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    alpha, steps = torch.full((16,), 0.5), torch.full((16,), 3)
    results = []

    def graph_warm_up(rows, counts, **kw):  # ValueHead.warm_up's graph path, as on CUDA
        runner = ascent_graphs.AscentGraphs()
        for n in counts:
            results.append(runner.run(head.float32_weights(), states[:rows], alpha[:rows],
                                      steps[:rows], n, None, "fp32", backend="torch").clone())
        return len(counts)

    head.warm_up = graph_warm_up
    settings = EngineSettings(value_head="h", backend="torch", ascent_form="direct",
                              warmup_steps=(3,))
    controller = EditController(head, settings, fresh([]), max_rows=16)
    controller._warm_rows = 16  # as on CUDA
    with caplog.at_level("WARNING"):
        assert controller.warm_up() == 1
    assert "capture of the ascent failed (RuntimeError: operation not permitted" in caplog.text
    assert torch.equal(results[0], ascend_float32(head.float32_weights(), states, alpha,
                                                  steps, 3))

    def failing(*args, **kw):
        raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED")

    monkeypatch.setattr(ascent_graphs, "ascend_float32", failing)
    controller._warm_rows = 16
    with pytest.raises(ConfigError, match="torch backend, fp32 products, direct form.*"
                                          "CUBLAS_STATUS_NOT_SUPPORTED"):
        controller.warm_up()


def test_warm_up_covers_every_head():
    """Each head compiles and captures its own graphs at engine start, for the step count
    its requests get by default (or every count of ``warmup_steps`` when given) and its own
    max_norm (graphs are per radius); the run counts add up."""
    from vllm_recontrol import ValueHead
    from vllm_recontrol.config import EngineSettings, HeadSpec
    from vllm_recontrol.controller import EditController

    heads = {"default": ValueHead(8, [4], seed=0), "td": ValueHead(8, [6, 3], seed=1)}
    settings = EngineSettings(value_head="h", backend="torch", steps=30, value_heads=(
        ("td", HeadSpec("t", steps=50, max_norm=0.5)),))
    controller = EditController(heads, settings, fresh([]), max_rows=16)
    calls = {}
    for name, head in heads.items():
        head.warm_up = (lambda name: lambda rows, counts, **kw:
                        calls.setdefault(name, (rows, counts, kw["max_norm"])) and 3)(name)
    controller._warm_rows = 16  # as on CUDA with the Triton backend
    assert controller.warm_up() == 6
    assert calls == {"default": (16, (30,), None), "td": (16, (50,), 0.5)}

    projected = EditController(heads, replace(settings, warmup_projected=True), fresh([]),
                               max_rows=16)
    projected._warm_rows, calls = 16, {}
    for name, head in heads.items():
        head.warm_up = (lambda name: lambda rows, counts, **kw:
                        calls.setdefault(name, kw["also_projected"]) and 3)(name)
    assert projected.warm_up() == 6 and calls == {"default": True, "td": True}
    for name, head in heads.items():
        head.warm_up = (lambda name: lambda rows, counts, **kw:
                        calls.setdefault(name, (rows, counts, kw["max_norm"])) and 3)(name)

    explicit = EditController(heads, replace(settings, warmup_steps=(7, 9)), fresh([]),
                              max_rows=16)
    explicit._warm_rows, calls = 16, {}
    assert explicit.warm_up() == 6
    assert calls == {"default": (16, (7, 9), None), "td": (16, (7, 9), 0.5)}


def test_graph_iterations_round_up_to_a_warmed_count_a_power_of_two_or_max_steps():
    from vllm_recontrol.controller import graph_iterations

    assert [graph_iterations(n, (30,), 200) for n in (0, 1, 2, 3, 5, 9, 17, 30)] == \
        [0, 1, 2, 4, 8, 16, 30, 30]
    assert [graph_iterations(n, (30,), 200) for n in (31, 64, 65, 129, 200)] == \
        [32, 64, 128, 200, 200]
    assert graph_iterations(40, (), 50) == 50  # max_steps below the next power of two
    for n in range(1, 201):  # never below what the batch needs, never twice or more of it
        rounded = graph_iterations(n, (30, 100), 200)
        assert n <= rounded < 2 * n


def test_rounded_loop_counts_leave_every_row_as_it_was():
    """Where CUDA graphs replay the ascent, a batch's loop count is rounded up so that many
    step counts share a few graphs; rows finish at their own steps, so every edit is the
    same bits as with the exact count (the rounding is forced on here, on CPU)."""
    from vllm_recontrol import ValueHead
    from vllm_recontrol.config import EngineSettings
    from vllm_recontrol.controller import EditController

    head = ValueHead(8, [16, 8], seed=3)
    batch = [RowControl(0.5, 3), RowControl(1.0, 5), RowControl(0.0, 0), RowControl(2.0, 1)]
    settings = EngineSettings(value_head="h", backend="torch", max_steps=50)
    states = torch.randn(len(batch), 8, generator=torch.Generator().manual_seed(1))
    edits, counts = [], []
    for rounds in (False, True):
        controller = EditController({"default": head}, settings, fresh(batch))
        controller.rounds_iterations = rounds
        ascend = head.ascend

        def spy(*args, **kwargs):
            counts.append(kwargs["num_iterations"])
            return ascend(*args, **kwargs)

        head.ascend = spy
        try:
            controller.rows.arm()
            edits.append(controller.maybe_edit(states))
        finally:
            del head.ascend
    assert counts == [5, 8]
    assert torch.equal(edits[0], edits[1]) and not torch.equal(edits[0], states)


def test_speculative_rows_repeat_each_request_s_control():
    """Under speculative decoding a request has its drafts plus one rows, in batch order."""
    rows = fresh([RowControl(0.5, 3), RowControl(0.0, 0), RowControl(2.0, 7)])
    rows.arm()
    rows.expect_rows_per_request([3, 1, 2])
    alpha, steps, max_steps = whole_batch(rows, 6)
    assert alpha.tolist() == [0.5, 0.5, 0.5, 0.0, 2.0, 2.0]
    assert steps.tolist() == [3, 3, 3, 0, 7, 7] and max_steps == 7


def test_speculative_row_counts_are_uploaded_again_when_they_change():
    rows = fresh([RowControl(0.5, 3), RowControl(2.0, 7)])
    rows.arm()
    rows.expect_rows_per_request([2, 1])
    assert whole_batch(rows, 3)[1].tolist() == [3, 3, 7]
    rows.arm()  # next pass, batch unchanged, other draft counts
    rows.expect_rows_per_request([1, 3])
    assert whole_batch(rows, 4)[1].tolist() == [3, 7, 7, 7]
    rows.arm()  # a pass without counts: one row per request again
    assert whole_batch(rows, 2)[1].tolist() == [3, 7]


def test_speculative_rows_of_several_heads_are_gathered_per_request():
    rows = fresh([RowControl(0.5, 3, head="b"), RowControl(1.0, 2), RowControl(0.0, 0)])
    rows.arm()
    rows.expect_rows_per_request([2, 3, 2])
    groups = {g.head: g for g in rows.take(7)}
    assert groups["b"].rows.tolist() == [0, 1] and groups["b"].steps.tolist() == [3, 3]
    assert groups["default"].rows.tolist() == [2, 3, 4]
    assert groups["default"].alpha.tolist() == [1.0, 1.0, 1.0]


def test_a_call_of_another_row_count_passes_through_under_speculation():
    rows = fresh([RowControl(0.5, 3), RowControl(2.0, 7)])
    rows.arm()
    rows.expect_rows_per_request([2, 2])
    assert rows.take(2) is None  # one row per request: not this pass's sampling call
    rows.arm()  # the counts belong to one pass only
    assert rows.take(4) is None
