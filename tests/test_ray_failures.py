"""What a user sees when Ray actors fail, and the checks made before a Ray cluster starts
(a real local Ray for the first; none for the others)."""

from __future__ import annotations

import contextlib
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from vllm_recontrol.training.common import DataError, run_main
from vllm_recontrol.training.ray_pool import actor_path, ray_actors

ray = pytest.importorskip("ray")


def placement(**overrides) -> SimpleNamespace:
    return SimpleNamespace(**{"replicas": 1, "ray_address": None, "ray_num_cpus": 0.25,
                              "ray_num_gpus": 0, **overrides})


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (ray_actors then neither starts nor stops one); the
    fake workers' module travels with the job. The actors' own stderr is not forwarded:
    Ray prints it on the driver's stderr whenever its log monitor gets to it, before or
    after the CLI's error line, and these tests check that line, not Ray's log."""
    fakes = Path(__file__).with_name("training_fakes.py")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"py_modules": [str(fakes)]})
    yield
    ray.shutdown()


def _call(worker_name: str) -> None:
    import training_fakes

    with ray_actors(placement(), getattr(training_fakes, worker_name), 1) as actors:
        ray.get(actors[0].work.remote())


@pytest.mark.parametrize("worker, first, count, last", [
    # a constructor's error used to arrive as an ActorDiedError: 200 lines, no "error:"
    ("FailingStartWorker", "error: value head folder heads/missing does not exist", 1, ""),
    # a method's as Ray's wrapper, whose text is the remote traceback (40 lines)
    ("FailingCallWorker", "error: collect: generation: the vLLM engine did not start "
                          "(ValueError: max_model_len too large)", 2, "hint: "),
    ("DyingWorker", "error: a Ray actor died (The actor died unexpectedly", 1,
     "; class_name: DyingWorker; pid: "),
])
def test_an_actors_error_reaches_the_cli_as_the_error_one_process_gives(
        local_ray, capsys, worker, first, count, last):
    assert run_main(_call, {"worker_name": worker}) == 1
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert lines[0].startswith(first), err
    assert len(lines) == count and "Traceback" not in err, err
    assert last in lines[-1], err


class RayStarts(Exception):
    pass


def no_ray_yet(monkeypatch, started: list | None = None) -> None:
    """As if no Ray ran in this process; ``ray.init`` records its address and stops there
    (or fails the test when ``started`` is None)."""
    def init(**kwargs):
        if started is None:
            pytest.fail("ray.init was called")
        started.append(kwargs["address"])
        raise RayStarts
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)


def test_an_actor_ray_cannot_create_names_ray_s_reason_without_the_rerun_advice(
        local_ray, tmp_path, monkeypatch, capsys):
    """A worker class the nodes cannot import (vllm-recontrol missing or of another version
    on a node, here a module only this process sees): Ray's reason, the last line of its
    text, not its first 600 characters (the reason was cut off), nor "run again"."""
    (tmp_path / "driver_only_worker.py").write_text(
        "class DriverOnlyWorker:\n    def work(self):\n        return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import driver_only_worker

    def run() -> None:
        with ray_actors(placement(), driver_only_worker.DriverOnlyWorker, 1) as actors:
            ray.get(actors[0].work.remote())

    assert run_main(run, {}) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: a Ray actor could not be created: "), err
    assert "No module named 'driver_only_worker'" in err or "failed to import" in err, err
    assert len(err.splitlines()) == 1 and "\x1b[" not in err and "^^^" not in err, err
    assert "run the command again" not in err and "same versions" in err, err


def test_an_address_where_no_cluster_listens_is_refused_at_once(monkeypatch):
    """Ray retries such an address for about 13 minutes before it gives up."""
    no_ray_yet(monkeypatch)
    with socket.socket() as probe:  # a port nothing listens on: bound, never listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(DataError, match=rf"--ray-address 127.0.0.1:{port}: no Ray cluster "
                                            rf"answers there \(.*\); start one"):
            with ray_actors(placement(ray_address=f"127.0.0.1:{port}"), object, 1):
                pass
        assert time.monotonic() - start < 5
        with pytest.raises(DataError, match=rf"ray://127.0.0.1:{port}: .*start one \(ray start "
                                            r"--head: its client server listens on 10001"):
            with ray_actors(placement(ray_address=f"ray://127.0.0.1:{port}"), object, 1):
                pass
        # Ray reads RAY_ADDRESS when no address is given (KubeRay pods set it)
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        with pytest.raises(DataError, match=rf"RAY_ADDRESS=127.0.0.1:{port} \(no --ray-address "
                                            r"given\): no Ray cluster answers there"):
            with ray_actors(placement(), object, 1):
                pass
        monkeypatch.delenv("RAY_ADDRESS")
    with socket.socket() as server:  # one that listens passes the probe (then ray.init)
        server.bind(("127.0.0.1", 0))
        server.listen()
        started: list = []
        no_ray_yet(monkeypatch, started)
        address = f"127.0.0.1:{server.getsockname()[1]}"
        with pytest.raises(RayStarts):
            with ray_actors(placement(ray_address=address), object, 1):
                pass
        assert started == [address]


@pytest.mark.parametrize("overrides, message", [
    ({"ray_num_cpus": -1.0}, r"--ray-num-cpus must be a number >= 0 \(CPUs per Ray actor\), "
                             r"got -1.0"),
    ({"ray_num_gpus": float("nan")}, r"--ray-num-gpus must be a number >= 0"),
    ({"ray_num_cpus": -0.5, "cpu_flag": "--reward-num-cpus"}, r"--reward-num-cpus must be"),
])
def test_negative_resources_per_actor_are_refused_before_ray_starts(monkeypatch, overrides,
                                                                    message):
    no_ray_yet(monkeypatch)
    with pytest.raises(DataError, match=message):
        with ray_actors(placement(**overrides), object, 1):
            pass


def test_eval_refuses_negative_engine_resources_before_its_reward_actors_start(
        tmp_path, monkeypatch):
    """With --reward-replicas the reward actors start first; the engines' placement was
    checked only when the first method needed them (Ray already up, 26 s in)."""
    from vllm_recontrol.evaluation.evaluate import evaluate

    no_ray_yet(monkeypatch)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n')
    with pytest.raises(DataError, match=r"--ray-num-cpus must be a number >= 0"):
        evaluate(model="m", value_head="h", prompts=str(prompts), ray=True, replicas=1,
                 ray_num_cpus=-1.0, reward_replicas=2, reward_num_cpus=0.1,
                 reward_fn="vllm_recontrol.toy_world:positive_share",
                 out=str(tmp_path / "e"))


def test_local_paths_go_to_actors_absolute(tmp_path, monkeypatch):
    """Actors of a cluster started elsewhere (ray start) run in another directory: a
    relative path would name another folder there, or be looked up on the hub."""
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert actor_path("models/tiny") == str(tmp_path.resolve() / "models" / "tiny")
    assert actor_path("~") == str(Path.home().resolve())
    assert actor_path("org/model") == "org/model"  # a hub id: nothing here by that name
    assert actor_path(None) is None and actor_path("hf://org/model") == "hf://org/model"


def test_engine_arguments_that_name_local_files_go_to_actors_absolute(tmp_path, monkeypatch):
    """The engine's own paths (a tokenizer folder, a chat template file) as the model's;
    a hub id, an inline template (too long to be a file name) and other values as given."""
    from vllm_recontrol.training.ray_pool import actor_engine_args, actor_reward_arguments

    (tmp_path / "tok").mkdir()
    (tmp_path / "chat.jinja").write_text("{{ messages }}")
    (tmp_path / "rm").mkdir()
    monkeypatch.chdir(tmp_path)
    inline = "{% for m in messages %}{{ m['content'] }}{% endfor %}" * 20
    given = {"tokenizer": "tok", "chat_template": "chat.jinja", "download_dir": "org/x",
             "dtype": "tok", "max_model_len": 64}
    assert actor_engine_args(given) == {
        "tokenizer": str(tmp_path.resolve() / "tok"),
        "chat_template": str(tmp_path.resolve() / "chat.jinja"), "download_dir": "org/x",
        "dtype": "tok", "max_model_len": 64}
    assert actor_engine_args({"chat_template": inline}) == {"chat_template": inline}
    (tmp_path / "gencfg").mkdir()
    (tmp_path / "vllm").mkdir()  # a checkout of vLLM here: "vllm" is still vLLM's keyword
    assert actor_engine_args({"generation_config": "gencfg"}) == {
        "generation_config": str(tmp_path.resolve() / "gencfg")}
    for keyword in ("auto", "vllm"):
        assert actor_engine_args({"generation_config": keyword}) == {
            "generation_config": keyword}
    arguments = {"reward_model": "rm", "reward_fn": None, "engine_args": {"tokenizer": "tok"}}
    assert actor_reward_arguments(arguments) == {
        "reward_model": str(tmp_path.resolve() / "rm"), "reward_fn": None,
        "engine_args": {"tokenizer": str(tmp_path.resolve() / "tok")}}
    assert arguments["engine_args"] == {"tokenizer": "tok"}  # the caller's left as it was


def test_eval_engine_actors_are_killed_not_waited_for_when_the_run_fails(monkeypatch):
    """Asking an actor to close queues behind its generation (the rest of a method's):
    after Ctrl-C or an error the actors are killed at once; an actor that died does not
    replace the error that ended the run; on success they are asked to close."""
    from training_fakes import closable_actors
    from vllm_recontrol.evaluation.engines import EnginePool

    closes, stopped = [], []

    def pool() -> EnginePool:
        made = EnginePool.__new__(EnginePool)
        made.local, made.actors = None, closable_actors(closes)
        made._stack = contextlib.ExitStack()
        made._stack.callback(lambda: stopped.append(1))
        return made

    monkeypatch.setattr(ray, "get", lambda refs: refs)
    pool().close(failing=True)
    assert (closes, stopped) == ([], [1])
    pool().close()
    assert (closes, stopped) == ([1, 1], [1, 1])

    def dead(refs):
        raise ray.exceptions.RayActorError()
    monkeypatch.setattr(ray, "get", dead)
    with pytest.raises(ray.exceptions.RayActorError):
        pool().close()
    assert stopped == [1, 1, 1]


def test_a_constructors_error_waits_for_the_first_call_of_any_kind():
    """Plain and async methods raise the constructor's error; static and class methods,
    which Ray does not call on the instance, are left as they are."""
    import asyncio

    from vllm_recontrol.training.ray_pool import errors_on_first_call

    class Worker:
        def __init__(self, fail: bool = False) -> None:
            if fail:
                raise DataError("no head here")

        def get(self) -> int:
            return 1

        async def get_later(self) -> int:
            return 2

        @staticmethod
        def pure(x: int) -> int:
            return x

        @classmethod
        def kind(cls) -> str:
            return cls.__name__

    deferring = errors_on_first_call(Worker)
    fine = deferring()
    assert (fine.get(), asyncio.run(fine.get_later()), fine.pure(3), deferring.kind()) == \
        (1, 2, 3, "Worker")
    broken = deferring(True)  # no error yet
    for call in (broken.get, lambda: asyncio.run(broken.get_later())):
        with pytest.raises(DataError, match="no head here"):
            call()


def test_collect_and_label_actors_get_local_engine_paths_absolute(tmp_path, monkeypatch):
    """What ``collect --ray`` and ``label --ray`` hand their actors (``ray_actors`` records
    its arguments and stops there): the engines' tokenizer folders absolute."""
    from vllm_recontrol.training import labeler, ray_collect
    from vllm_recontrol.training.collector import CollectOptions
    from vllm_recontrol.training.labeler import LabelOptions

    handed = []

    @contextlib.contextmanager
    def recording(opts, worker, count, *arguments, **keywords):
        handed.append(arguments)
        raise RayStarts
        yield

    (tmp_path / "tok").mkdir()
    (tmp_path / "model").mkdir()
    monkeypatch.chdir(tmp_path)
    absolute = str(tmp_path.resolve() / "tok")
    for module in (ray_collect, labeler):
        monkeypatch.setattr(module, "ray_actors", recording)
    opts = CollectOptions(model="model", prompts="p", out="out",
                          engine_args={"tokenizer": "tok"},
                          pooling_engine_args={"tokenizer": "tok"})
    with pytest.raises(RayStarts):
        ray_collect.run_with_ray(opts, {"model": "model"}, [], [], [])
    _, manifest, engine_args, pooling_engine_args, _ = handed[-1]
    assert manifest["model"] == str(tmp_path.resolve() / "model")
    assert engine_args == pooling_engine_args == {"tokenizer": absolute}
    assert opts.engine_args == {"tokenizer": "tok"}  # the manifest's (resume) copy unchanged
    with pytest.raises(RayStarts):
        labeler._label_with_ray(LabelOptions(data="d", reward_model="model",
                                             engine_args={"tokenizer": "tok"}),
                                tmp_path, tmp_path, ["shard-00000"])
    arguments = handed[-1][2]
    assert arguments["engine_args"] == {"tokenizer": absolute}
    assert arguments["reward_model"] == str(tmp_path.resolve() / "model")


def test_reward_actors_check_their_model_before_anything_generates(local_ray, tmp_path, capsys,
                                                                    monkeypatch):
    """``eval --reward-replicas N``: each actor checks the reward model's settings, tokenizer
    and config when the pool starts (the files may be on the workers only, so the driver
    cannot), not at the first score after base generated; the actors are killed."""
    from vllm_recontrol.evaluation.scoring import RewardPool

    (tmp_path / "empty-rm").mkdir()
    made, closes, close = [], [], RewardPool.close

    def recorded_close(pool, failing=False):
        closes.append(failing)
        close(pool, failing)

    monkeypatch.setattr(RewardPool, "close", recorded_close)

    def run() -> None:
        arguments = {"reward_model": str(tmp_path / "empty-rm"), "engine": "hf"}
        made.append(RewardPool(arguments, 1, 0.25, 0, None))

    assert run_main(run, {}) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"error: cannot load reward model '{tmp_path / 'empty-rm'}': the folder "
                   f"has no config.json (a model folder is one saved with save_pretrained)"), err
    assert made == [] and closes == [True]
