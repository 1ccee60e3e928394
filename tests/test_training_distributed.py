"""`train` under torchrun: several processes train one value head together (Gloo on CPU)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from training_fakes import fake_collect, good_reward
from vllm_recontrol import ValueHead
from vllm_recontrol.training.common import DataError
from vllm_recontrol.training.dataset import LabelledData
from vllm_recontrol.training.distributed import ProcessGroup
from vllm_recontrol.training.labeler import label
from vllm_recontrol.training.shards import manifest_shards, read_manifest, states_path
from vllm_recontrol.training.trainer import Trainer, TrainOptions, train

HEAD = dict(target="mc", widths=[8], lr=0.01, heldout_fraction=0.2, seed=0)


def torchrun_train(cwd, *flags: str, processes: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={processes}", "-m", "vllm_recontrol.cli", "train",
               "--device", "cpu", "--no-progress", *flags]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd)


def ran(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def head_flags(data, out, **overrides) -> list[str]:
    options = {**HEAD, **overrides}
    flags = ["--data", str(data), "--out", str(out)]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        flags += [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    return flags


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory):
    data = fake_collect(tmp_path_factory.mktemp("dist2"), count=40, shard_size=20)[0]
    label(data=str(data), reward_fn=good_reward, progress=False)
    return data


@pytest.fixture(scope="module")
def three_shards(tmp_path_factory):
    data = fake_collect(tmp_path_factory.mktemp("dist3"), count=40, shard_size=14)[0]
    label(data=str(data), reward_fn=good_reward, progress=False)
    return data


def test_two_processes_take_the_steps_of_one(two_shards, tmp_path):
    """Full-batch oracle: with one shard per process as one batch, every step's gradient is
    that of the mean loss over all training states, exactly a single process's step with
    both shards in one batch. The shards hold different numbers of training states, so
    averaging the processes' mean losses instead of weighting them would not match."""
    data = LabelledData(two_shards)
    per_shard = data.train_states_per_shard(data.heldout_prompts(HEAD["heldout_fraction"], 0))
    assert len(per_shard) == 2 and per_shard[0] != per_shard[1] and max(per_shard) < 512

    alone = train(data=str(two_shards), out=str(tmp_path / "one"), batch_size=512,
                  shuffle_shards=2, epochs=6, device="cpu", progress=False, **HEAD)
    out = ran(torchrun_train(tmp_path, *head_flags(two_shards, tmp_path / "two", epochs=6,
                                                   batch_size=1024, shuffle_shards=1)))
    assert "cpu x 2 processes" in out
    one, two = ValueHead.load(tmp_path / "one"), ValueHead.load(tmp_path / "two")
    assert two.metadata["processes"] == 2 and one.metadata["processes"] == 1
    initial = ValueHead(one.hidden_size, [8], seed=0)
    for a, b, start in zip(one.parameters(), two.parameters(), initial.parameters()):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()
        assert not torch.allclose(a, start, atol=1e-3)  # it did train
    for key in ("mse", "mse_s0", "pearson_s0", "trivial_mse", "responses"):
        assert two.metadata["metrics"][key] == pytest.approx(alone["metrics"][key], abs=1e-5)


def test_uneven_processes_finish_together_and_report_the_heads_metrics(three_shards, tmp_path):
    """Three shards over two processes, several batches each: one process runs out of
    batches first and takes the remaining steps with a zero gradient (Bellman targets, a
    target network). The processes end with the same head (checked before saving), and the
    metrics they report together are those of the saved head evaluated by one process."""
    flags = head_flags(three_shards, tmp_path / "head", target="bellman", epochs=3,
                       batch_size=8, shuffle_shards=1)
    out = ran(torchrun_train(tmp_path, *flags, "--target-sync-steps", "2"))
    assert "cpu x 2 processes" in out
    saved = ValueHead.load(tmp_path / "head")
    options = TrainOptions(data=str(three_shards), out="", device="cpu", shuffle_shards=1,
                           **{**HEAD, "target": "bellman"})
    trainer = Trainer(options, LabelledData(three_shards))
    trainer.head.load_state_dict(saved.state_dict())
    alone = trainer.evaluate()
    for key in ("mse", "mse_s0", "pearson_s0", "trivial_mse", "trivial_mse_s0", "responses"):
        assert saved.metadata["metrics"][key] == pytest.approx(alone[key], abs=1e-6), key


def test_two_processes_resume_bit_for_bit(three_shards, tmp_path):
    """Stopped after 2 of 4 epochs and started again with the same --checkpoint, two
    processes (each with its own row shuffles, restored from rank 0's checkpoint) end with
    the head of a run that never stopped."""
    from safetensors.torch import load_file

    def flags(out, epochs):
        return head_flags(three_shards, tmp_path / out, target="bellman", epochs=epochs,
                          batch_size=8, shuffle_shards=1)

    ran(torchrun_train(tmp_path, *flags("straight", 4)))
    ran(torchrun_train(tmp_path, *flags("resumed", 2), "--checkpoint", "ck"))
    out = ran(torchrun_train(tmp_path, *flags("resumed", 4), "--checkpoint", "ck"))
    assert "resuming from the checkpoint of epoch 2" in out
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert ValueHead.load(tmp_path / "resumed").metadata["history"] == \
        ValueHead.load(tmp_path / "straight").metadata["history"]


def test_batch_size_must_split_evenly(two_shards, tmp_path):
    proc = torchrun_train(tmp_path, *head_flags(two_shards, tmp_path / "h", batch_size=7))
    assert proc.returncode != 0
    assert "batch_size 7 must be a multiple of the 2 processes" in proc.stdout + proc.stderr
    assert not (tmp_path / "h").exists()


def test_a_gpu_device_without_cuda_is_an_error_line_under_torchrun(two_shards, tmp_path):
    """torch.cuda.set_device ran before the device was checked: every rank died in an
    AttributeError of torch._C (a CPU build) instead of the one-process message."""
    proc = torchrun_train(tmp_path, *head_flags(two_shards, tmp_path / "h"), "--device", "cuda")
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "error: device cuda requested but CUDA is not available" in output, output
    assert "AttributeError" not in output and "_cuda_setDevice" not in output
    assert not (tmp_path / "h").exists()


def test_more_processes_on_a_node_than_gpus_are_named(monkeypatch):
    """Each process takes the GPU of its LOCAL_RANK; one past the node's last GPU was torch's
    invalid-device-ordinal traceback. Stands in for a node with 2 GPUs."""
    from vllm_recontrol.training import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: pytest.fail("set_device ran"))
    for name, value in dict(WORLD_SIZE="3", RANK="2", LOCAL_RANK="2", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT="1").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(DataError, match=r"^LOCAL_RANK=2 but this node has 2 GPUs: .* start at "
                       r"most 2 a node \(torchrun --nproc-per-node 2\)$"):
        distributed.join_process_group("cuda")


def test_a_process_lost_mid_run_is_an_error_line_on_the_others(monkeypatch):
    """A peer that died made Gloo raise a bare RuntimeError in the survivors' next
    collective: a traceback on each ("Connection closed by peer ... GLHF!"). Gloo's message
    stands in; every collective of a step, a gather and the start agreement say it alike."""
    def peer_gone(*args, **kwargs):
        raise RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                           "[127.0.0.1]:39840. This is typically caused by a remote worker "
                           "crashing.")

    for name in ("all_reduce", "all_gather_object", "broadcast"):
        monkeypatch.setattr(torch.distributed, name, peer_gone)
    monkeypatch.setattr(ProcessGroup, "_device", lambda self: torch.device("cpu"))
    group = ProcessGroup(rank=0, world=2)
    head = torch.nn.Linear(2, 1)
    head(torch.ones(1, 2)).sum().backward()
    for call in (lambda: group.max(1), lambda: group.sum([1.0]),
                 lambda: group.gather(torch.ones(2)), lambda: group.agree({"a": 1}, {}),
                 lambda: group.sum_step(list(head.parameters()), 1, None),
                 lambda: group.check_same_parameters(head)):
        with pytest.raises(DataError, match=r"^train: the training processes lost touch "
                           r"\(\[gloo.*Connection closed by peer.*\): another process of this "
                           r"run stopped .* resumes from the last finished epoch$"):
            call()

    def no_room(*args, **kwargs):  # this process's own: not put down to the others
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torch.distributed, "all_reduce", no_room)
    with pytest.raises(torch.OutOfMemoryError):
        group.sum_step(list(head.parameters()), 1, None)


def test_a_checkpoint_another_run_holds_is_not_put_down_to_shared_files(two_shards,
                                                                         tmp_path):
    """Only rank 0 takes the lock, so it fails alone by design: the message added the advice
    for a process that sees other files (the --checkpoint folder on a shared filesystem)."""
    from vllm_recontrol.folder_lock import exclusive_folder

    with exclusive_folder(tmp_path / "ck", "train"):
        proc = torchrun_train(tmp_path, *head_flags(two_shards, tmp_path / "h"),
                              "--checkpoint", str(tmp_path / "ck"))
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "on rank 0: --checkpoint " in output and "is in use by another run" in output, output
    assert "could start" not in output and "filesystem every process sees" not in output
    assert not (tmp_path / "h").exists()


def test_a_distributed_step_is_one_all_reduce(three_shards, monkeypatch):
    """A step of 2 processes is one all-reduce (gradients, rows and loss in one buffer),
    not one per parameter plus one for the loss. The stand-in all-reduce adds an identical
    second process (it doubles the buffer), so the step must equal one process's step on
    the same batch: same loss, same weights after Adam."""
    calls = []

    def all_reduce(tensor, op=None):
        calls.append(tensor.numel())
        tensor.mul_(2)

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    # (ProcessGroup places its small tensors by the backend: no process group exists here)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda *a: "gloo")
    data = LabelledData(three_shards)
    options = TrainOptions(data=str(three_shards), out="", device="cpu", batch_size=64, **HEAD)
    alone, pair = Trainer(options, data), Trainer(options, data, ProcessGroup(rank=0, world=2))
    window = next(data.windows([0], 1, alone.heldout))
    fixed = alone._window_targets(window)
    batch = torch.nonzero(~window.state_heldout).squeeze(1)[:32]
    start = [p.detach().clone() for p in pair.head.parameters()]
    for _ in range(3):
        assert pair._step((window, fixed, batch)) == pytest.approx(
            alone._step((window, fixed, batch)), rel=1e-6)
    assert len(calls) == 3  # one per step
    assert calls[0] == sum(p.numel() for p in pair.head.parameters()) + 2
    for a, b, before in zip(alone.head.parameters(), pair.head.parameters(), start):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()
        assert not torch.equal(b, before)  # the steps moved the weights


# ---------------------------------------------------------------- processes that disagree
# Each process of this script trains with its own options ("{rank}" in a string option is
# its rank, as a node-local path would differ per node), writes what train raised to
# REPORT/rank<N>.txt, and waits (60 s at most) for the other reports before it leaves, so
# that torchrun, which stops the others when one process exits, cannot stop a process before
# it reports. Its process id goes to REPORT/rank<N>.pid: torchrun starts each process in a
# session of its own, so a hung one is stopped by its id.
PER_RANK_SCRIPT = """
import json, os, sys, time
from pathlib import Path
from vllm_recontrol.training.common import DataError
from vllm_recontrol.training.trainer import train
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
report = Path(sys.argv[1])
(report / f"rank{rank}.pid").write_text(str(os.getpid()))
options = json.loads(sys.argv[2].replace("{rank}", str(rank)))
options.update(options.pop("per_rank", {}).get(str(rank), {}))
try:
    train(**options)
    text = "ok"
except DataError as exc:
    text = "error: " + str(exc)
(report / f"rank{rank}.tmp").write_text(text)
os.replace(report / f"rank{rank}.tmp", report / f"rank{rank}.txt")
deadline = time.monotonic() + 60
while time.monotonic() < deadline and not all(
        (report / f"rank{r}.txt").exists() for r in range(world)):
    time.sleep(0.05)
sys.stdout.flush()
os._exit(0 if text == "ok" else 1)
"""
# A job that cannot start must stop at once; a hang is a failure well before the suite's
# timeout (a 2-process run of these tiny data sets takes about 10 s).
HANG_SECONDS = 120


def per_rank_train(tmp_path, options: dict, processes: int = 2) -> list[str]:
    """Run ``train`` under torchrun with per-rank options; each process's outcome, by rank."""
    script, report = tmp_path / "per_rank.py", tmp_path / "report"
    script.write_text(PER_RANK_SCRIPT)
    report.mkdir()
    options = {"device": "cpu", "progress": False, **options}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={processes}", str(script), str(report), json.dumps(options)]
    log = tmp_path / "torchrun.log"  # a file, not a pipe: a hung process cannot block reading
    with open(log, "w") as sink:
        proc = subprocess.Popen(command, cwd=tmp_path, stdout=sink, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=HANG_SECONDS)
        except subprocess.TimeoutExpired:
            stop_hung_job(proc, report)
            pytest.fail(f"the processes hung for {HANG_SECONDS} s: {log.read_text()[-2000:]}")
    reports = [report / f"rank{rank}.txt" for rank in range(processes)]
    assert all(path.exists() for path in reports), log.read_text()[-3000:]
    return [path.read_text() for path in reports]


def stop_hung_job(proc: subprocess.Popen, report) -> None:
    """Stop torchrun and the processes it started (by their ids), nothing else."""
    for pid_file in report.glob("rank*.pid"):
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    proc.kill()
    proc.wait()


def bellman_options(data, out, **overrides) -> dict:
    return {**HEAD, "target": "bellman", "batch_size": 8, "shuffle_shards": 1,
            "data": str(data), "out": str(out), **overrides}


@pytest.fixture(scope="module")
def two_process_checkpoint(three_shards, tmp_path_factory):
    """The --checkpoint folder of a 2-process run stopped after 2 epochs."""
    tmp = tmp_path_factory.mktemp("ck2")
    ran(torchrun_train(tmp, *head_flags(three_shards, tmp / "head", target="bellman", epochs=2,
                                        batch_size=8, shuffle_shards=1),
                       "--checkpoint", str(tmp / "ck")))
    return tmp / "ck"


def test_a_checkpoint_only_one_process_sees_stops_every_process(
        three_shards, two_process_checkpoint, tmp_path):
    """A node-local --checkpoint folder: rank 0 finds the checkpoint of epoch 2, rank 1
    finds none. Both stop at once with the same error naming the checkpoint, each rank's
    view and the fix, instead of training different epochs and waiting on each other."""
    shutil.copytree(two_process_checkpoint, tmp_path / "ck0")
    outcomes = per_rank_train(tmp_path, bellman_options(
        three_shards, tmp_path / "head", epochs=4, checkpoint=str(tmp_path / "ck{rank}")))
    assert outcomes[0] == outcomes[1], outcomes
    assert outcomes[0].startswith("error: train: the 2 processes do not start from the same "
                                  "point"), outcomes[0]
    assert "checkpoint differs (rank 0: epoch 2, tensors " in outcomes[0]
    assert "; rank 1: none yet)" in outcomes[0]
    assert "the --checkpoint folder must be on a filesystem every process sees" in outcomes[0]
    for other in ("data", "options", "held-out split", "initial head"):  # those agree
        assert f"{other} differs" not in outcomes[0], outcomes[0]
    assert not (tmp_path / "head").exists()


def test_a_checkpoint_given_to_one_process_only_stops_every_process(three_shards, tmp_path):
    """Rank 0 saves checkpoints (and gathers every rank's generators at each save), rank 1
    was started without --checkpoint: both stop at the start instead of hanging."""
    outcomes = per_rank_train(tmp_path, bellman_options(
        three_shards, tmp_path / "head", epochs=2, checkpoint=str(tmp_path / "ck"),
        per_rank={"1": {"checkpoint": None}}))
    assert outcomes[0] == outcomes[1], outcomes
    assert "checkpoint differs (rank 0: none yet; rank 1: none (no --checkpoint))" in \
        outcomes[0], outcomes[0]
    assert not (tmp_path / "head").exists()


def test_a_checkpoint_damaged_for_one_process_stops_every_process(
        three_shards, two_process_checkpoint, tmp_path):
    """Rank 1 reads a damaged state.json, rank 0 a good one: rank 1's load error, naming
    the rank, stops both processes (rank 0 is not left waiting in a collective)."""
    shutil.copytree(two_process_checkpoint, tmp_path / "ck0")
    shutil.copytree(two_process_checkpoint, tmp_path / "ck1")
    (tmp_path / "ck1" / "state.json").write_text("{damaged")
    outcomes = per_rank_train(tmp_path, bellman_options(
        three_shards, tmp_path / "head", epochs=4, checkpoint=str(tmp_path / "ck{rank}")))
    assert outcomes[0] == outcomes[1], outcomes
    assert outcomes[0].startswith("error: train: stopped before training, on rank 1: "), \
        outcomes[0]
    assert "ck1/state.json is not valid JSON" in outcomes[0]
    assert "rank 0 could start" in outcomes[0]
    assert not (tmp_path / "head").exists()


def test_an_out_rank_0_cannot_write_stops_every_process_before_training(three_shards,
                                                                         tmp_path):
    """Rank 0 writes the head and alone checks --out: its error, and a pointer to it on the
    other ranks (not the shared-filesystem hint of a start that differs between ranks)."""
    (tmp_path / "afile").write_text("x")
    outcomes = per_rank_train(tmp_path, bellman_options(three_shards,
                                                        tmp_path / "afile" / "head"))
    assert outcomes[0] == f"error: --out {tmp_path / 'afile' / 'head'} cannot be created " \
                          "(Not a directory)", outcomes[0]
    # rank 0's --out, not this process's own (they may differ: a relative path, another cwd)
    assert outcomes[1] == "error: train: rank 0 cannot write the head to its --out (its " \
                          "error says why)", outcomes[1]


def test_processes_that_see_different_shards_stop_together(three_shards, tmp_path):
    """--allow-partial while a shard is still being written, and rank 1 started before it
    was done: the processes see 3 and 2 shards; both stop, naming the shard counts."""
    shutil.copytree(three_shards, tmp_path / "d0")
    shutil.copytree(three_shards, tmp_path / "d1")
    last = manifest_shards(read_manifest(tmp_path / "d1"))[-1].name
    states_path(tmp_path / "d1", last).unlink()  # not done for rank 1
    outcomes = per_rank_train(tmp_path, bellman_options(
        tmp_path / "d{rank}", tmp_path / "head", epochs=2, allow_partial=True))
    assert outcomes[0] == outcomes[1], outcomes
    assert "data differs (rank 0: " in outcomes[0], outcomes[0]
    assert "shards='3 shards, " in outcomes[0] and "shards='2 shards, " in outcomes[0]
    assert "--allow-partial" in outcomes[0]
    assert "options differs" not in outcomes[0] and "checkpoint differs" not in outcomes[0]
    assert not (tmp_path / "head").exists()


# ---------------------------------------------------------------- dealing shards to processes
def check_dealt(dealt: list[list[int]], order: list[int], states: list[int]) -> None:
    """Every shard to exactly one process, in the order's sequence, and the processes'
    training states within one shard's states of each other."""
    assert sorted(sum(dealt, [])) == sorted(order)
    position = {shard: i for i, shard in enumerate(order)}
    for shards in dealt:
        assert [position[s] for s in shards] == sorted(position[s] for s in shards)
    loads = [sum(states[s] for s in shards) for shards in dealt]
    assert sum(loads) == sum(states)
    assert max(loads) - min(loads) <= max(states), (loads, states)


@pytest.mark.parametrize("world", [2, 3])
def test_shards_are_dealt_by_training_states(world):
    from vllm_recontrol.training.distributed import deal_shards

    rng = random.Random(world)
    for _ in range(50):
        states = [rng.choice([0, 1, 50, 400, 3000]) + rng.randrange(100)
                  for _ in range(rng.randrange(1, 30))]
        order = list(range(len(states)))
        rng.shuffle(order)
        check_dealt(deal_shards(order, states, world), order, states)
    assert deal_shards([2, 0, 1], [5, 9, 1], 1) == [[2, 0, 1]]  # alone: the order itself


@pytest.fixture(scope="module")
def six_shards(tmp_path_factory):
    data = fake_collect(tmp_path_factory.mktemp("dist6"), count=40, shard_size=7)[0]
    label(data=str(data), reward_fn=good_reward, progress=False)
    return data


@pytest.mark.parametrize("world", [2, 3])
def test_each_process_trains_its_share_of_every_epoch(six_shards, world):
    """Six shards of unequal size, windows of 4: every training state (counted from the
    shard indexes and the held-out prompts) is in exactly one process's windows, and the
    processes' training states differ by at most one shard's (dealt by window, one process
    would get 4 shards and another 2 or none)."""
    data = LabelledData(six_shards)
    heldout = data.heldout_prompts(HEAD["heldout_fraction"], 0)
    states = []
    for shard in data.shards:
        lengths = shard.index.offsets[1:] - shard.index.offsets[:-1]
        states.append(int(lengths[~heldout[shard.index.prompt_index]].sum()))
    assert len(states) == 6 and len(set(states)) > 1
    options = TrainOptions(data=str(six_shards), out="", device="cpu", shuffle_shards=4, **HEAD)
    order = torch.randperm(6, generator=torch.Generator().manual_seed(3)).tolist()
    windows = [Trainer(options, data, ProcessGroup(rank=rank, world=world))._my_windows(order)
               for rank in range(world)]
    assert all(len(window) <= 4 for mine in windows for window in mine)
    check_dealt([sum(mine, []) for mine in windows], order, states)


def test_one_process_keeps_the_shard_order(six_shards):
    """Alone, windows are the seeded shard order cut every ``shuffle_shards`` shards, as
    before shards were dealt (so single-process runs train exactly as they did)."""
    options = TrainOptions(data=str(six_shards), out="", device="cpu", shuffle_shards=4, **HEAD)
    order = [4, 1, 5, 0, 3, 2]
    assert Trainer(options, LabelledData(six_shards))._my_windows(order) == [[4, 1, 5, 0], [3, 2]]


def test_the_disagreement_message_groups_ranks_and_shows_what_differs():
    """Five processes, two of which (3 and 4) see another checkpoint and one option: the
    message names each differing fact once, the ranks in runs, only the options that differ,
    and each fix once; equal facts make no message."""
    from vllm_recontrol.training.distributed import disagreement_message, failed_start_message

    def facts(rank):
        late = rank >= 3
        return {"options": {"lr": 0.01, "epochs": 2 if late else 4, "seed": 0},
                "data": {"shards": "3 shards, 40 responses"},
                "checkpoint": "none" if late else "epoch 2, tensors ab"}

    fixes = {"options": "same options.", "checkpoint": "share the folder.", "data": "same data."}
    message = disagreement_message([facts(rank) for rank in range(5)], fixes)
    assert "options differs (ranks 0-2: epochs=4; ranks 3-4: epochs=2)" in message, message
    assert "checkpoint differs (ranks 0-2: epoch 2, tensors ab; ranks 3-4: none)" in message
    assert "data differs" not in message and "lr=" not in message
    assert message.endswith("Fix: same options. share the folder.")
    assert disagreement_message([facts(0), facts(1)], fixes) is None
    failed = failed_start_message([None, "bad file", None, "bad file"])
    assert failed.startswith("train: stopped before training, on ranks 1, 3: bad file ("), failed
    assert "ranks 0, 2 could start" in failed
