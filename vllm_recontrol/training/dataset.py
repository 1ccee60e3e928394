"""Labelled states for training, streamed from disk a window of shards at a time.

Why windows: the states of a real data set do not fit in RAM (the reference code needs about
170 GB for HH-RLHF). Only small per-response facts (offsets, prompt index, reward) are kept
for every shard; states are read a few shards at a time (the shuffle buffer), shuffled within
that window, and dropped. The Bellman bootstrap needs s_{t+1} beside s_t, which a window of
whole shards always has (a response never spans two shards).
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .common import DataError, sha256_file
from .labeler import INFO_FILE, label_sets, labels_dir, read_shard_labels
from .shards import (ShardIndex, manifest_sha256, manifest_shards, read_manifest, read_rows,
                     read_shard_index, read_state_rows, shard_status, states_layout)
from .targets import terminal_flags


@dataclass
class ShardEntry:
    name: str
    index: ShardIndex
    rewards: torch.Tensor  # [R] float32, in row order


@dataclass
class Window:
    """Several shards' states back to back, with per-state facts for targets and splitting."""

    states: torch.Tensor         # [N, d], 16-bit as stored
    offsets: torch.Tensor        # [R+1]
    rewards: torch.Tensor        # [R]
    heldout: torch.Tensor        # [R] bool
    terminal: torch.Tensor       # [N] bool
    state_rewards: torch.Tensor  # [N]
    state_heldout: torch.Tensor  # [N] bool

    @property
    def first_rows(self) -> torch.Tensor:
        """Row of s_0 of every response."""
        return self.offsets[:-1]


def rewards_digest(shards: Sequence[ShardEntry]) -> str:
    """A digest of the rewards training reads, shard by shard. Why beside the label set's
    info.json: relabelling with the same source (``label --overwrite`` after the code behind
    a function changed) writes the same info.json, so only the rewards themselves tell a
    checkpoint's labels from the new ones, and a head which labels it learned."""
    digest = hashlib.sha256()
    for shard in shards:
        digest.update(shard.name.encode() + b"\0")
        digest.update(shard.rewards.to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


class LabelledData:
    """A collection folder plus one of its label sets, checked for completeness and shape."""

    def __init__(self, data: str | Path, labels: str | None = None,
                 allow_partial: bool = False) -> None:
        self.path = Path(data)
        self.manifest = read_manifest(self.path)
        self.labels = self._choose_labels(labels)
        info_path = labels_dir(self.path, self.labels) / INFO_FILE
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{info_path} is not valid JSON ({exc}); relabel with "
                            f"`vllm-recontrol label --overwrite`") from exc
        if not isinstance(info, dict):
            raise DataError(f"{info_path} must hold a JSON object; relabel with --overwrite")
        if info.get("manifest_sha256") != manifest_sha256(self.path):
            raise DataError(f"label set {self.labels!r} of {self.path} was made for a different "
                            f"collection (manifest hash differs); relabel with --overwrite")
        self.label_info = info
        self.label_info_sha256 = sha256_file(info_path)
        plans = manifest_shards(self.manifest)
        not_done = [p.name for p in plans if shard_status(self.path, p.name) != "done"]
        if not_done and not allow_partial:
            raise DataError(f"{self.path}: {len(not_done)} of {len(plans)} shards are not "
                            f"collected yet (e.g. {not_done[:3]}); rerun `vllm-recontrol "
                            f"collect` with the same options, or pass --allow-partial")
        self.shards: list[ShardEntry] = []
        labels_folder = labels_dir(self.path, self.labels)
        unlabelled = [p.name for p in plans if p.name not in not_done and
                      not (labels_folder / f"{p.name}.jsonl").is_file()]
        if unlabelled and allow_partial:  # label still running beside a partial run
            print(f"train: {len(unlabelled)} collected shard(s) of {self.path} are not labelled "
                  f"yet (e.g. {unlabelled[:3]}); training without them (--allow-partial)",
                  file=sys.stderr, flush=True)
            not_done += unlabelled
        for plan in plans:
            if plan.name in not_done:
                continue
            index = read_shard_index(self.path, plan.name)
            self.shards.append(ShardEntry(plan.name, index, self._rewards(plan.name, index)))
        if not self.shards or sum(s.index.num_responses for s in self.shards) == 0:
            raise DataError(f"{self.path} holds no collected responses (empty data set)")
        self.rewards_sha256 = rewards_digest(self.shards)
        widths = {s.index.hidden_size for s in self.shards}
        if len(widths) != 1:
            raise DataError(f"{self.path}: shards have different hidden sizes {sorted(widths)}")
        self.hidden_size = widths.pop()
        declared = self.manifest.get("hidden_size")
        if declared is not None and declared != self.hidden_size:
            raise DataError(f"{self.path}: states are {self.hidden_size} wide but the manifest "
                            f"says the model's hidden size is {declared}")
        self.num_prompts = int(self.manifest["num_prompts"])
        for shard in self.shards:  # indexes into the held-out split: out of range is damage
            prompts = shard.index.prompt_index
            if prompts.numel() and not (0 <= int(prompts.min()) and
                                        int(prompts.max()) < self.num_prompts):
                raise DataError(f"shard {shard.name} of {self.path} names prompts "
                                f"{int(prompts.min())}..{int(prompts.max())}, outside the "
                                f"collection's {self.num_prompts}: the shard is damaged")

    def _choose_labels(self, wanted: str | None) -> str:
        if wanted is not None:
            present = label_sets(self.path)
            if wanted not in present:
                raise DataError(f"{self.path} has no label set {wanted!r} (present: {present}); "
                                f"run `vllm-recontrol label --data {self.path} --name {wanted}`")
            return wanted
        present = label_sets(self.path, with_labels=True)  # not a set whose run never began
        if not present:
            raise DataError(f"{self.path} is not labelled; run `vllm-recontrol label --data "
                            f"{self.path} --reward-fn module:function` (or --reward-model) first")
        if len(present) > 1:
            raise DataError(f"{self.path} has several label sets {present}; pick one with --labels")
        return present[0]

    def _rewards(self, shard: str, index: ShardIndex) -> torch.Tensor:
        rows = read_shard_labels(self.path, self.labels, shard)
        where = f"labels of shard {shard} of {self.path}"
        if not all(isinstance(row, dict) for row in rows):
            raise DataError(f"{where}: every line must be a JSON object; relabel with --overwrite")
        ids = [row.get("response_id") for row in rows]
        if ids != index.response_ids.tolist():
            raise DataError(f"labels of shard {shard} ({len(rows)} rows) do not match its "
                            f"{index.num_responses} responses; relabel with --overwrite")
        rewards = [row.get("reward") for row in rows]
        for line, reward in enumerate(rewards, 1):
            # float32 is what training reads: a NaN, an inf or a value past float32's range
            # would make the loss NaN and early stopping keep the untrained head
            if isinstance(reward, bool) or not isinstance(reward, (int, float)) or \
                    not abs(reward) <= 3.4028234663852886e38:
                raise DataError(f"{where}: line {line} has reward {reward!r}, not a finite "
                                f"number; relabel with --overwrite")
        return torch.tensor(rewards, dtype=torch.float32)

    # ------------------------------------------------------------------ splitting
    def heldout_prompts(self, fraction: float, seed: int) -> torch.Tensor:
        """[num_prompts] bool: a seeded prompt-level split (all samples of a prompt together,
        and every prompt of the same text on one side: ``same_text_groups``)."""
        mask = torch.zeros(self.num_prompts, dtype=torch.bool)
        if fraction <= 0:
            return mask
        if fraction >= 1 or self.num_prompts < 2:
            raise DataError(f"a held-out split needs 0 <= fraction < 1 and at least 2 prompts "
                            f"(fraction {fraction}, {self.num_prompts} prompts)")
        count = min(max(1, round(fraction * self.num_prompts)), self.num_prompts - 1)
        order = torch.randperm(self.num_prompts, generator=torch.Generator().manual_seed(seed))
        members = self.same_text_groups()
        groups = [members.get(i, [i]) for i in order.tolist()]
        held = 0
        for group in groups:  # all texts distinct: the first `count` prompts of the order
            if not mask[group[0]] and held + len(group) <= count:
                mask[group] = True
                held += len(group)
                if held == count:
                    break
        if held == 0:  # every text more often than `count`: the first that leaves training
            group = next((g for g in groups if len(g) < self.num_prompts), None)
            if group is None:
                print(f"warning: every prompt of {self.path} has the same text, so no prompt "
                      f"can be held out (its s_0 would be in training too): the metrics "
                      f"are the training data's", flush=True)
            else:
                mask[group] = True
        return mask

    def same_text_groups(self) -> dict[int, list[int]]:
        """Prompt index -> every prompt index of the same text, for texts collected more than
        once. Why: the same text at two indices (prompt sets repeat prompts) has the same s_0,
        so splitting by index alone put identical states on both sides of the split and
        flattered the held-out metrics. Reads the rows' prompt texts, once per run.

        The members of a group share one sorted list (do not change it): a copy per member
        made a text repeated k times cost k sorted lists of k (1.8 s and 760 MiB at 10,000)."""
        by_text: dict[bytes, set[int]] = {}
        for shard in self.shards:
            for row in read_rows(self.path, shard.name):
                key = hashlib.sha256(str(row.get("prompt")).encode()).digest()
                by_text.setdefault(key, set()).add(int(row["prompt_index"]))
        members: dict[int, list[int]] = {}
        for group in by_text.values():
            if len(group) > 1:
                shared = sorted(group)
                members.update(dict.fromkeys(shared, shared))
        return members

    def count(self, heldout_prompts: torch.Tensor) -> dict[str, int]:
        counts = {"train_responses": 0, "train_states": 0, "heldout_responses": 0,
                  "heldout_states": 0}
        answered = torch.zeros_like(heldout_prompts)  # prompts with at least one response
        for shard in self.shards:
            answered[shard.index.prompt_index] = True
            held = heldout_prompts[shard.index.prompt_index]
            lengths = shard.index.lengths
            counts["heldout_responses"] += int(held.sum())
            counts["heldout_states"] += int(lengths[held].sum())
            counts["train_responses"] += int((~held).sum())
            counts["train_states"] += int(lengths[~held].sum())
        counts["train_prompts"] = int((answered & ~heldout_prompts).sum())
        counts["heldout_prompts"] = int((answered & heldout_prompts).sum())
        return counts

    def train_states_per_shard(self, heldout_prompts: torch.Tensor) -> list[int]:
        """Training (not held-out) states of each shard, from its index alone."""
        counts = []
        for shard in self.shards:
            lengths = shard.index.lengths
            counts.append(int(lengths[~heldout_prompts[shard.index.prompt_index]].sum()))
        return counts

    def train_reward_means(self, heldout_prompts: torch.Tensor) -> tuple[float, float]:
        """The training rewards' mean over responses, and over states (each response's reward
        once per state): the best constant for V(s_0), and for V(s_t) of every t, which
        differ when the reward goes with the length."""
        rewards, lengths = [], []
        for shard in self.shards:
            train = ~heldout_prompts[shard.index.prompt_index]
            rewards.append(shard.rewards[train].double())
            lengths.append(shard.index.lengths[train].double())
        values, weights = torch.cat(rewards), torch.cat(lengths)
        if not values.numel():
            return 0.0, 0.0
        return float(values.mean()), float((values * weights).sum() / weights.sum())

    # ------------------------------------------------------------------ streaming
    def windows(self, order: Sequence[int], size: int, heldout_prompts: torch.Tensor,
                responses: str = "all") -> Iterator[Window]:
        """Windows of ``size`` shards, in the given shard order, loaded one at a time.

        ``responses``: ``all``, or only the ``heldout`` or ``train`` side of the split
        (evaluation reads just the responses it scores, about a tenth of the states)."""
        for start in range(0, len(order), max(1, size)):
            entries = [self.shards[i] for i in order[start:start + max(1, size)]]
            yield self._window(entries, heldout_prompts, responses)

    def _window(self, entries: Sequence[ShardEntry], heldout_prompts: torch.Tensor,
                responses: str = "all") -> Window:
        """The chosen responses of ``entries``, back to back, their states in one tensor.

        Why one preallocated tensor filled from the files: concatenating per-shard copies
        held every shard twice at the peak, and a one-shard window stayed a mapping of the
        file that random batch rows page-faulted into."""
        kept, held = [], []
        for entry in entries:
            side = heldout_prompts[entry.index.prompt_index]
            kept.append(_chosen(side, responses))
            held.append(side[kept[-1]])
        lengths = torch.cat([e.index.lengths[k] for e, k in zip(entries, kept)])
        states = self._read_states(entries, kept, int(lengths.sum()))
        offsets_t = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
        rewards_t = torch.cat([e.rewards[k] for e, k in zip(entries, kept)])
        heldout = torch.cat(held)
        return Window(
            states=states, offsets=offsets_t, rewards=rewards_t, heldout=heldout,
            terminal=terminal_flags(offsets_t),
            state_rewards=torch.repeat_interleave(rewards_t, lengths),
            state_heldout=torch.repeat_interleave(heldout, lengths))

    def _read_states(self, entries: Sequence[ShardEntry], kept: Sequence[torch.Tensor],
                     total: int) -> torch.Tensor:
        """[total, d]: each entry's kept responses' rows, read into their slice in turn."""
        layouts = [states_layout(self.path, entry.name) for entry in entries]
        for entry, layout in zip(entries, layouts):
            if layout.shape != (entry.index.num_states, self.hidden_size):
                raise DataError(f"shard {layout.path} holds states {list(layout.shape)} but its "
                                f"index says [{entry.index.num_states}, {self.hidden_size}]: the "
                                "file changed since training started, or is damaged")
        dtypes = {layout.dtype for layout in layouts}
        # one stored dtype (every collection): as stored; mixed 16-bit shards: float32,
        # as concatenating them did
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        states = torch.empty(total, self.hidden_size, dtype=dtype)
        position = 0
        for entry, keep, layout in zip(entries, kept, layouts):
            ranges = row_ranges(entry.index.offsets, keep)
            count = sum(b - a for a, b in ranges)
            read_state_rows(layout, ranges, states[position:position + count])
            position += count
        return states


def _chosen(heldout: torch.Tensor, responses: str) -> torch.Tensor:
    """[R] bool: the responses a window keeps, given each response's side of the split."""
    if responses == "all":
        return torch.ones_like(heldout)
    if responses == "heldout":
        return heldout
    if responses == "train":
        return ~heldout
    raise ValueError(f"responses must be all, heldout or train, got {responses!r}")


def row_ranges(offsets: torch.Tensor, keep: torch.Tensor) -> list[tuple[int, int]]:
    """State row ranges [a, b) of the kept responses, adjacent ones merged (a response's
    states are contiguous, and so are a prompt's samples): few reads, each a long one."""
    starts, ends = offsets[:-1][keep].tolist(), offsets[1:][keep].tolist()
    ranges: list[tuple[int, int]] = []
    for a, b in zip(starts, ends):
        if ranges and ranges[-1][1] == a:
            ranges[-1] = (ranges[-1][0], b)
        elif b > a:
            ranges.append((a, b))
    return ranges
