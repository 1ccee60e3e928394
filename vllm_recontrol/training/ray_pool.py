"""Ray actors that each take whole shards: ``collect`` and ``label`` with ``--ray --replicas N``.

Why whole shards handed out one at a time: a shard's files then do not depend on which actor
wrote it (each is written by exactly one actor, atomically), and slow and fast replicas
balance. The options object names the placement (``replicas``, ``ray_address``,
``ray_num_cpus``, ``ray_num_gpus``); on a cluster of several machines the output folder must
be on a filesystem every node sees. The user's own code that the actors import (a reward
function's module) travels with them, see ``local_code``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import importlib.util
import inspect
import math
import os
import re
import socket
import sys
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .common import DataError, progress
from ..logs import get_logger

logger = get_logger(__name__)


def add_ray_arguments(parser: argparse.ArgumentParser, replicas_are: str) -> None:
    """The Ray flags of every command that can spread its work over actors."""
    parser.add_argument("--ray", action="store_true", help=f"Ray actors: {replicas_are}")
    parser.add_argument("--replicas", type=int, help="Ray actors with --ray")
    parser.add_argument("--ray-address", help="Ray cluster address (default: local)")
    parser.add_argument("--ray-num-cpus", type=float, help="CPUs per actor (default 1)")
    parser.add_argument("--ray-num-gpus", type=float, help="GPUs per actor (0 on CPU, 1 on GPU)")


def check_replicas(replicas: Any, ray: bool, replicas_are: str) -> None:
    """A positive integer, and above 1 only with Ray."""
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas <= 0:
        raise DataError(f"--replicas must be a positive integer, got {replicas!r}")
    if replicas > 1 and not ray:
        raise DataError(f"replicas > 1 needs ray (--ray): {replicas_are}")


def local_code(module_names: Iterable[str]) -> list[str]:
    """The folders (packages) and ``.py`` files that hold these modules' top-level packages,
    for those that no installed distribution provides and the standard library lacks.

    Why: Ray puts the driver's working folder on its workers' path, which only helps workers
    on the driver's machine; a module the driver imports from its own folders must be shipped
    (Ray's ``py_modules``) for actors on other machines. Installed packages are left to the
    cluster's environment. Modules that cannot be found are skipped (the actor's import then
    names them)."""
    installed = importlib.metadata.packages_distributions()
    paths: list[str] = []
    for name in module_names:
        top = name.split(".")[0]
        if not top or top == "__main__" or top in sys.stdlib_module_names or top in installed:
            continue
        module = sys.modules.get(top)
        spec = getattr(module, "__spec__", None) or importlib.util.find_spec(top)
        if spec is None:
            continue
        if spec.submodule_search_locations:  # a package: ship its folder(s)
            found = [str(Path(p)) for p in spec.submodule_search_locations]
        elif spec.origin and spec.origin.endswith(".py"):
            found = [spec.origin]
        else:  # built in, compiled or frozen: nothing Ray could ship
            found = []
        paths += [p for p in found if p not in paths]
    return paths


_started_ray = False  # ray.init was called in this process (ray_started_in_this_process)


def ray_started_in_this_process() -> bool:
    """Whether this process started (or joined) Ray: its native teardown at interpreter
    exit can crash after a Ctrl-C (``cli.main`` then ends the process at once)."""
    return _started_ray


@contextlib.contextmanager
def ray_actors(opts: Any, worker_class: type, count: int, *args: Any,
               ship_modules: Iterable[str] = (),
               reserve: dict[str, float] | None = None) -> Iterator[list[Any]]:
    """``min(opts.replicas, count)`` actors of ``worker_class(*args)``, each with
    ``opts.ray_num_cpus`` CPUs and ``opts.ray_num_gpus`` GPUs; Ray is started here when it is
    not running yet (``opts.ray_address``, default local) and stopped again after.
    ``ship_modules``: module names the actors import that may exist only on the driver's
    machine (``local_code`` decides which of them travel, with the job that starts here).
    ``reserve``: CPUs and GPUs that other actors of the same job will hold ({"CPU": 2.0}),
    counted in the check that the cluster can place everything."""
    try:
        import ray
    except ImportError as exc:
        raise DataError("--ray needs Ray: pip install 'ray>=2.9'") from exc
    wanted = min(opts.replicas, count)
    if wanted <= 0:  # nothing left to do (a finished run started again): no cluster needed
        yield []
        return
    check_actor_resources(opts)
    ship = local_code(ship_modules)
    started_here = not ray.is_initialized()
    if started_here:
        address, named = _address_named(opts.ray_address)
        _check_address(address, named)
        # Ray uploads local code only for a whole job (ray.init), not for single actors.
        if ship:
            logger.info("vllm-recontrol: shipping %s to the Ray workers (py_modules)",
                        ", ".join(ship))
        global _started_ray
        _started_ray = True
        try:
            ray.init(address=opts.ray_address, include_dashboard=False,
                     ignore_reinit_error=True,
                     runtime_env={"py_modules": ship} if ship else None)
        except ConnectionError as exc:  # "auto" with no cluster running, say
            raise DataError(f"{named}: no Ray cluster to connect to "
                            f"({str(exc).splitlines()[0]}); start one (ray start --head) or "
                            f"leave --ray-address out to start a local one") from None
        except BaseException:  # Ctrl-C while Ray starts: stop what it has started so far
            _shut_down_ray(ray)
            raise
    elif ship:
        logger.warning("vllm-recontrol: Ray was started before this call, so %s cannot be "
                       "shipped to its workers from here; actors on other machines import it "
                       "only if it is there, or if ray.init got runtime_env={'py_modules': %r}",
                       ", ".join(ship), ship)
    actors: list[Any] = []
    try:
        _check_resources(ray, opts, reserve or {}, actors=wanted)
        actor_class = ray.remote(num_cpus=opts.ray_num_cpus, num_gpus=opts.ray_num_gpus)(
            errors_on_first_call(worker_class))
        actors = [actor_class.remote(*args) for _ in range(wanted)]
        yield actors
    finally:
        for actor in actors:
            ray.kill(actor)
        if started_here:
            _shut_down_ray(ray)


def _shut_down_ray(ray: Any) -> None:
    """``ray.shutdown()``, and then the local node's processes it left running."""
    session = _session_dir()
    ray.shutdown()
    _stop_leftovers(session)


def _session_dir() -> str | None:
    """The local Ray node's session folder, which every process it started names in its
    command line (None: no local node, e.g. a cluster joined by address)."""
    from ray._private import worker

    node = getattr(worker, "_global_node", None)
    try:
        return node.get_session_dir_path() if node is not None else None
    except Exception:  # Ray's internals moved: nothing to look for
        return None


LEFTOVER_GRACE_S = 3.0


def _stop_leftovers(session: str | None) -> None:
    """Stop what the Ray node started here and ray.shutdown left running: after a Ctrl-C
    its dashboard and runtime-env agents outlived the command by a minute, where the
    interpreter's exit (which the CLI skips then: cli.main) used to end them."""
    if not session:
        return
    import psutil

    named = re.compile(re.escape(session) + r"(?=$|[/\s])")  # not session_..._10 for _1
    left = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            if process.pid != os.getpid() and named.search(
                    " ".join(process.info["cmdline"] or ())):
                process.terminate()
                left.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    _, alive = psutil.wait_procs(left, timeout=LEFTOVER_GRACE_S)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def actor_path(name: str | None) -> str | None:
    """A local file or folder as its absolute path, for Ray actors: they may run in another
    working directory (a cluster started by ``ray start`` elsewhere), where a relative path
    names another folder or none, and would then be looked up on the Hugging Face Hub. A hub
    id (nothing at that path here) as given."""
    try:
        if name and Path(name).expanduser().exists():
            return str(Path(name).expanduser().resolve())
    except OSError:  # a text too long to be a path (a chat template given inline)
        pass
    return name


# vllm.LLM arguments that may name a local file or folder, with the values of each that
# are vLLM's own words, not paths (a folder of that name here must not replace them).
ENGINE_PATH_ARGUMENTS: dict[str, tuple[str, ...]] = {
    "tokenizer": (), "download_dir": (), "hf_config_path": (), "chat_template": (),
    "allowed_local_media_path": (), "log_config_file": (), "model_weights": (),
    "generation_config": ("auto", "vllm")}


def actor_engine_args(engine_args: dict[str, Any]) -> dict[str, Any]:
    """``engine_args`` for an actor's engine: local paths among them absolute, as for the
    model (``actor_path``); a hub id, an inline chat template or a keyword as given."""
    return {key: actor_path(value) if key in ENGINE_PATH_ARGUMENTS and isinstance(value, str)
            and value not in ENGINE_PATH_ARGUMENTS[key] else value
            for key, value in engine_args.items()}


def actor_reward_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    """A reward source's arguments (``LabelOptions.source_arguments``) for an actor."""
    return {**arguments, "reward_model": actor_path(arguments.get("reward_model")),
            "engine_args": actor_engine_args(arguments.get("engine_args") or {})}


def check_actor_resources(opts: Any) -> None:
    """CPUs and GPUs per actor: numbers >= 0, before any cluster starts (Ray checks them only
    when the first actor is made)."""
    for key, default_flag in (("cpu", "--ray-num-cpus"), ("gpu", "--ray-num-gpus")):
        value = getattr(opts, f"ray_num_{key}s")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not 0 <= value < math.inf:
            flag = getattr(opts, f"{key}_flag", default_flag)
            raise DataError(f"{flag} must be a number >= 0 ({key.upper()}s per Ray actor), "
                            f"got {value!r}")


# How long a Ray address named with a port may take to accept a connection (Ray itself
# retries an address where nothing listens for about 13 minutes before it gives up).
ADDRESS_TIMEOUT_S = 10.0


def _address_named(address: str | None) -> tuple[str | None, str]:
    """The address Ray will use (``--ray-address``, else its ``RAY_ADDRESS``) and how an
    error names it."""
    if not address and os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"], f"RAY_ADDRESS={os.environ['RAY_ADDRESS']} (no " \
                                          "--ray-address given)"
    return address, f"--ray-address {address}"


def _check_address(address: str | None, named: str) -> None:
    """An address ``host:port`` must accept a connection: a typo, or a cluster that went
    down, is a one-line error at once rather than a command that seems to hang."""
    match = re.fullmatch(r"(ray://)?\[?([^\]/]+?)\]?:(\d+)", address or "")
    if not match:  # None (start one), "auto", "local": Ray's own rules
        return
    client, host, port = match.group(1), match.group(2), int(match.group(3))
    try:
        socket.create_connection((host, port), timeout=ADDRESS_TIMEOUT_S).close()
    except OSError as exc:
        start = ("ray start --head: its client server listens on 10001 unless "
                 "--ray-client-server-port says otherwise" if client else
                 f"ray start --head --port {port}")
        raise DataError(f"{named}: no Ray cluster answers there ({exc.strerror or exc}); "
                        f"start one ({start}), or fix the address") from None


def errors_on_first_call(worker_class: type) -> type:
    """``worker_class`` whose constructor's error is raised by the first method called
    instead: Ray reports an error of a method as that error (``RayTaskError`` holds it, and
    ``run_main`` prints it as one line), but one of a constructor only as the text of an
    ``ActorDiedError``."""
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        self._start_error = None
        try:
            worker_class.__init__(self, *args, **kwargs)
        except Exception as exc:  # kept for the first call (the actor stays up till then)
            self._start_error = exc

    def deferred(method: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.iscoroutinefunction(method):  # Ray runs these as async actor methods
            @functools.wraps(method)
            async def call_async(self: Any, *args: Any, **kwargs: Any) -> Any:
                if self._start_error is not None:
                    raise self._start_error
                return await method(self, *args, **kwargs)
            return call_async

        @functools.wraps(method)
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            if self._start_error is not None:
                raise self._start_error
            return method(self, *args, **kwargs)
        return call

    members = {name: deferred(member)
               for name, member in inspect.getmembers(worker_class, inspect.isfunction)
               if not name.startswith("_") and not isinstance(
                   inspect.getattr_static(worker_class, name), (staticmethod, classmethod))}
    return type(worker_class.__name__, (worker_class,),
                {"__init__": __init__, "__module__": worker_class.__module__, **members})


def _check_resources(ray: Any, opts: Any, reserve: dict[str, float],
                     actors: int | None = None) -> None:
    """Refuse a request that could never be scheduled instead of waiting forever; ``actors``:
    how many will be created (default ``opts.replicas``; fewer when there is less work)."""
    total = ray.cluster_resources()
    actors = opts.replicas if actors is None else actors
    for key, per_actor in (("CPU", opts.ray_num_cpus), ("GPU", opts.ray_num_gpus)):
        need, others = per_actor * actors, reserve.get(key, 0.0)
        if need + others > total.get(key, 0.0) + 1e-9:
            also = f" (+ {others} {key} for this job's other actors)" if others else ""
            raise DataError(f"{actors} replicas x {per_actor} {key} per actor = {need} "
                            f"{key}{also}, but the Ray cluster has {total.get(key, 0.0)}; "
                            f"lower the replicas or the {key}s per actor")
    if opts.ray_num_gpus == 0 and total.get("GPU", 0.0) > 0 and \
            not getattr(opts, "reward_fn", None):  # a reward function needs no GPU
        # Ray hides every GPU from an actor that asked for none (CUDA_VISIBLE_DEVICES=""):
        # its vLLM engine or reward model would find no GPU on a GPU cluster
        flag = getattr(opts, "gpu_flag", "--ray-num-gpus")
        logger.warning("vllm-recontrol: the Ray cluster has %g GPUs but %s is 0, so Ray hides "
                       "them from every actor (engines and reward models run without a GPU); "
                       "pass %s 1 to give each actor one", total["GPU"], flag, flag)


def dispatch(actors: list[Any], tasks: list[Callable[[Any], Any]], desc: str,
             show_progress: bool) -> None:
    """Run each task once on the first free actor; errors surface at once."""
    import ray

    queue = deque(tasks)
    running: dict[Any, Any] = {}
    bar = progress(total=len(tasks), desc=desc, unit="shard",
                   disable=not show_progress or not tasks)
    idle = list(actors)
    while queue or running:
        while queue and idle:
            actor = idle.pop()
            running[queue.popleft()(actor)] = actor
        ready, _ = ray.wait(list(running), num_returns=1)
        for ref in ready:
            actor = running.pop(ref)
            ray.get(ref)  # re-raises the actor's exception
            idle.append(actor)
            bar.update(1)
    bar.close()


def call_each(actors: list[Any], method: str) -> list[Any]:
    """Call ``method`` on every actor at once and wait for all of them."""
    import ray

    return ray.get([getattr(actor, method).remote() for actor in actors])
