"""One run per output folder: a live run's folder is refused by name, a dead run's is not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from training_fakes import FakeEngines, fake_collect, write_prompts
from vllm_recontrol.training.common import DataError
from vllm_recontrol.folder_lock import LOCK_FILE, exclusive_folder

HOLDER = textwrap.dedent("""
    import sys, time
    from vllm_recontrol.folder_lock import exclusive_folder
    with exclusive_folder(sys.argv[1], "eval"):
        print("held", flush=True)
        time.sleep(600)
""")


@pytest.fixture
def holder(tmp_path):
    """Another process holding ``tmp_path / 'out'``; yields (folder, process)."""
    folder = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "held"
        yield folder, process
    finally:
        process.kill()
        process.wait()


def test_a_folder_held_by_a_live_run_is_refused_with_who_holds_it(holder):
    folder, process = holder
    with pytest.raises(DataError) as caught:
        with exclusive_folder(folder, "collect"):
            pytest.fail("entered a folder another process holds")
    message = str(caught.value)
    assert f"--out {folder} is in use by another run" in message
    assert f"`vllm-recontrol eval`, process {process.pid}" in message
    assert "use another --out" in message


def test_a_killed_runs_lock_file_is_no_lock(holder):
    folder, process = holder
    os.kill(process.pid, signal.SIGKILL)  # no cleanup runs: the file still names it
    process.wait()
    assert b'"command": "eval"' in (folder / LOCK_FILE).read_bytes()
    with exclusive_folder(folder, "collect"):
        assert b'"command": "collect"' in (folder / LOCK_FILE).read_bytes()
    assert (folder / LOCK_FILE).read_bytes() == b""  # released: it names no run


def test_one_process_cannot_hold_a_folder_twice_but_can_take_it_again(tmp_path):
    with exclusive_folder(tmp_path / "out", "eval"):
        with pytest.raises(DataError, match="in use by another run"):
            with exclusive_folder(tmp_path / "out", "eval"):
                pass
    with exclusive_folder(tmp_path / "out", "eval"):
        pass


def test_a_file_where_the_folder_should_be_is_named(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(DataError, match=r"--out .*out exists and is not a folder"):
        with exclusive_folder(tmp_path / "out", "eval"):
            pass


def test_collect_refuses_a_held_folder_before_any_engine_and_resumes_after(tmp_path):
    engines = FakeEngines()
    (tmp_path / "data").mkdir()  # made beforehand: the lock file stays in it
    with exclusive_folder(tmp_path / "data", "collect"):
        with pytest.raises(DataError, match="in use by another run"):
            fake_collect(tmp_path, count=8, shard_size=4, engines=engines)
    assert engines.generate_calls == engines.states_calls == 0
    # the folder now holds only the lock file: still a fresh folder to collect into
    assert [p.name for p in (tmp_path / "data").iterdir()] == [LOCK_FILE]
    summary = fake_collect(tmp_path, count=8, shard_size=4)[2]
    assert summary["shards done / planned"] == "2 / 2"


def test_label_sets_are_held_one_by_one(tmp_path):
    from vllm_recontrol.training.labeler import label

    data = fake_collect(tmp_path, count=8, shard_size=4)[0]
    module = tmp_path / "lock_rewards.py"
    module.write_text("def constant(prompt, response):\n    return 1.0\n")
    sys.path.insert(0, str(tmp_path))
    try:
        options = dict(data=str(data), reward_fn="lock_rewards:constant", progress=False)
        with exclusive_folder(data, "label", lock_name=".vllm-recontrol-label-a.lock"):
            with pytest.raises(DataError, match=r"label set 'a' of --data .* is in use by "
                                                r"another run .*use another --name"):
                label(name="a", **options)
            assert label(name="b", **options)["label set"] == "b"  # another set: free
        assert label(name="a", **options)["label set"] == "a"
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("lock_rewards", None)


@pytest.mark.parametrize("name", ["..", ".", "a/b", "a\n", ""])
def test_label_set_names_that_are_not_one_folder_are_refused(tmp_path, name):
    from vllm_recontrol.training.labeler import label

    with pytest.raises(DataError, match="a label set name is a folder name"):
        label(data=str(tmp_path), name=name, reward_fn="os:getcwd")


def test_eval_refuses_a_held_out_folder_before_anything_loads(tmp_path):
    from vllm_recontrol.evaluation.evaluate import evaluate

    prompts = write_prompts(tmp_path / "prompts.jsonl", 4)
    with exclusive_folder(tmp_path / "eval", "eval"):
        with pytest.raises(DataError, match="in use by another run"):
            # a reward function that does not exist: it would fail if anything got this far
            evaluate(model="org/no-model", value_head=str(tmp_path / "no-head"),
                     prompts=str(prompts), reward_fn="no_such_module:f",
                     out=str(tmp_path / "eval"))


def test_train_refuses_a_held_checkpoint_and_uses_it_once_free(tmp_path):
    from vllm_recontrol.training.labeler import label
    from vllm_recontrol.training.trainer import train

    data = fake_collect(tmp_path, count=16, shard_size=8)[0]
    label(data=str(data), reward_fn="training_fakes:good_reward", progress=False)
    options = dict(data=str(data), out=str(tmp_path / "head"), epochs=1, widths=[8],
                   device="cpu", progress=False, checkpoint=str(tmp_path / "ck"))
    with exclusive_folder(tmp_path / "ck", "train"):
        with pytest.raises(DataError, match=r"--checkpoint .*ck is in use by another run "
                                            r".*use another --checkpoint"):
            train(**options)
    assert not (tmp_path / "head").exists() and not (tmp_path / "ck" / "state.json").exists()
    train(**options)
    assert (tmp_path / "ck" / "state.json").is_file() and (tmp_path / "head").is_dir()


def test_a_folder_made_for_a_run_that_wrote_nothing_is_removed_again(tmp_path):
    with pytest.raises(RuntimeError, match="bad prompts"):
        with exclusive_folder(tmp_path / "fresh", "eval"):
            raise RuntimeError("bad prompts")
    assert not (tmp_path / "fresh").exists()
    with exclusive_folder(tmp_path / "wrote", "eval") as folder:
        (folder / "eval.json").write_text("{}")
    assert (tmp_path / "wrote" / "eval.json").is_file()
    (tmp_path / "was-there").mkdir()
    with exclusive_folder(tmp_path / "was-there", "eval"):
        pass
    assert (tmp_path / "was-there").is_dir()  # not made by the run: kept, with its lock file


def test_a_folder_that_cannot_hold_a_lock_file_is_used_unguarded_with_a_warning(
        tmp_path, monkeypatch, caplog):
    import errno

    real_open = os.open

    def read_only_mount(path, flags, *args):
        if str(path).endswith(LOCK_FILE):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    (tmp_path / "data").mkdir()
    monkeypatch.setattr(os, "open", read_only_mount)
    with caplog.at_level("WARNING", logger="vllm_recontrol"):
        with exclusive_folder(tmp_path / "data", "label") as folder:
            assert folder == tmp_path / "data"
    assert "cannot create the lock file" in caplog.text


def test_collect_overwrite_waits_for_no_label_run_but_refuses_a_live_one(tmp_path):
    from vllm_recontrol.folder_lock import label_lock_name
    from vllm_recontrol.training.labeler import label

    data = fake_collect(tmp_path, count=8, shard_size=4)[0]
    label(data=str(data), reward_fn="training_fakes:good_reward", name="r", progress=False)
    with exclusive_folder(data, "label", lock_name=label_lock_name("r")):
        with pytest.raises(DataError, match=r"label set 'r' of --out .* is in use by another "
                                            r"run .*let it end before deleting it"):
            fake_collect(tmp_path, count=8, shard_size=4, overwrite=True)
    assert (data / "labels" / "r").is_dir()  # the live label run's files are still there
    fake_collect(tmp_path, count=8, shard_size=4, overwrite=True)  # none running: deleted
    assert not (data / "labels").exists()


def test_a_lock_file_removed_under_a_run_is_retaken_from_disk(tmp_path, monkeypatch):
    """A run that opened the lock file of a folder whose maker then ended without writing
    (and so removed the folder with its lock file) must not hold the removed file: it takes
    the folder and lock file on disk again, so a third run cannot hold the folder beside it."""
    import fcntl

    from vllm_recontrol import folder_lock

    real_flock, calls = fcntl.flock, []

    def flock_after_the_maker_left(fd, operation):
        calls.append(operation)
        if len(calls) == 1:  # the maker removes its folder between our open and our lock
            folder_lock._remove_if_only_locks(tmp_path / "out")
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock_after_the_maker_left)
    with exclusive_folder(tmp_path / "out", "eval"):
        assert len(calls) == 2  # locked the removed file, saw it, took the one on disk
        monkeypatch.setattr(fcntl, "flock", real_flock)
        with pytest.raises(DataError, match="in use by another run"):
            with exclusive_folder(tmp_path / "out", "eval"):
                pass
    assert not (tmp_path / "out").exists()
