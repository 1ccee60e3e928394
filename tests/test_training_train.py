"""Targets (Bellman, MC, TD(lambda)) by hand, and value-head training on fake collections."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training_fakes import fake_collect, model_folder_lookalike
from vllm_recontrol import ValueHead
from vllm_recontrol.training.common import DataError
from vllm_recontrol.training.labeler import label
from vllm_recontrol.training.shards import manifest_sha256
from vllm_recontrol.training.targets import (bootstrap_targets, lambda_returns, mc_targets,
                                             terminal_flags, value_loss)
from vllm_recontrol.training.trainer import pearson, train

# Two responses back to back: 3 steps (rows 0-2) and 2 steps (rows 3-4), then a 1-step one.
OFFSETS = torch.tensor([0, 3, 5, 6])
REWARDS = torch.tensor([0.7, -0.2, 1.5])


def _head_and_states():
    head = ValueHead(4, [5], seed=3)
    states = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    return head, states


def test_terminal_index_is_the_last_valid_step():
    assert terminal_flags(OFFSETS).tolist() == [False, False, True, False, True, True]
    assert terminal_flags(torch.tensor([0, 1])).tolist() == [True]


def test_bellman_targets_match_hand_computation_and_carry_no_gradient():
    head, states = _head_and_states()
    with torch.no_grad():
        v = head(states)
    rows = torch.arange(6)
    state_rewards = torch.repeat_interleave(REWARDS, OFFSETS[1:] - OFFSETS[:-1])
    targets = bootstrap_targets(head, states, rows, terminal_flags(OFFSETS), state_rewards)
    expected = torch.stack([v[1], v[2], REWARDS[0], v[4], REWARDS[1], REWARDS[2]])
    assert torch.allclose(targets, expected)
    assert not targets.requires_grad

    # The loss's gradient flows through V(s_t) only: equal to the loss with constant targets.
    loss = value_loss(head, states, targets)
    grads = torch.autograd.grad(loss, list(head.parameters()))
    constants = expected.clone()
    manual = ((head(states) - constants) ** 2).mean()
    manual_grads = torch.autograd.grad(manual, list(head.parameters()))
    for a, b in zip(grads, manual_grads):
        assert torch.allclose(a, b)


def test_shuffled_batch_uses_each_rows_own_successor():
    head, states = _head_and_states()
    with torch.no_grad():
        v = head(states)
    rows = torch.tensor([4, 0, 5, 3])  # terminal, first, last row of the window, non-terminal
    state_rewards = torch.repeat_interleave(REWARDS, OFFSETS[1:] - OFFSETS[:-1])
    targets = bootstrap_targets(head, states, rows, terminal_flags(OFFSETS), state_rewards)
    assert torch.allclose(targets, torch.stack([REWARDS[1], v[1], REWARDS[2], v[4]]))


def test_td_lambda_edge_cases():
    head, states = _head_and_states()
    with torch.no_grad():
        v = head(states)
    state_rewards = torch.repeat_interleave(REWARDS, OFFSETS[1:] - OFFSETS[:-1])
    one_step = bootstrap_targets(head, states, torch.arange(6), terminal_flags(OFFSETS),
                                 state_rewards)
    assert torch.allclose(lambda_returns(v, OFFSETS, REWARDS, 0.0), one_step)
    assert torch.allclose(lambda_returns(v, OFFSETS, REWARDS, 1.0), mc_targets(OFFSETS, REWARDS))
    # lambda = 0.5 by hand: y_T = r, y_t = 0.5 V(s_{t+1}) + 0.5 y_{t+1}.
    y2 = REWARDS[0]
    y1 = 0.5 * v[2] + 0.5 * y2
    y0 = 0.5 * v[1] + 0.5 * y1
    expected = torch.stack([y0, y1, y2, 0.5 * v[4] + 0.5 * REWARDS[1], REWARDS[1], REWARDS[2]])
    assert torch.allclose(lambda_returns(v, OFFSETS, REWARDS, 0.5), expected)
    with pytest.raises(ValueError):
        lambda_returns(v, OFFSETS, REWARDS, 1.5)


def test_pearson():
    assert pearson(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 6.5])) > 0.99
    assert pearson(torch.ones(3), torch.tensor([1.0, 2.0, 3.0])) == 0.0


# ----------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    data = fake_collect(tmp_path_factory.mktemp("train"), count=120, shard_size=16)[0]
    label(data=str(data), reward_fn="training_fakes:good_reward", progress=False)
    return data


@pytest.mark.parametrize("target, sync", [("bellman", 1), ("bellman", 7), ("mc", 1),
                                          ("td-lambda", 1)])
def test_training_learns_a_predictable_reward(labelled, tmp_path, target, sync):
    out = tmp_path / f"head-{target}"
    summary = train(data=str(labelled), out=str(out), target=target, lr=3e-3, batch_size=32,
                    epochs=40, widths=[16], shuffle_shards=2, device="cpu", progress=False,
                    target_sync_steps=sync)
    metrics = summary["metrics"]
    assert metrics["pearson_s0"] > 0.9, metrics
    assert metrics["mse_s0"] < 0.5 * metrics["trivial_mse_s0"], metrics
    head = ValueHead.load(out, expected_hidden_size=8)
    meta = head.metadata
    assert head.widths == [16] and meta["target"] == target
    assert meta["data"]["manifest_sha256"] == manifest_sha256(labelled)
    assert meta["data"]["train_responses"] + meta["data"]["heldout_responses"] == 120
    assert meta["metrics"]["split"] == "heldout" and meta["hidden_size"] == 8
    assert meta["hyperparameters"]["lr"] == 3e-3 and meta["base_model"].endswith("fake-model")


def test_one_collection_two_objectives_two_heads(labelled, tmp_path):
    """Label the same states with two rewards (label sets by name), train one head on each:
    the heads learn their own objective and record which labels they learned; with several
    label sets, train must be told which one."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(labelled, data)
    label(data=str(data), reward_fn="training_fakes:opposite_reward", name="opposite",
          progress=False)
    with pytest.raises(DataError, match=r"several label sets \['opposite', 'reward'\]; pick "
                                        "one with --labels"):
        train(data=str(data), out=str(tmp_path / "x"), epochs=1, progress=False)
    heads = {}
    for labels in ("reward", "opposite"):
        summary = train(data=str(data), out=str(tmp_path / labels), labels=labels, target="mc",
                        lr=3e-3, batch_size=32, epochs=40, widths=[16], device="cpu",
                        progress=False)
        assert summary["metrics"]["pearson_s0"] > 0.9, summary["metrics"]
        heads[labels] = ValueHead.load(tmp_path / labels, expected_hidden_size=8)
        assert heads[labels].metadata["data"]["labels"] == labels
    states = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        values = torch.stack([heads[n](states).flatten() for n in ("reward", "opposite")])
    assert torch.corrcoef(values)[0, 1] < -0.5  # opposite objectives, opposite values


def test_early_stopping_and_training_is_deterministic(labelled, tmp_path):
    common = dict(data=str(labelled), target="mc", lr=0.05, batch_size=16, epochs=60,
                  patience=2, widths=[16], device="cpu", progress=False)
    a = train(out=str(tmp_path / "a"), **common)["metrics"]
    b = train(out=str(tmp_path / "b"), **common)["metrics"]
    assert a == b
    assert a["epochs_run"] < 60 and a["epochs_run"] - a["best_epoch"] == 2
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == \
        (tmp_path / "b" / "model.safetensors").read_bytes()


def test_bellman_trains_every_epoch_unless_given_a_patience(labelled, tmp_path):
    """The held-out MSE against the reward plateaus long before Bellman targets have carried
    the reward back (on the toy world early stopping left a head that steered at no alpha),
    so Bellman stops early only when asked, and otherwise keeps its last epoch; MC keeps
    stopping on it (patience 10)."""
    from vllm_recontrol.training.trainer import early_stopping_patience

    assert early_stopping_patience("bellman", None) is None
    assert early_stopping_patience("mc", None) == early_stopping_patience("td-lambda", None) == 10
    assert early_stopping_patience("bellman", 3) == 3
    common = dict(data=str(labelled), lr=0.05, batch_size=16, widths=[16], device="cpu",
                  progress=False)
    # lr 0.05 plateaus within a few epochs (the early-stopping test above relies on it)
    runs = {name: train(out=str(tmp_path / name), target="bellman", epochs=20, **options,
                        **common)["metrics"]
            for name, options in (("bellman", {}), ("bellman-2", dict(patience=2)))}
    assert runs["bellman"]["epochs_run"] == 20
    assert runs["bellman-2"]["epochs_run"] < 20
    saved = ValueHead.load(tmp_path / "bellman", expected_hidden_size=8).metadata
    assert saved["hyperparameters"]["patience"] is None
    # ... and keeps its last epoch: the held-out MSE did not pick the head (it picked epoch
    # 21 of 30 in a run seen in review, and would have picked epoch 4 without that dip)
    assert runs["bellman"]["best_epoch"] == 20 and runs["bellman"]["kept"] == "last epoch"
    assert runs["bellman"]["mse"] == saved["history"][-1]["mse"]
    assert runs["bellman-2"]["best_epoch"] == runs["bellman-2"]["epochs_run"] - 2
    assert runs["bellman-2"]["kept"] == "best held-out MSE"
    train(out=str(tmp_path / "mc"), target="mc", epochs=1, **common)
    assert ValueHead.load(tmp_path / "mc").metadata["hyperparameters"]["patience"] == 10


@pytest.mark.parametrize("target, sync", [("bellman", 3), ("td-lambda", 1)])
def test_a_resumed_run_continues_bit_for_bit(labelled, tmp_path, target, sync):
    """A run stopped after 3 of 6 epochs and started again with the same --checkpoint ends
    with the weights and history of a run that never stopped (weights, target network, Adam
    moments, random generators and step counter all restored)."""
    from safetensors.torch import load_file

    common = dict(data=str(labelled), target=target, target_sync_steps=sync, lr=3e-3,
                  batch_size=16, widths=[16], shuffle_shards=2, device="cpu", progress=False,
                  patience=100)
    train(out=str(tmp_path / "straight"), epochs=6, **common)
    checkpoint = tmp_path / "checkpoint"
    train(out=str(tmp_path / "resumed"), epochs=3, checkpoint=str(checkpoint), **common)
    assert sorted(p.name for p in checkpoint.iterdir()) == [".vllm-recontrol.lock",
                                                             "epoch-0003.safetensors",
                                                             "state.json"]
    train(out=str(tmp_path / "resumed"), epochs=6, checkpoint=str(checkpoint), **common)
    straight = ValueHead.load(tmp_path / "straight")
    resumed = ValueHead.load(tmp_path / "resumed")
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.metadata["history"] == straight.metadata["history"]
    assert len(resumed.metadata["history"]) == 6
    assert resumed.metadata["resumed_from_epoch"] == 3
    assert straight.metadata["resumed_from_epoch"] is None


def test_a_checkpoint_of_another_run_or_damaged_is_refused(labelled, tmp_path):
    common = dict(data=str(labelled), target="mc", batch_size=16, widths=[16], device="cpu",
                  progress=False, checkpoint=str(tmp_path / "ck"))
    train(out=str(tmp_path / "a"), epochs=1, **common)
    with pytest.raises(DataError, match=r"another run \(options.lr: checkpoint 0.0001, now "
                       r"0.01\); use another --checkpoint folder, or the same options$"):
        train(out=str(tmp_path / "a"), epochs=2, lr=0.01, **common)
    # written by 2 processes (as torchrun's would record it): the advice names the count
    from vllm_recontrol.training.checkpoint import STATE_FILE

    state_path = tmp_path / "ck" / STATE_FILE
    saved = state_path.read_text()
    state = json.loads(saved)
    state["run"]["processes"] = 2
    state_path.write_text(json.dumps(state))
    with pytest.raises(DataError, match=r"\(processes: checkpoint 2, now 1\); use another "
                       r"--checkpoint folder, or the same options on 2 processes in all "
                       r"\(each process's rows are dealt and shuffled by its rank"):
        train(out=str(tmp_path / "a"), epochs=2, **common)
    state_path.write_text(saved)
    (tmp_path / "ck" / "epoch-0001.safetensors").write_bytes(b"not what was saved")
    with pytest.raises(DataError, match="epoch-0001.safetensors is missing or damaged"):
        train(out=str(tmp_path / "a"), epochs=2, **common)


def test_resuming_with_another_patience_is_refused(labelled, tmp_path):
    """Without early stopping a checkpoint's "best" epoch is its last one, so a patience
    added on resumption would measure "better" against the wrong epoch."""
    common = dict(data=str(labelled), target="bellman", batch_size=16, widths=[16],
                  device="cpu", progress=False, checkpoint=str(tmp_path / "ck"))
    train(out=str(tmp_path / "a"), epochs=1, **common)
    with pytest.raises(DataError, match=r"another run \(options.patience: checkpoint None, now 1"):
        train(out=str(tmp_path / "a"), epochs=2, patience=1, **common)
    with pytest.raises(DataError, match=r"another run \(options.min_delta: checkpoint 0.0, now"):
        train(out=str(tmp_path / "a"), epochs=2, min_delta=0.5, **common)


def test_a_checkpoint_from_before_patience_was_recorded_still_resumes(labelled, tmp_path):
    common = dict(data=str(labelled), target="bellman", batch_size=16, widths=[16],
                  device="cpu", progress=False, checkpoint=str(tmp_path / "ck"))
    train(out=str(tmp_path / "a"), epochs=1, **common)
    state_path = tmp_path / "ck" / "state.json"
    state = json.loads(state_path.read_text())
    for key in ("patience", "min_delta"):  # as an earlier release wrote it
        del state["run"]["options"][key]
    state_path.write_text(json.dumps(state))
    assert train(out=str(tmp_path / "a"), epochs=2, **common)["metrics"]["epochs_run"] == 2
    state_path.write_text(json.dumps(state))  # made without early stopping: not added now
    with pytest.raises(DataError, match=r"another run \(options.patience: checkpoint None, now 2"):
        train(out=str(tmp_path / "a"), epochs=3, patience=2, **common)


def _length_reward(prompt: str, response: str) -> float:
    return float(len(response))


def test_the_trivial_constants_are_the_best_ones_and_no_split_keeps_the_last_epoch(tmp_path):
    """Per state, the best constant is the length-weighted mean reward, not the mean over
    responses (they differ when the reward goes with the length, as reward models' often
    does); at s_0 it is the responses' mean. Without a held-out split there is nothing to
    stop on: every epoch runs and the head says it kept the last."""
    from vllm_recontrol.training.labeler import read_shard_labels
    from vllm_recontrol.training.shards import manifest_shards, read_manifest, read_rows

    data = fake_collect(tmp_path, count=24, shard_size=8)[0]
    label(data=str(data), reward_fn=f"{__name__}:_length_reward", progress=False)
    metrics = train(data=str(data), out=str(tmp_path / "h"), target="mc", epochs=3,
                    heldout_fraction=0.0, widths=[8], device="cpu",
                    progress=False)["metrics"]
    rewards, lengths = [], []
    for plan in manifest_shards(read_manifest(data)):
        by_id = {row["response_id"]: row["reward"]
                 for row in read_shard_labels(data, "reward", plan.name)}
        for row in read_rows(data, plan.name):
            rewards.append(by_id[row["response_id"]])
            lengths.append(row["num_states"])
    r, n = torch.tensor(rewards, dtype=torch.float64), torch.tensor(lengths, dtype=torch.float64)
    state_mean = float((r * n).sum() / n.sum())
    assert abs(state_mean - float(r.mean())) > 0.05 * float(r.std())  # the test can tell
    per_state_variance = float((n * (r - state_mean) ** 2).sum() / n.sum())
    assert metrics["trivial_mse"] == pytest.approx(per_state_variance, rel=1e-5)
    assert metrics["trivial_mse_s0"] == pytest.approx(float(((r - r.mean()) ** 2).mean()),
                                                      rel=1e-5)
    assert metrics["epochs_run"] == 3 and metrics["best_epoch"] == 3
    assert metrics["kept"] == "last epoch"
    saved = ValueHead.load(tmp_path / "h").metadata
    assert saved["hyperparameters"]["patience"] is None  # as applied


def test_an_early_stopped_run_stays_stopped_when_resumed(labelled, tmp_path):
    common = dict(data=str(labelled), target="mc", lr=0.05, batch_size=16, patience=2,
                  widths=[16], device="cpu", progress=False, checkpoint=str(tmp_path / "ck"))
    first = train(out=str(tmp_path / "a"), epochs=60, **common)["metrics"]
    assert first["epochs_run"] < 60
    again = train(out=str(tmp_path / "a"), epochs=80, **common)["metrics"]
    assert again["epochs_run"] == first["epochs_run"] and again["mse"] == first["mse"]


def test_resuming_with_fewer_epochs_than_the_checkpoint_is_refused(labelled, tmp_path):
    """The checkpoint keeps only its latest epoch: a head for fewer epochs cannot be made from
    it (it used to save the later head with epochs_run above --epochs)."""
    common = dict(data=str(labelled), target="mc", batch_size=16, widths=[16], device="cpu",
                  progress=False, checkpoint=str(tmp_path / "ck"))
    train(out=str(tmp_path / "a"), epochs=3, **common)
    with pytest.raises(DataError, match=r"at epoch 3, past --epochs 2.*--epochs 3 or more"):
        train(out=str(tmp_path / "b"), epochs=2, **common)
    assert not (tmp_path / "b").exists()
    assert train(out=str(tmp_path / "b"), epochs=3, **common)["metrics"]["epochs_run"] == 3


def test_init_head_with_another_hidden_size_is_refused(labelled, tmp_path):
    ValueHead(16, [4], seed=0).save(tmp_path / "wide")
    with pytest.raises(DataError, match="hidden size 16 but the states .* are 8 wide"):
        train(data=str(labelled), out=str(tmp_path / "x"), init_head=str(tmp_path / "wide"),
              epochs=1, progress=False)


def test_init_head_of_another_base_model_is_warned_about(labelled, tmp_path, capsys):
    """Same width, another model (Llama-2-7B and Vicuna-7B): the likely sign of a wrong
    --init-head path, taken without a word before; the new head records the data's model."""
    from vllm_recontrol.training.shards import read_manifest
    from vllm_recontrol.training.trainer import recorded_model_name

    ValueHead(8, [4], seed=0, base_model="org/other-model").save(tmp_path / "other")
    common = dict(data=str(labelled), epochs=1, progress=False)
    train(out=str(tmp_path / "x"), init_head=str(tmp_path / "other"), **common)
    err = capsys.readouterr().err
    assert f"warning: --init-head {tmp_path / 'other'} was trained on the states of " \
           "'org/other-model'" in err
    data_model = recorded_model_name(read_manifest(labelled))
    assert ValueHead.load(tmp_path / "x").base_model == data_model
    train(out=str(tmp_path / "y"), init_head=str(tmp_path / "x"), **common)  # its own model
    assert "warning: --init-head" not in capsys.readouterr().err


def test_a_data_file_instead_of_its_folder_is_named_as_such(tmp_path):
    afile = tmp_path / "manifest.json"
    afile.write_text("{}")
    with pytest.raises(DataError, match="data folder .*manifest.json is a file; give the folder"):
        train(data=str(afile), out=str(tmp_path / "h"), epochs=1, progress=False)


def test_unlabelled_incomplete_and_empty_data_are_refused(tmp_path):
    data = fake_collect(tmp_path / "u", count=10, shard_size=4)[0]
    with pytest.raises(DataError, match="not labelled"):
        train(data=str(data), out=str(tmp_path / "h"), progress=False)
    label(data=str(data), reward_fn="training_fakes:good_reward", progress=False)
    (data / "shard-00001.safetensors").unlink()
    with pytest.raises(DataError, match="1 of 3 shards are not collected"):
        train(data=str(data), out=str(tmp_path / "h"), progress=False)
    with pytest.raises(DataError, match="no manifest.json"):
        train(data=str(tmp_path), out=str(tmp_path / "h"), progress=False)
    with pytest.raises(DataError, match="does not exist"):
        train(data=str(tmp_path / "nothing"), out=str(tmp_path / "h"), progress=False)
    with pytest.raises(DataError, match="target must be one of"):
        train(data=str(data), out=str(tmp_path / "h"), target="q", progress=False)


def test_labels_that_do_not_match_the_shard_are_refused(labelled, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(labelled, copy)
    path = copy / "labels" / "reward" / "shard-00002.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n")  # one reward lost
    with pytest.raises(DataError, match="labels of shard shard-00002 .* do not match"):
        train(data=str(copy), out=str(tmp_path / "h"), progress=False)


def test_train_cli_config_file_and_flag_override(labelled, tmp_path, capsys):
    from vllm_recontrol.cli import main

    config = tmp_path / "train.json"
    config.write_text(json.dumps({"data": str(labelled), "out": str(tmp_path / "cli-head"),
                                  "target": "mc", "epochs": 5, "widths": [8],
                                  "batch-size": 64}))
    assert main(["train", "--config", str(config), "--epochs", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "held-out Pearson V(s_0), r" in out
    meta = ValueHead.load(tmp_path / "cli-head").metadata
    assert meta["hyperparameters"]["epochs"] == 2 and meta["hyperparameters"]["batch_size"] == 64
    config.write_text(json.dumps({"data": str(labelled), "out": "x", "epoch": 3}))
    assert main(["train", "--config", str(config)]) == 1
    assert "unknown option(s) ['epoch']" in capsys.readouterr().err
    # saved by a Windows editor, with a byte-order mark: read, as prompt files are
    config.write_bytes(b"\xef\xbb\xbf" + json.dumps({
        "data": str(labelled), "out": str(tmp_path / "bom-head"), "epochs": 1,
        "widths": [4]}).encode())
    assert main(["train", "--config", str(config), "--no-progress"]) == 0
    assert ValueHead.load(tmp_path / "bom-head").widths == [4]


def _metrics_from_whole_shards(data, head, heldout, scored_heldout):
    """The evaluation metrics by plain torch: every shard's states loaded whole with
    safetensors, the scored responses' rows picked, V and the errors over all of them at once."""
    from safetensors.torch import load_file

    states, state_rewards, firsts, first_rewards = [], [], [], []
    train_rewards, train_state_rewards = [], []  # per response; per state
    for path in sorted(data.glob("shard-*.safetensors")):
        shard = load_file(str(path))
        label_rows = (data / "labels" / "reward" / f"{path.stem}.jsonl").read_text().splitlines()
        rewards = [json.loads(line)["reward"] for line in label_rows]
        offsets = shard["offsets"].tolist()
        for i, prompt in enumerate(shard["prompt_index"].tolist()):
            if not bool(heldout[prompt]):
                train_rewards.append(rewards[i])
                train_state_rewards += [rewards[i]] * (offsets[i + 1] - offsets[i])
            if bool(heldout[prompt]) != scored_heldout:
                continue
            rows = shard["states"][offsets[i]:offsets[i + 1]].float()
            states.append(rows)
            state_rewards += [rewards[i]] * rows.shape[0]
            firsts.append(rows[0])
            first_rewards.append(rewards[i])
    train_mean = float(torch.tensor(train_rewards, dtype=torch.float64).mean())
    train_state_mean = float(torch.tensor(train_state_rewards, dtype=torch.float64).mean())
    with torch.no_grad():
        values = head(torch.cat(states)).double()
        v0 = head(torch.stack(firsts)).double()
    r, r0 = torch.tensor(state_rewards).float().double(), torch.tensor(first_rewards).float().double()
    return {"mse": float(((values - r) ** 2).mean()), "mse_s0": float(((v0 - r0) ** 2).mean()),
            "pearson_s0": float(torch.corrcoef(torch.stack([v0, r0]))[0, 1]),
            "trivial_mse": float(((train_state_mean - r) ** 2).mean()),
            "trivial_mse_s0": float(((train_mean - r0) ** 2).mean()),
            "trivial_pearson_s0": 0.0, "responses": len(first_rewards)}


@pytest.mark.parametrize("fraction", [0.2, 0.0])
def test_evaluation_reads_only_the_scored_rows_and_matches_whole_shard_metrics(
        labelled, tmp_path, monkeypatch, fraction):
    """evaluate() reads just the held-out responses' rows of each shard (every shard's
    whole states without a split), and its numbers are those of all states loaded whole."""
    from vllm_recontrol.training import dataset
    from vllm_recontrol.training.dataset import LabelledData
    from vllm_recontrol.training.trainer import Trainer, TrainOptions

    data = LabelledData(labelled)
    assert len(data.shards) > 3
    trainer = Trainer(TrainOptions(data=str(labelled), out=str(tmp_path / "h"), target="mc",
                                   widths=[16], lr=3e-3, batch_size=32, shuffle_shards=3,
                                   heldout_fraction=fraction, device="cpu", progress=False),
                      data)
    assert trainer.has_heldout == (fraction > 0)
    trainer.epoch()  # a head that predicts something
    read = {}
    real_read = dataset.read_state_rows

    def recording(layout, ranges, out):
        for a, b in ranges:
            read.setdefault(layout.path.stem, []).extend(range(a, b))
        real_read(layout, ranges, out)

    monkeypatch.setattr(dataset, "read_state_rows", recording)
    metrics = trainer.evaluate()
    expected = _metrics_from_whole_shards(labelled, trainer.head, trainer.heldout, fraction > 0)
    assert metrics == {key: pytest.approx(value, rel=1e-5, abs=1e-7)
                       for key, value in expected.items()}
    for shard in data.shards:
        offsets = shard.index.offsets.tolist()
        scored = trainer.heldout[shard.index.prompt_index] if fraction > 0 else \
            torch.ones(shard.index.num_responses, dtype=torch.bool)
        rows = [row for i, keep in enumerate(scored.tolist()) if keep
                for row in range(offsets[i], offsets[i + 1])]
        assert sorted(read.get(shard.name, [])) == rows, shard.name


def test_an_epoch_reads_each_training_row_once_and_no_heldout_row(labelled, tmp_path,
                                                                  monkeypatch):
    from vllm_recontrol.training import dataset
    from vllm_recontrol.training.dataset import LabelledData
    from vllm_recontrol.training.trainer import Trainer, TrainOptions

    data = LabelledData(labelled)
    trainer = Trainer(TrainOptions(data=str(labelled), out=str(tmp_path / "h"),
                                   target="td-lambda", widths=[16], batch_size=32,
                                   shuffle_shards=3, heldout_fraction=0.25, device="cpu",
                                   progress=False), data)
    read, real_read = {}, dataset.read_state_rows

    def recording(layout, ranges, out):
        for a, b in ranges:
            read.setdefault(layout.path.stem, []).extend(range(a, b))
        real_read(layout, ranges, out)

    monkeypatch.setattr(dataset, "read_state_rows", recording)
    trainer.epoch()
    for shard in data.shards:
        offsets = shard.index.offsets.tolist()
        train = (~trainer.heldout[shard.index.prompt_index]).tolist()
        rows = [row for i, keep in enumerate(train) if keep
                for row in range(offsets[i], offsets[i + 1])]
        assert sorted(read.get(shard.name, [])) == rows, shard.name


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_state_rows_read_from_the_file_equal_safetensors_slices(tmp_path, dtype):
    """read_state_rows puts the asked row ranges back to back, bit for bit as safetensors
    reads them (converted exactly when the target is float32); a truncated file is named."""
    from safetensors.torch import load_file
    from vllm_recontrol.training.shards import (STATE_DTYPES, load_states, read_state_rows,
                                                states_layout, write_states)

    generator = torch.Generator().manual_seed(0)
    lengths = [3, 1, 5, 2]
    joined = torch.randn(sum(lengths), 6, generator=generator).to(STATE_DTYPES[dtype])
    path = write_states(tmp_path, "shard-00000", joined, lengths, [0, 1, 2, 3], [0, 0, 1, 2],
                        dtype)
    stored = load_file(str(path))["states"]
    assert torch.equal(load_states(tmp_path, "shard-00000").view(torch.int16),
                       stored.view(torch.int16))
    ranges = [(8, 11), (0, 2), (4, 4), (3, 4)]
    expected = torch.cat([stored[a:b] for a, b in ranges])
    layout = states_layout(tmp_path, "shard-00000")
    out = torch.empty(expected.shape, dtype=expected.dtype)
    read_state_rows(layout, ranges, out)
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))
    wide = torch.empty(expected.shape, dtype=torch.float32)
    read_state_rows(layout, ranges, wide)
    assert torch.equal(wide, expected.float())
    path.write_bytes(path.read_bytes()[:layout.start + 10 * layout.row_bytes + 4])  # row 10 cut
    with pytest.raises(DataError, match="truncated"):
        read_state_rows(layout, [(10, 11)], torch.empty(1, 6, dtype=expected.dtype))
    for length in (2**63, 2**40, 0):  # a damaged header length: a clear error, no huge read
        path.write_bytes(length.to_bytes(8, "little") + b"{}" * 8)
        with pytest.raises(DataError, match="cannot be read: ValueError: a header of"):
            states_layout(tmp_path, "shard-00000")
    for shape, offsets in (([-2, -4], [0, 16]), ([10**12, 6], [0, 12 * 10**12]),
                           ([2, 6], [8, 32]), ([2, 0], [0, 0])):  # damaged shapes, offsets
        header = json.dumps({"states": {"dtype": "BF16", "shape": shape,
                                        "data_offsets": offsets}}).encode()
        path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(24))
        with pytest.raises(DataError, match="is damaged"):
            states_layout(tmp_path, "shard-00000")
    header = json.dumps({"states": {"dtype": "BF16", "shape": [0, 6],
                                    "data_offsets": [0, 0]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header)  # no states: nothing to read
    assert load_states(tmp_path, "shard-00000").shape == (0, 6)


# ----------------------------------------------------------------------------- bad input
def _copy(labelled, tmp_path):
    import shutil

    shutil.copytree(labelled, tmp_path / "copy")
    return tmp_path / "copy"


@pytest.mark.parametrize("edit, message", [
    (lambda row: {**row, "reward": float("nan")}, "line 1 has reward nan, not a finite number"),
    (lambda row: {**row, "reward": 1e39}, "line 1 has reward 1e\\+39"),  # inf in float32
    (lambda row: {**row, "reward": None}, "line 1 has reward None"),
    (lambda row: {**row, "reward": "x"}, "line 1 has reward 'x'"),
    (lambda row: {k: v for k, v in row.items() if k != "reward"}, "line 1 has reward None"),
    (lambda row: [1, 2], "every line must be a JSON object"),
])
def test_unusable_rewards_in_a_label_file_are_refused_by_line(labelled, tmp_path, edit, message):
    data = _copy(labelled, tmp_path)
    path = data / "labels" / "reward" / "shard-00001.jsonl"
    lines = path.read_text().splitlines()
    lines[0] = json.dumps(edit(json.loads(lines[0])))
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=f"labels of shard shard-00001 .*: {message}"):
        train(data=str(data), out=str(tmp_path / "h"), epochs=1, progress=False)


def test_a_diverging_run_saves_nothing(labelled, tmp_path):
    """NaN compares false with everything: early stopping would keep the initial weights and
    save them as a trained head. Training stops with an error instead."""
    with pytest.raises(DataError, match="the loss is not finite at epoch 1 .* nothing was saved"):
        train(data=str(labelled), out=str(tmp_path / "h"), target="mc", lr=1e12, epochs=3,
              batch_size=16, widths=[16], device="cpu", progress=False)
    assert not (tmp_path / "h").exists()


@pytest.mark.parametrize("options, message", [
    ({"lr": float("inf")}, "lr must be a finite number > 0"),
    ({"weight_decay": -1.0}, "weight_decay must be a finite number >= 0"),
    ({"min_delta": float("nan")}, "min_delta must be a finite number >= 0"),
    ({"device": "foo"}, "device 'foo' is not a torch device"),
    ({"lr": "1e-3"}, "option lr must be a number, got '1e-3'"),
    ({"widths": 16}, "option widths must be a list, got 16"),
    ({"allow_partial": "no"}, "option allow_partial must be true or false, got 'no'"),
    ({"epochs": 2.5}, "option epochs must be an integer, got 2.5"),
    ({"seed": 2 ** 63}, r"seed must be an integer in \[0, 2\*\*63\), got 9223372036854775808"),
    ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*63\), got -1"),
])
def test_bad_options_are_refused_before_training(labelled, tmp_path, options, message):
    from vllm_recontrol.errors import RecontrolError

    with pytest.raises(RecontrolError, match=message):
        train(**{"data": str(labelled), "out": str(tmp_path / "h"), "epochs": 1,
                 "progress": False, **options})
    assert not (tmp_path / "h").exists()


@pytest.mark.parametrize("widths", [[0], [16, -1]])  # types: build_options says
def test_bad_widths_are_named_as_the_flag(labelled, tmp_path, widths):
    with pytest.raises(DataError, match=r"--widths must be positive integers"):
        train(data=str(labelled), out=str(tmp_path / "h"), widths=widths, progress=False)


def test_empty_or_impossible_widths_are_refused_before_any_allocation(labelled, tmp_path):
    """`"widths": []` in a config file trained one layer of the model's width (the default)
    without a word; a width typed with extra zeros ended in the allocator's traceback."""
    with pytest.raises(DataError, match=r"widths is empty: give the hidden layers' widths"):
        train(data=str(labelled), out=str(tmp_path / "h"), widths=[], progress=False)
    with pytest.raises(DataError, match=r"--widths \[100000000000\]: a head of "
                       r"[\d,]+ parameters \([\d.]+ GB in float32\) does not fit this "
                       r"machine's [\d.]+ GB of memory"):
        train(data=str(labelled), out=str(tmp_path / "h"), widths=[10 ** 11], progress=False)
    assert not (tmp_path / "h").exists()


def test_more_hidden_layers_than_a_head_has_are_named_as_the_flag(labelled, tmp_path):
    with pytest.raises(DataError, match=r"^--widths lists 65 hidden layers, more than a value "
                       r"head has \(at most 64"):
        train(data=str(labelled), out=str(tmp_path / "h"), widths=[2] * 65, progress=False)


def test_a_head_that_does_not_fit_the_device_is_named(labelled, tmp_path, monkeypatch):
    """A GPU's out-of-memory error moving the head there was a bare traceback (the host
    memory check cannot know the device's); stands in here by the CPU move."""
    def no_room(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")

    monkeypatch.setattr(ValueHead, "to", no_room)
    with pytest.raises(DataError, match=r"the value head does not fit cpu's memory: CUDA out "
                       r"of memory.*give smaller --widths or another --device"):
        train(data=str(labelled), out=str(tmp_path / "h"), widths=[4], progress=False)


def test_a_device_out_of_memory_during_an_epoch_names_the_remedy_and_what_was_kept(
        labelled, tmp_path, monkeypatch):
    """Adam's moments and a batch are allocated after the head was moved: a GPU out of
    memory there was a bare traceback. Stands in by the CPU: epoch 2 runs out of memory, the
    checkpoint of epoch 1 is named, and a rerun goes on from it to the same head as a run
    that never failed."""
    from vllm_recontrol.training.trainer import Trainer

    options = dict(data=str(labelled), target="mc", epochs=2, batch_size=16, widths=[8],
                   device="cpu", progress=False, patience=None)
    with pytest.raises(DataError, match=r"^train: cpu ran out of memory in epoch 1 \(head "
                       r"widths \[8\], 16 states a step\): CUDA out of memory.*; free the "
                       r"device .*--batch-size.*--device cpu; nothing was saved$"):
        with monkeypatch.context() as patched:
            patched.setattr(Trainer, "epoch", lambda self: (_ for _ in ()).throw(
                torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")))
            train(out=str(tmp_path / "h"), **options)
    assert not (tmp_path / "h").exists()

    real_epoch, calls = Trainer.epoch, []

    def second_fails(self):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_epoch(self)

    with monkeypatch.context() as patched:
        patched.setattr(Trainer, "epoch", second_fails)
        with pytest.raises(DataError, match=r"out of memory in epoch 2 .* the checkpoint in "
                           r".*ck holds epoch 1: the same command goes on from it once the "
                           r"device has room, or with --device cpu \(another --batch-size or "
                           r"--widths starts afresh"):
            train(out=str(tmp_path / "h"), checkpoint=str(tmp_path / "ck"), **options)
    train(out=str(tmp_path / "h"), checkpoint=str(tmp_path / "ck"), **options)
    train(out=str(tmp_path / "whole"), **options)
    resumed = ValueHead.load(tmp_path / "h").state_dict()
    whole = ValueHead.load(tmp_path / "whole").state_dict()
    assert resumed.keys() == whole.keys()
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_a_checkpoint_that_cannot_be_written_says_which_epoch_it_still_holds(
        labelled, tmp_path, monkeypatch):
    """A full disk at an epoch's checkpoint ended in safetensors' traceback (the final
    head's save had its message). The write is atomic: the rerun goes on from the epoch
    before and ends with the head of a run that never failed."""
    from vllm_recontrol.training import checkpoint

    options = dict(data=str(labelled), target="mc", epochs=3, batch_size=16, widths=[8],
                   device="cpu", progress=False, patience=None,
                   checkpoint=str(tmp_path / "ck"))
    real_save, calls = checkpoint.save_file, []

    def disk_full_at_epoch_2(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save(tensors, path)

    with monkeypatch.context() as patched:
        patched.setattr(checkpoint, "save_file", disk_full_at_epoch_2)
        with pytest.raises(DataError, match=r"^train: cannot write the checkpoint of epoch 2 "
                           r"to .*ck \(No space left on device\); it still holds epoch 1: "
                           r"mend that and rerun the same command to go on from there$"):
            train(out=str(tmp_path / "h"), **options)
    assert not (tmp_path / "h").exists()
    train(out=str(tmp_path / "h"), **options)
    assert ValueHead.load(tmp_path / "h").metadata["resumed_from_epoch"] == 1
    train(out=str(tmp_path / "whole"), **{**options, "checkpoint": None})
    resumed = ValueHead.load(tmp_path / "h").state_dict()
    whole = ValueHead.load(tmp_path / "whole").state_dict()
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)
    # an old epoch's file that cannot be removed once the new state is written: the
    # checkpoint is whole (it said "nothing was saved" and stopped)
    (tmp_path / "ck2" / "epoch-9999.safetensors").mkdir(parents=True)
    train(out=str(tmp_path / "h2"), **{**options, "checkpoint": str(tmp_path / "ck2")})
    assert json.loads((tmp_path / "ck2" / "state.json").read_text())["epoch"] == 3


def test_a_head_that_cannot_be_allocated_is_named_by_its_size(monkeypatch):
    from vllm_recontrol.training import trainer

    def no_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(trainer, "ValueHead", no_memory)
    with pytest.raises(DataError, match=r"--widths \[16\]: a head of 161 parameters \(0.0 GB "
                       r"in float32\) could not be allocated: DefaultCPUAllocator"):
        trainer.new_head(8, [16], 0, None)


def test_abbreviated_flags_are_refused(capsys):
    from vllm_recontrol.training.trainer import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--data", "d", "--out", "o", "--epoch", "5"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --epoch 5" in capsys.readouterr().err


def test_an_out_or_checkpoint_that_is_a_file_is_refused_before_training(labelled, tmp_path):
    (tmp_path / "afile").write_text("x")
    for where in ("out", "checkpoint"):
        options = {"out": str(tmp_path / "h"), where: str(tmp_path / "afile")}
        with pytest.raises(DataError, match=f"--{where} .*afile is a file"):
            train(data=str(labelled), epochs=1, progress=False, **options)


def _no_epoch_may_run(monkeypatch) -> None:
    from vllm_recontrol.training import trainer as trainer_module

    def no_epoch(self):
        raise AssertionError("an epoch ran before --out was checked")
    monkeypatch.setattr(trainer_module.Trainer, "epoch", no_epoch)


def test_an_out_that_cannot_be_made_is_refused_before_any_epoch(labelled, tmp_path,
                                                                  monkeypatch):
    """The head is written after the last epoch: a bad --out found then cost every epoch."""
    _no_epoch_may_run(monkeypatch)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match=r"--out .*afile/head cannot be created \(Not a "
                                        r"directory\)"):
        train(data=str(labelled), out=str(tmp_path / "afile" / "head"), progress=False)


def test_an_out_holding_another_artifact_is_refused_and_left_alone(labelled, tmp_path,
                                                                   monkeypatch):
    """A model folder holds config.json and model.safetensors too: the head's would replace
    them (the model was lost). A head folder is trained into again; --data is refused."""
    _no_epoch_may_run(monkeypatch)
    model = model_folder_lookalike(tmp_path / "model", 16, b"weights")
    with pytest.raises(DataError, match=r"--out .*model holds a config.json that is not a value "
                                        r"head's.*model's config \(model_type 'llama'\).*give "
                                        r"another --out"):
        train(data=str(labelled), out=str(model), progress=False)
    assert (model / "model.safetensors").read_bytes() == b"weights"
    with pytest.raises(DataError, match=r"--out .* is the --data folder"):
        train(data=str(labelled), out=str(labelled), progress=False)
    monkeypatch.undo()
    head = tmp_path / "head"
    first = train(data=str(labelled), out=str(head), epochs=1, progress=False)
    again = train(data=str(labelled), out=str(head), epochs=1, seed=1, progress=False)
    assert first["metrics"] != again["metrics"]
    saved = json.loads((head / "config.json").read_text())["metadata"]
    assert saved["hyperparameters"]["seed"] == 1


def test_an_out_that_fails_at_the_save_says_what_was_kept(labelled, tmp_path, monkeypatch):
    """A raw OSError traceback used to end the run; with a checkpoint the head is not lost
    (the rerun saves it without training again), and a folder made for it is removed."""
    import errno

    from vllm_recontrol.value_head import ValueHead

    def read_only(self, directory):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(ValueHead, "save", read_only)
    _refused_save_says_what_was_kept(labelled, tmp_path, monkeypatch, "Read-only file system")


def test_a_disk_that_fills_at_the_save_says_what_was_kept(labelled, tmp_path, monkeypatch):
    """safetensors reports a failed write (a full disk, a quota) as SafetensorError, not as
    an OSError: the same message, no traceback."""
    import safetensors.torch
    from safetensors import SafetensorError

    original = safetensors.torch.save_file

    def disk_full(tensors, filename, *args, **kwargs):  # in --out only (not the checkpoint)
        if Path(filename).parent == tmp_path / "h":
            raise SafetensorError("Error while serializing: I/O error: No space left on "
                                  "device (os error 28)")
        return original(tensors, filename, *args, **kwargs)
    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    _refused_save_says_what_was_kept(labelled, tmp_path, monkeypatch,
                                     "Error while serializing: I/O error: No space left")


def _refused_save_says_what_was_kept(labelled, tmp_path, monkeypatch, reason: str) -> None:
    import re

    with pytest.raises(DataError, match=r"cannot save the value head to .*h \("
                                        + re.escape(reason) + r".*\); the trained head is lost"):
        train(data=str(labelled), out=str(tmp_path / "h"), epochs=1, progress=False)
    assert not (tmp_path / "h").exists()
    checkpoint = str(tmp_path / "ck")
    with pytest.raises(DataError, match=r"the checkpoint in .*ck holds the trained head: rerun "
                                        r"with the same --checkpoint"):
        train(data=str(labelled), out=str(tmp_path / "h"), epochs=1, progress=False,
              checkpoint=checkpoint)
    monkeypatch.undo()
    _no_epoch_may_run(monkeypatch)
    train(data=str(labelled), out=str(tmp_path / "h2"), epochs=1, progress=False,
          checkpoint=checkpoint)
    assert (tmp_path / "h2" / "model.safetensors").is_file()


@pytest.mark.parametrize("environment, message", [
    ({"WORLD_SIZE": "2"}, r"WORLD_SIZE=2 is set but RANK, MASTER_ADDR, MASTER_PORT are not: "
                          r"start train under torchrun .*or unset WORLD_SIZE"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_PORT": "1"}, r"but MASTER_ADDR is not"),
    ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
     r"RANK=2 is outside the WORLD_SIZE=2 processes"),
    ({"WORLD_SIZE": "two"}, r"WORLD_SIZE='two' is not a number of processes"),
])
def test_a_launcher_environment_without_its_rank_or_address_is_named(labelled, tmp_path,
                                                                    monkeypatch, environment,
                                                                    message):
    """A WORLD_SIZE left over from another job used to end in KeyError: 'RANK'."""
    for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(DataError, match=message):
        train(data=str(labelled), out=str(tmp_path / "h"), epochs=1, progress=False)


def test_an_uneven_deal_of_shards_over_processes_is_warned_about():
    """--batch-size is the global batch only while every process has rows: one shard on two
    processes halves every step (the reviewer's 45 steps of 8 rows against 24 of 16)."""
    from vllm_recontrol.training.trainer import uneven_deal

    assert uneven_deal([117], 1, 16) is None  # alone: nothing is dealt
    message = uneven_deal([117], 2, 8)
    assert message.startswith("the 1 training shards spread unevenly over 2 processes (117, 0 "
                              "training states)") and "about 15 of each epoch's 15 steps" in message
    assert "about 7 of each epoch's 14 steps" in uneven_deal([58, 54, 60], 2, 8)  # 60 vs 112
    # every process's one step is short (it said "about 0 of each epoch's 1 steps")
    assert "about 1 of each epoch's 1 steps" in uneven_deal([37, 62], 2, 512)
    assert uneven_deal([50] * 8, 2, 8) is None  # even
    assert uneven_deal([52, 50, 48, 50], 2, 8) is None  # within a tenth


def test_the_cli_names_a_world_size_that_is_no_number_once(labelled, tmp_path, monkeypatch,
                                                           capsys):
    from vllm_recontrol.training.trainer import main

    monkeypatch.setenv("WORLD_SIZE", "two")
    assert main(["--data", str(labelled), "--out", str(tmp_path / "h"), "--epochs", "1",
                 "--no-progress"]) == 1
    assert capsys.readouterr().err.strip() == "error: WORLD_SIZE='two' is not a number of " \
                                              "processes"


def test_partial_data_without_collected_heldout_states_trains_without_a_split(labelled, tmp_path):
    """--allow-partial with every held-out prompt in shards not collected yet: no held-out
    states to stop on, so the numbers are the training data's (it used to divide by zero)."""
    from vllm_recontrol.training.dataset import LabelledData

    data = _copy(labelled, tmp_path)
    full = LabelledData(data)
    heldout = full.heldout_prompts(0.02, 0)  # few prompts (with their same-text twins)
    dropped = [s.name for s in full.shards if heldout[s.index.prompt_index].any()]
    assert 0 < len(dropped) < len(full.shards)
    for name in dropped:
        (data / f"{name}.safetensors").unlink()
    summary = train(data=str(data), out=str(tmp_path / "h"), target="mc", epochs=2,
                    batch_size=16, widths=[8], device="cpu", progress=False, allow_partial=True,
                    heldout_fraction=0.02)
    assert summary["metrics"]["split"] == "train (no held-out split)"
    assert summary["metrics"]["epochs_run"] == 2


def test_the_same_prompt_text_never_sits_on_both_sides_of_the_split(tmp_path, capsys):
    """Prompt sets repeat prompts: the same text at two indices has the same s_0, and a split
    by index alone put identical states in training and held-out. Texts collected more than
    once go to one side together; distinct texts split as by index (the seeded order)."""
    from training_fakes import write_prompts
    from vllm_recontrol.training.dataset import LabelledData

    root = tmp_path / "dup"
    root.mkdir()
    texts = [json.loads(line)["prompt"]
             for line in write_prompts(tmp_path / "p.jsonl", 400).read_text().splitlines()]
    distinct = list(dict.fromkeys(texts))[:30]
    order = torch.randperm(60, generator=torch.Generator().manual_seed(5)).tolist()
    with open(root / "prompts.jsonl", "w") as handle:
        for i in order:  # each of 30 texts twice, at scattered indices
            handle.write(json.dumps({"prompt": distinct[i % 30]}) + "\n")
    data = fake_collect(root, count=60, shard_size=16)[0]
    label(data=str(data), reward_fn="training_fakes:good_reward", progress=False)
    rows = [json.loads(line) for path in sorted(data.glob("shard-*.jsonl"))
            for line in path.read_text().splitlines()]
    text_of = {r["prompt_index"]: r["prompt"] for r in rows}
    for seed in range(5):
        held = LabelledData(data).heldout_prompts(0.2, seed)
        sides = {}
        for index, text in text_of.items():
            sides.setdefault(text, set()).add(bool(held[index]))
        assert all(len(side) == 1 for side in sides.values()), seed
        assert int(held.sum()) == 12  # six whole pairs: round(0.2 * 60)

    def collection(name, texts):
        (tmp_path / name).mkdir()
        with open(tmp_path / name / "prompts.jsonl", "w") as handle:
            for text in texts:
                handle.write(json.dumps({"prompt": text}) + "\n")
        data = fake_collect(tmp_path / name, count=len(texts), shard_size=16)[0]
        label(data=str(data), reward_fn="training_fakes:good_reward", progress=False)
        return LabelledData(data)

    # one text asked 40 times of 100: its group never swallows the split
    skewed = collection("skewed", [distinct[0]] * 40 + distinct[1:30] * 2 + distinct[1:3])
    for seed in range(5):
        assert int(skewed.heldout_prompts(0.1, seed).sum()) == 10
    # one text only: nothing can be held out without its s_0 in training too; said so
    same = collection("same", [distinct[0]] * 20)
    assert int(same.heldout_prompts(0.1, 0).sum()) == 0
    assert "every prompt of" in capsys.readouterr().out

    (tmp_path / "plain").mkdir()
    with open(tmp_path / "plain" / "prompts.jsonl", "w") as handle:
        for text in distinct[:25]:
            handle.write(json.dumps({"prompt": text}) + "\n")
    plain = fake_collect(tmp_path / "plain", count=25, shard_size=16)[0]
    label(data=str(plain), reward_fn="training_fakes:good_reward", progress=False)
    assert LabelledData(plain).same_text_groups() == {}
    order = torch.randperm(25, generator=torch.Generator().manual_seed(3))
    expected = torch.zeros(25, dtype=torch.bool)
    expected[order[:5]] = True  # round(0.2 * 25): the first five of the seeded order
    assert torch.equal(LabelledData(plain).heldout_prompts(0.2, 3), expected)


def test_a_text_repeated_many_times_is_one_group_shared_by_its_members(tmp_path):
    """same_text_groups maps every index of a repeated text to all indices of that text, as
    read from the rows; a text asked 150 times is one list its 150 members share (a sorted
    copy per member grew with the square of the repeats)."""
    from vllm_recontrol.training.dataset import LabelledData

    texts = ["good a b c"] * 150 + ["bad d e f"] * 3 + [f"bad {i} a" for i in range(47)]
    texts = [texts[i] for i in torch.randperm(200, generator=torch.Generator().manual_seed(1))]
    root = tmp_path / "repeat"
    root.mkdir()
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    data = fake_collect(root, count=200, shard_size=64)[0]
    label(data=str(data), reward_fn="training_fakes:good_reward", progress=False)
    indices = {}
    for path in sorted(data.glob("shard-*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            indices.setdefault(row["prompt"], set()).add(row["prompt_index"])
    expected = {i: sorted(group) for group in indices.values() if len(group) > 1 for i in group}
    groups = LabelledData(data).same_text_groups()
    assert groups == expected and len(groups) == 153
    assert len({id(group) for group in groups.values()}) == 2


def test_partial_training_skips_shards_not_labelled_yet(labelled, tmp_path, capsys):
    """--allow-partial trains beside a label run still going: a collected shard without
    labels is left out, said once; without the flag it is an error naming the shard."""
    from vllm_recontrol.training.dataset import LabelledData
    from vllm_recontrol.training.labeler import labels_dir

    data = _copy(labelled, tmp_path)
    (labels_dir(data, "reward") / "shard-00002.jsonl").unlink()
    with pytest.raises(DataError, match="shard shard-00002 of .* is not labelled"):
        LabelledData(data)
    partial = LabelledData(data, allow_partial=True)
    names = [s.name for s in partial.shards]
    assert "shard-00002" not in names and len(names) == len(LabelledData(labelled).shards) - 1
    assert "1 collected shard(s)" in capsys.readouterr().err


def test_resuming_checks_the_shards_and_takes_the_resolved_label_set(labelled, tmp_path):
    data = _copy(labelled, tmp_path)
    aside = tmp_path / "shard-00003.safetensors"
    (data / "shard-00003.safetensors").rename(aside)
    common = dict(data=str(data), out=str(tmp_path / "h"), target="mc", batch_size=16,
                  widths=[8], device="cpu", progress=False, checkpoint=str(tmp_path / "ck"),
                  allow_partial=True)
    train(epochs=1, **common)
    aside.rename(data / "shard-00003.safetensors")  # the collection went on meanwhile
    with pytest.raises(DataError, match=r"another run \(.*data.shards: checkpoint"):
        train(epochs=2, **common)
    (data / "shard-00003.safetensors").rename(aside)
    # --labels naming the only (default) set is the same run as --labels omitted
    resumed = ValueHead.load(train(epochs=2, labels="reward", **common)["value head"])
    assert resumed.metadata["resumed_from_epoch"] == 1


def test_a_checkpoint_of_labels_since_replaced_is_refused(labelled, tmp_path, monkeypatch):
    """`label --overwrite` with the same source (the code behind the function changed)
    writes the same info.json: the rewards' own digest tells the checkpoint's labels from
    the new ones, and each head records the rewards it learned."""
    import training_fakes

    data = _copy(labelled, tmp_path)
    common = dict(data=str(data), out=str(tmp_path / "h"), target="mc", batch_size=16,
                  widths=[8], device="cpu", progress=False, checkpoint=str(tmp_path / "ck"))
    before = ValueHead.load(train(epochs=1, **common)["value head"]).metadata["data"]
    original = training_fakes.good_reward
    monkeypatch.setattr(training_fakes, "good_reward", lambda p, r: -original(p, r))
    label(data=str(data), reward_fn="training_fakes:good_reward", overwrite=True,
          progress=False)
    with pytest.raises(DataError, match=r"another run \(data.rewards_sha256: checkpoint"):
        train(epochs=2, **common)
    after = ValueHead.load(train(epochs=1, **{**common, "checkpoint": None})["value head"])
    assert after.metadata["data"]["labels_info_sha256"] == before["labels_info_sha256"]
    assert after.metadata["data"]["rewards_sha256"] != before["rewards_sha256"]


@pytest.mark.parametrize("state, message", [
    ('{"format": "vllm-recontrol-train-', "state.json is not valid JSON"),
    ('{"format": "vllm-recontrol-train-checkpoint"}', r"state.json lacks \['run'"),
])
def test_a_damaged_checkpoint_state_is_an_error(labelled, tmp_path, state, message):
    common = dict(data=str(labelled), out=str(tmp_path / "h"), target="mc", batch_size=16,
                  widths=[8], device="cpu", progress=False, checkpoint=str(tmp_path / "ck"))
    train(epochs=1, **common)
    (tmp_path / "ck" / "state.json").write_text(state)
    with pytest.raises(DataError, match=message):
        train(epochs=2, **common)


@pytest.mark.parametrize("change, message", [
    (lambda t: t["prompt_index"].__setitem__(0, 999), "names prompts .*999, outside the "
                                                      "collection's 120: the shard is damaged"),
    (lambda t: t["prompt_index"].__setitem__(0, -1), "names prompts -1"),
    (lambda t: t["offsets"].__setitem__(1, int(t["offsets"][2]) + 1),
     "offsets must start at 0 and never decrease"),
    (lambda t: t.__setitem__("states", t["states"].to(torch.int16)),
     r"its states are I16, not one of \['bfloat16', 'float16'\]"),
    (lambda t: t.__setitem__("offsets", t["offsets"].double()),
     r"offsets must be a 1-D int64 tensor, got torch.float64"),
    (lambda t: t.__setitem__("states", t["states"].flatten()),
     r"its states must be \[states, hidden size\], got shape \[\d+\]"),
])
def test_a_damaged_shard_index_is_an_error(labelled, tmp_path, change, message):
    from safetensors import safe_open
    from safetensors.torch import save_file

    data = _copy(labelled, tmp_path)
    path = data / "shard-00000.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    change(tensors)
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(DataError, match=message):
        train(data=str(data), out=str(tmp_path / "h"), epochs=1, progress=False)


def test_a_shard_file_replaced_after_its_index_was_read_is_named(labelled, tmp_path):
    """Windows read the states file by itself: a file that no longer fits the index read at
    the start (replaced, damaged) is a DataError naming the shard, not rows of another."""
    from vllm_recontrol.training.dataset import LabelledData
    from vllm_recontrol.training.shards import states_path

    data = _copy(labelled, tmp_path)
    loaded = LabelledData(data)
    first, second = (states_path(data, s.name) for s in loaded.shards[:2])
    assert loaded.shards[0].index.num_states != loaded.shards[1].index.num_states
    first.write_bytes(second.read_bytes())
    heldout = loaded.heldout_prompts(0.1, 0)
    with pytest.raises(DataError, match=r"shard .*shard-00000.* holds states .* but its index "
                                        r"says"):
        next(loaded.windows([0], 1, heldout))
