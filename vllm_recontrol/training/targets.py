"""Regression targets for V(s_t): Bellman with a stop-gradient bootstrap, Monte Carlo, TD(lambda).

Why these exact definitions: the public reference code takes the terminal index with
``mask.argmax()`` (the FIRST valid step) and back-propagates through its bootstrap target.
Here responses are stored back to back with offsets, the terminal state of response r is row
``offsets[r+1] - 1`` (its LAST step: the one that emitted EOS or the last token), and every
target is computed without gradient.

With terminal reward r, zero intermediate rewards and gamma = 1:
- Bellman:   y_t = stopgrad V(s_{t+1}) for t < T,  y_T = r.
- Monte Carlo: y_t = r for every t (with one response per prompt, the Bellman fixed point).
- TD(lambda): y_T = r,  y_t = (1 - lambda) V(s_{t+1}) + lambda y_{t+1};
  lambda = 0 is the Bellman target, lambda = 1 is Monte Carlo.
"""

from __future__ import annotations

from typing import Callable

import torch

TARGETS = ("bellman", "mc", "td-lambda")


def terminal_flags(offsets: torch.Tensor) -> torch.Tensor:
    """[S] bool: True at each response's last step (row offsets[r+1] - 1)."""
    total = int(offsets[-1])
    flags = torch.zeros(total, dtype=torch.bool)
    flags[offsets[1:] - 1] = True
    return flags


def response_of_state(offsets: torch.Tensor) -> torch.Tensor:
    """[S] int64: the response each state row belongs to."""
    lengths = offsets[1:] - offsets[:-1]
    return torch.repeat_interleave(torch.arange(lengths.numel()), lengths)


def mc_targets(offsets: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """[S]: every state's target is its response's reward."""
    return rewards.float()[response_of_state(offsets)]


def bellman_targets(next_values: torch.Tensor, terminal: torch.Tensor,
                    state_rewards: torch.Tensor) -> torch.Tensor:
    """Per row: the reward at a terminal state, else V(s_{t+1}); never carries a gradient."""
    return torch.where(terminal, state_rewards.float(), next_values.detach().float()).detach()


def bootstrap_targets(target_fn: Callable[[torch.Tensor], torch.Tensor], states: torch.Tensor,
                      rows: torch.Tensor, terminal: torch.Tensor,
                      state_rewards: torch.Tensor) -> torch.Tensor:
    """Bellman targets for ``rows`` of back-to-back response states (row + 1 is s_{t+1}).

    ``target_fn`` is V of the bootstrap (target) network; it runs without gradient.
    """
    following = (rows + 1).clamp(max=states.shape[0] - 1)  # unused where terminal
    with torch.no_grad():
        next_values = target_fn(states[following])
    return bellman_targets(next_values, terminal[rows].to(next_values.device),
                           state_rewards[rows].to(next_values.device))


@torch.no_grad()
def lambda_returns(values: torch.Tensor, offsets: torch.Tensor, rewards: torch.Tensor,
                   lam: float) -> torch.Tensor:
    """TD(lambda) targets for every state, vectorised over responses.

    ``values`` [S] holds V(s) of every state. A response's last state gets the reward as
    its target; its value still enters the target of the state before it
    ((1 - lam) V(s_T) + lam r), as every later state's value does.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lam}")
    lengths = offsets[1:] - offsets[:-1]
    count, width = lengths.numel(), int(lengths.max()) if lengths.numel() else 0
    targets = torch.empty_like(values, dtype=torch.float32)
    if count == 0:
        return targets
    step = torch.arange(width).unsqueeze(0)                 # [1, W]
    valid = step < lengths.unsqueeze(1)                       # [R, W]
    rows = offsets[:-1].unsqueeze(1) + step                   # flat index of (r, t)
    padded = torch.zeros(count, width)
    padded[valid] = values.float()[rows[valid]]
    result = torch.zeros(count, width)
    running = rewards.float().clone()                         # y_{t+1} while walking back
    for t in range(width - 1, -1, -1):
        is_last = lengths - 1 == t
        has_next = lengths - 1 > t
        if t + 1 < width:
            blended = (1.0 - lam) * padded[:, t + 1] + lam * running
        else:
            blended = running
        running = torch.where(is_last, rewards.float(), torch.where(has_next, blended, running))
        result[:, t] = running
    targets[rows[valid]] = result[valid]
    return targets


def value_loss(head: Callable[[torch.Tensor], torch.Tensor], states: torch.Tensor,
               targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error of V(states) against fixed targets (gradient flows into V(s_t) only)."""
    return torch.mean((head(states) - targets.detach()) ** 2)
