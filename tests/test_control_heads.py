"""Random control heads as strong as a trained one (the demo's ablation)."""

from __future__ import annotations

import pytest
import torch

from vllm_recontrol import ValueHead
from vllm_recontrol.ascent import AscentWorkspace, value_gradient_into
from vllm_recontrol.evaluation.control_heads import (matched_random_head, mean_gradient_norm,
                                                     save_random_controls)


def closed_form_mean_gradient_norm(head: ValueHead, states: torch.Tensor) -> float:
    """The ascent's own closed-form gradient (ReLU masks, no autograd): an independent
    computation of what control_heads takes by autograd."""
    mlp = head.float32_weights()
    workspace = AscentWorkspace.allocate(mlp, states.shape[0], gram=False)
    workspace.x.copy_(states)
    return float(value_gradient_into(mlp, workspace).norm(dim=1).mean())


@pytest.mark.parametrize("widths", [[24], [24, 16]])
def test_a_random_control_has_the_trained_heads_gradient_norm(widths):
    states = torch.randn(300, 12, generator=torch.Generator().manual_seed(0)) * 3
    trained = ValueHead(12, widths, seed=7)
    with torch.no_grad():
        trained.layers[-1].weight.mul_(5.0)  # not the strength a fresh head has
    target = closed_form_mean_gradient_norm(trained, states)
    assert mean_gradient_norm(trained, states) == pytest.approx(target, rel=1e-5)
    control = matched_random_head(trained, states, seed=1)
    assert closed_form_mean_gradient_norm(control, states) == pytest.approx(target, rel=1e-5)
    fresh = ValueHead(12, widths, seed=1)  # the same draw but for the output layer's scale
    for ours, drawn in zip(control.layers[:-1], fresh.layers[:-1]):
        assert torch.equal(ours.weight, drawn.weight) and torch.equal(ours.bias, drawn.bias)
    assert torch.equal(control.layers[-1].bias, fresh.layers[-1].bias)
    ratio = control.layers[-1].weight / fresh.layers[-1].weight
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio))
    other = matched_random_head(trained, states, seed=2)
    assert not torch.equal(other.layers[0].weight, control.layers[0].weight)


def test_a_16_bit_head_is_measured_without_being_converted():
    states = torch.randn(40, 12, generator=torch.Generator().manual_seed(2))
    head = ValueHead(12, [8], seed=5).to(torch.bfloat16)
    expected = closed_form_mean_gradient_norm(head, states)
    assert mean_gradient_norm(head, states) == pytest.approx(expected, rel=1e-5)
    assert all(p.dtype == torch.bfloat16 for p in head.parameters())


def test_saved_controls_load_as_heads_named_for_eval(tmp_path):
    states = torch.randn(50, 12, generator=torch.Generator().manual_seed(1))
    trained = ValueHead(12, [8], seed=3)
    paths = save_random_controls(trained, states, (4, 5), tmp_path)
    assert sorted(paths) == ["random-4", "random-5"]
    loaded = ValueHead.load(paths["random-4"])
    assert loaded.metadata["control"].startswith("random, seed 4, gradient norm matched to")
    assert closed_form_mean_gradient_norm(loaded, states) == pytest.approx(
        closed_form_mean_gradient_norm(trained, states), rel=1e-5)


def test_a_random_head_without_gradient_on_the_states_is_an_error():
    """States where every ReLU of the drawn head is off leave no direction to scale."""
    trained = ValueHead(4, [3], seed=0)
    dead = torch.full((5, 4), -1e6)  # every unit off for a draw whose weights sum > 0
    control_seed = next(seed for seed in range(200)
                        if mean_gradient_norm(ValueHead(4, [3], seed=seed), dead) == 0.0)
    with pytest.raises(ValueError, match=f"random head of seed {control_seed} has no gradient"):
        matched_random_head(trained, dead, seed=control_seed)
