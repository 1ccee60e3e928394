"""RowControls mirrors vLLM's persistent-batch updates and arms exactly one logits call."""

from __future__ import annotations

import torch

from vllm_recontrol.config import RowControl
from vllm_recontrol.controller import RowControls, rows_for_engine


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
    alpha, steps, max_steps = rows.take(2)
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
    alpha, steps, _ = rows.take(2)
    assert alpha.tolist() == [2.0, 3.0] and steps.tolist() == [2, 3]


def test_uncontrolled_rows_get_zero_steps_on_device():
    rows = fresh([RowControl(0.0, 9), RowControl(0.7, 2)])
    rows.arm()
    alpha, steps, max_steps = rows.take(2)
    assert steps.tolist() == [0, 2] and max_steps == 2


def test_engines_do_not_share_rows():
    assert rows_for_engine("a") is rows_for_engine("a")
    assert rows_for_engine("a") is not rows_for_engine("b")
