"""``vllm-recontrol collect``: sample responses with vLLM and store the states s_0..s_T.

Why this shape: collection is the expensive step (a 7B model over 160k prompts), so it must
resume after a crash without redoing finished work, scale out over many engines, and give the
same files however it was split. Hence fixed prompt ranges per shard, a per-request seed
derived from (seed, prompt index, sample index) only, atomic shard files, and two phases
(generate every pending shard, free the generator, then compute every pending shard's states).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..folder_lock import exclusive_folder, is_lock_file, label_lock_name, label_set_of
from ..package_versions import changed_versions, package_versions
from .common import (DataError, build_options, check_engine_args, check_engine_seed,
                     check_model_path, folder_fingerprint, json_argument, model_state_width,
                     parse_command_line, progress, run_main, sampling_refusal, sha256_bytes,
                     summary_table)
from .engines import (Engines, GenerationRequest, PromptRefused, VllmEngines,
                      pooling_limit_refusal)
from .prompts import PROMPT_FORMATS, load_prompts
from .ray_pool import add_ray_arguments, check_replicas
from .shards import (MANIFEST_FILE, STATE_DEFINITION, STATE_DTYPES, STATES_FORMAT,
                     STATES_FORMAT_VERSION, ShardPlan, manifest_shards, plan_shards,
                     read_manifest, read_rows, read_shard_index, shard_status,
                     write_manifest, write_rows, write_states)

# Positions of hidden states asked of the pooling engine at a time: it returns every
# position of every sequence, prompt included, in float32, so a whole shard at once (1024
# responses of ~450 positions at d = 4096) held 7-8 GB where the stored shard is ~1.7 GB.
# 65536 positions are 1 GiB of float32 at d = 4096.
STATES_CHUNK_POSITIONS = 65536


@dataclass
class CollectOptions:
    """Options of ``collect`` (CLI flags are the same names with dashes).

    Paper setting (arXiv 2406.05954): one sampled response per prompt, 128 new tokens.
    Sample (temperature about 1): with greedy responses every training label of a prompt set
    can be alike and the value head then learns nothing.
    """

    model: str
    prompts: str
    out: str
    split: str | None = None              # a data set's split (default train); not for a file
    data_dir: str | None = None
    prompt_column: str | None = None
    prompt_format: str = "auto"
    max_prompts: int | None = None
    chat_template: bool = False
    samples_per_prompt: int = 1
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)  # vLLM stop strings, e.g. a next turn
    seed: int = 0
    shard_size: int = 256
    state_dtype: str = "bfloat16"
    engine_args: dict[str, Any] = field(default_factory=dict)
    pooling_engine_args: dict[str, Any] = field(default_factory=dict)
    in_process: bool = False
    ray: bool = False
    replicas: int = 1
    ray_address: str | None = None
    ray_num_cpus: float = 1.0
    ray_num_gpus: float = 0.0
    overwrite: bool = False
    progress: bool = True

    def check(self) -> None:
        if self.prompt_format not in PROMPT_FORMATS:
            raise DataError(f"prompt_format must be one of {list(PROMPT_FORMATS)}")
        if self.state_dtype not in STATE_DTYPES:
            raise DataError(f"state_dtype must be one of {list(STATE_DTYPES)}, got "
                            f"{self.state_dtype!r}")
        for name in ("samples_per_prompt", "max_new_tokens", "shard_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise DataError(f"{name} must be a positive integer, got {value!r}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise DataError(f"temperature must be >= 0 and top_p in (0, 1], got temperature "
                            f"{self.temperature!r} and top_p {self.top_p!r}")
        if not all(self.stop):  # types are checked with every option's; "" would stop at once
            raise DataError(f"stop strings must not be empty, got {self.stop!r}")
        if not isinstance(self.engine_args, dict) or not isinstance(self.pooling_engine_args, dict):
            raise DataError("engine_args and pooling_engine_args must be JSON objects")
        check_model_path(self.model)
        check_engine_args(self.engine_args, "--engine-args")
        check_engine_args(self.pooling_engine_args, "--pooling-engine-args")
        refusal = pooling_limit_refusal(self.pooling_engine_args.get("max_model_len"),
                                        self.engine_args.get("max_model_len"), ", --engine-args")
        if refusal:  # before any engine starts; else once the generator has (its default)
            raise DataError(refusal)
        check_replicas(self.replicas, self.ray, "one vLLM engine per Ray actor, whole shards each")
        check_engine_seed(self.seed, "seed")
        refusal = sampling_refusal(self.sampling())  # before any file is written
        if refusal:
            raise DataError(f"sampling options refused by vLLM: {refusal}")

    def sampling_section(self) -> dict[str, Any]:
        """The manifest's "sampling" section (``stop`` only when given: collections made
        without it resume unchanged)."""
        return {"samples_per_prompt": self.samples_per_prompt,
                "max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "top_k": self.top_k, "seed": self.seed,
                **({"stop": list(self.stop)} if self.stop else {})}

    def sampling(self) -> dict[str, Any]:
        """vLLM's SamplingParams keywords of these options (``vllm_sampling``)."""
        return vllm_sampling(self.sampling_section())


def vllm_sampling(section: dict[str, Any]) -> dict[str, Any]:
    """vLLM's SamplingParams keywords of a manifest's "sampling" section: what the options
    are checked against and what the worker generates with, from one place."""
    params = {"temperature": section["temperature"], "top_p": section["top_p"],
              "top_k": section["top_k"], "max_tokens": section["max_new_tokens"]}
    return {**params, "stop": list(section["stop"])} if section.get("stop") else params


def derive_seed(seed: int, prompt_index: int, sample: int) -> int:
    """Per-request seed from the base seed and the prompt's global index: shard-independent."""
    digest = hashlib.sha256(f"recontrol/{seed}/{prompt_index}/{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


# ----------------------------------------------------------------------------- the worker
class CollectWorker:
    """Generates and encodes whole shards; runs in this process or as a Ray actor."""

    def __init__(self, out: str, manifest: dict[str, Any], engine_args: dict[str, Any],
                 pooling_engine_args: dict[str, Any], in_process: bool,
                 engines: Engines | None = None) -> None:
        self.out = Path(out)
        self.manifest = manifest
        sampling = manifest["sampling"]
        self.samples = int(sampling["samples_per_prompt"])
        self.seed = int(sampling["seed"])
        self.engines = engines or VllmEngines(
            manifest["model"], vllm_sampling(sampling),
            chat_template=manifest["chat_template"], engine_args=engine_args,
            pooling_engine_args=pooling_engine_args, in_process=in_process, seed=self.seed)

    def generate_shard(self, plan: ShardPlan, prompts: Sequence[str]) -> str:
        """Sample the shard's responses and write its ``.jsonl`` rows (atomically)."""
        requests, keys = [], []
        for offset, prompt in enumerate(prompts):
            index = plan.prompt_start + offset
            for sample in range(self.samples):
                requests.append(GenerationRequest(prompt, derive_seed(self.seed, index, sample)))
                keys.append((index, sample, prompt))
        try:
            generations = self.engines.generate(requests)
        except PromptRefused as exc:
            index, source = keys[exc.request][0], self.manifest["prompts"]["source"]
            raise DataError(f"shard {plan.name}: prompt {index + 1} of {source} (prompt_index "
                            f"{index}, counted from 0 in the shards): {exc}. Shorten or "
                            "remove that prompt, or raise max_model_len in engine_args (it "
                            "decides where responses are cut), then rerun with a new --out or "
                            "--overwrite: either change makes another collection") from exc
        if len(generations) != len(requests):
            raise RuntimeError(f"shard {plan.name}: {len(requests)} requests gave "
                               f"{len(generations)} outputs")
        rows = []
        for (index, sample, prompt), request, gen in zip(keys, requests, generations):
            if not gen.token_ids:
                raise DataError(f"shard {plan.name}: prompt_index {index} sample {sample} produced "
                                "no token (max_new_tokens must be >= 1)")
            rows.append({
                "response_id": index * self.samples + sample, "prompt_index": index,
                "sample": sample, "seed": request.seed, "prompt": prompt,
                "response": gen.text, "prompt_token_ids": gen.prompt_token_ids,
                "response_token_ids": gen.token_ids, "finish_reason": gen.finish_reason,
                "num_states": len(gen.token_ids),
            })
        write_rows(self.out, plan.name, rows)
        return plan.name

    def release_generator(self) -> None:
        self.engines.release_generator()

    def states_shard(self, name: str) -> str:
        """Compute s_0..s_T of every response of a generated shard; write its states file.

        The pooling engine returns every position of a sequence (the prompt's too) in
        float32, several times the stored 16-bit states: it is asked for about
        ``STATES_CHUNK_POSITIONS`` positions at a time, and each response's states go
        straight into one buffer of the stored dtype (the same bits as converting them all
        at the end)."""
        rows = read_rows(self.out, name)
        sequences = [r["prompt_token_ids"] + r["response_token_ids"][:-1] for r in rows]
        dtype = STATE_DTYPES[self.manifest["state_dtype"]]
        total = sum(int(r["num_states"]) for r in rows)
        joined, filled = None, 0
        for chunk in position_chunks([len(s) for s in sequences], STATES_CHUNK_POSITIONS):
            outputs = self.engines.states([sequences[i] for i in chunk])
            if len(outputs) != len(chunk):
                raise RuntimeError(f"shard {name}: {len(chunk)} sequences gave "
                                   f"{len(outputs)} outputs of the pooling engine")
            for i, hidden in zip(chunk, outputs):
                row = rows[i]
                start = len(row["prompt_token_ids"]) - 1  # s_0 sits on the last prompt token
                piece = hidden[start:start + row["num_states"]]
                if piece.shape[0] != row["num_states"]:
                    raise RuntimeError(f"shard {name}: response {row['response_id']} has "
                                       f"{row['num_states']} tokens but the pooling engine "
                                       f"returned {hidden.shape[0]} positions")
                if joined is None:
                    self._check_width(name, piece.shape[1])
                    joined = torch.empty(total, piece.shape[1], dtype=dtype)
                elif piece.shape[1] != joined.shape[1]:
                    raise DataError(f"shard {name}: states of different widths "
                                    f"{sorted({joined.shape[1], piece.shape[1]})}")
                stored = joined[filled:filled + piece.shape[0]]
                stored.copy_(piece)
                check_finite_states(name, row["response_id"], piece, stored,
                                    self.manifest["state_dtype"])
                filled += piece.shape[0]
            del outputs, hidden, piece  # this chunk's float32 positions, before the next's
        if joined is None:
            raise DataError(f"shard {name} has no responses")
        write_states(self.out, name, joined, [r["num_states"] for r in rows],
                     [r["response_id"] for r in rows], [r["prompt_index"] for r in rows],
                     self.manifest["state_dtype"])
        return name

    def _check_width(self, name: str, width: int) -> None:
        hidden_size = self.manifest.get("hidden_size")
        if hidden_size is not None and width != hidden_size:
            raise DataError(f"shard {name}: states are {width} wide, the manifest "
                            f"says the model's hidden size is {hidden_size}")

    def close(self) -> None:
        self.engines.close()


def check_finite_states(shard: str, response_id: int, computed: torch.Tensor,
                        stored: torch.Tensor, state_dtype: str) -> None:
    """Refuse NaN or inf in a response's states, as the pooling engine returned them and as
    stored, before the shard's states file is written (the shard stays unfinished). Stored,
    they passed collect and label, and train stopped an epoch later blaming its learning
    rate, naming no shard."""
    if not torch.isfinite(computed).all():
        raise DataError(f"shard {shard}: the pooling engine returned NaN or inf states for "
                        f"response_id {response_id}; a model run in float16 can overflow: "
                        "collect with engine_args {\"dtype\": \"bfloat16\"} (a new --out, or "
                        "--overwrite)")
    if not torch.isfinite(stored).all():
        largest = computed.abs().max().item()
        advice = ("collect with --state-dtype bfloat16 (a new --out, or --overwrite)"
                  if state_dtype != "bfloat16" else "check the model")
        raise DataError(f"shard {shard}: response_id {response_id} has states up to "
                        f"{largest:.6g} in size, beyond what {state_dtype} holds (they would be "
                        f"stored as inf); {advice}")


def position_chunks(lengths: Sequence[int], budget: int) -> list[range]:
    """Consecutive index ranges of ``lengths`` whose sum stays within ``budget`` (a longer
    sequence goes alone): the pooling engine's requests, each a slice of the shard."""
    chunks, start, used = [], 0, 0
    for i, length in enumerate(lengths):
        if i > start and used + length > budget:
            chunks.append(range(start, i))
            start, used = i, 0
        used += length
    if start < len(lengths):
        chunks.append(range(start, len(lengths)))
    return chunks


# ----------------------------------------------------------------------------- the command
def build_manifest(opts: CollectOptions, prompts: Sequence[str]) -> dict[str, Any]:
    """Everything that determines the files, nothing that does not (no replicas, no times)."""
    shards = plan_shards(len(prompts), opts.shard_size)
    return {
        "format": STATES_FORMAT,
        "format_version": STATES_FORMAT_VERSION,
        "model": opts.model,
        MODEL_FOLDER: model_folder(opts.model),
        MODEL_FILES: model_files(opts.model),
        "hidden_size": _state_width(opts.model),
        "state_dtype": opts.state_dtype,
        "state_definition": STATE_DEFINITION,
        # "train" also for a file (which has no splits), as earlier versions wrote it
        "prompts": {"source": opts.prompts, "split": opts.split or "train",
                    "data_dir": opts.data_dir,
                    "prompt_column": opts.prompt_column, "prompt_format": opts.prompt_format,
                    "max_prompts": opts.max_prompts, "count": len(prompts),
                    "sha256": sha256_bytes("\x00".join(prompts).encode())},
        "chat_template": opts.chat_template,
        "sampling": opts.sampling_section(),
        "engine_args": opts.engine_args,
        "pooling_engine_args": opts.pooling_engine_args,
        "shard_size": opts.shard_size,
        "num_prompts": len(prompts),
        "num_responses": len(prompts) * opts.samples_per_prompt,
        "shards": [asdict(s) for s in shards],
        # the first run's: a resume after an upgrade goes on (and says so), keeping them
        SOFTWARE: package_versions(),
    }


# The manifest key of the model folder's fingerprint (None for a hub id).
MODEL_FILES = "model_files"
# The manifest key of the model folder's absolute path (None for a hub id).
MODEL_FOLDER = "model_folder"
# The manifest key of the package versions of the run that began the collection.
SOFTWARE = "software"
# Keys that manifests of earlier releases lack: not checked on their resume (nor added:
# labels hold the manifest's hash).
ADDED_KEYS = (MODEL_FILES, MODEL_FOLDER, SOFTWARE)


def model_folder(model: str) -> str | None:
    """A local model folder as its absolute path, as collect resolves it: ``--model .`` or
    ``../tiny`` names another folder (or none) from wherever ``train`` runs, and the head
    records the model it learned."""
    folder = Path(model).expanduser()
    return str(folder.resolve()) if folder.is_dir() else None


def model_files(model: str) -> str | None:
    """A fingerprint of a local model folder's files (names, sizes, modification times), so a
    resume sees a checkpoint saved again at the same path (say ckpt/latest); None for a hub
    id."""
    return folder_fingerprint(str(Path(model).expanduser()))


def _state_width(model: str) -> int | None:
    """The width of the model's states from its config (None when transformers cannot tell)."""
    try:
        return model_state_width(model)
    except Exception:  # the pooling engine's output still fixes the width in each shard
        return None


# Engine arguments are recorded (those of the first run). Those that only say how to run it
# (memory, batch limits, parallelism) may change on a resume; any other (dtype, revision,
# quantization, tokenizer, ...) changes the states, so finished and new shards would not be
# of one model: it must match, as everything else in the manifest must. max_model_len is
# not among them: vLLM ends a response where prompt + response reach it ("length"), so
# another limit would cut later shards' responses elsewhere.
RESUME_ENGINE_KEYS = frozenset({
    "gpu_memory_utilization", "kv_cache_memory_bytes", "max_num_seqs",
    "max_num_batched_tokens", "tensor_parallel_size",
    "pipeline_parallel_size", "data_parallel_size", "distributed_executor_backend",
    "enforce_eager", "swap_space", "cpu_offload_gb", "block_size", "enable_prefix_caching",
    "enable_chunked_prefill", "disable_log_stats", "compilation_config", "async_scheduling"})
ENGINE_ARGS_KEYS = ("engine_args", "pooling_engine_args")


def outputs_defining(engine_args: Any) -> Any:
    """The engine arguments that decide what the engine computes (all but
    RESUME_ENGINE_KEYS): collect's states here, eval's samples in its resume digest."""
    if not isinstance(engine_args, dict):
        return engine_args
    return {k: v for k, v in engine_args.items() if k not in RESUME_ENGINE_KEYS}


def _prepare_out(opts: CollectOptions, manifest: dict[str, Any]) -> Path:
    out = Path(opts.out)  # a folder: exclusive_folder made sure
    if (out / MANIFEST_FILE).exists():
        if opts.overwrite:
            _remove_collection(out)
        else:
            old = read_manifest(out)

            def same(key: str) -> bool:
                if key == SOFTWARE:  # said below, not refused: the same model's states
                    return True
                if key in ENGINE_ARGS_KEYS:
                    return outputs_defining(old.get(key)) == outputs_defining(manifest.get(key))
                if key in ADDED_KEYS and key not in old:  # a manifest of an earlier release
                    return True
                if key == "model" and old.get(MODEL_FOLDER) is not None:
                    # the same folder by another path (relative, absolute, another working
                    # directory); its files are compared under MODEL_FILES
                    return old[MODEL_FOLDER] == manifest.get(MODEL_FOLDER)
                if key == "prompts":
                    return same_prompts(old.get(key), manifest.get(key))
                return old.get(key) == manifest.get(key)

            differ = sorted(k for k in set(old) | set(manifest) if not same(k))
            if differ and _holds_work(out):
                raise DataError(_different_collection(out, old, manifest, differ))
            if not differ:
                _note_upgrade(out, old.get(SOFTWARE), manifest[SOFTWARE])
                _remove_stale_temporaries(out)
                return out
            # An earlier run stopped before its first shard (say, a model path that did not
            # load): nothing to keep, so this run's options take its place.
            print(f"collect: {out} holds no shards yet; its manifest (differs in {differ}) is "
                  "replaced by this run's", file=sys.stderr, flush=True)
            _remove_collection(out)
    elif out.is_dir() and any(not is_lock_file(p) for p in out.iterdir()):
        raise DataError(f"--out {out} is a non-empty folder without {MANIFEST_FILE}; refusing "
                        f"to write into it")
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out, manifest)
    return out


# What a prompts section records about where the prompts came from; with the same texts in
# the same order (count and sha256) another source path or a --max-prompts past the end
# gives the same collection.
PROMPT_SOURCE_KEYS = frozenset({"source", "max_prompts"})


def same_prompts(old: Any, new: Any) -> bool:
    """Whether two manifests' ``prompts`` sections name the same prompts."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return old == new

    def texts(section: dict) -> dict:
        return {k: v for k, v in section.items() if k not in PROMPT_SOURCE_KEYS}

    return texts(old) == texts(new)


def _different_collection(out: Path, old: dict[str, Any], new: dict[str, Any],
                          differ: list[str]) -> str:
    """Why a rerun into ``out`` is refused; a model folder whose files changed is said in
    words (its fingerprints would tell a person nothing)."""
    reasons = []
    if MODEL_FILES in differ and "model" not in differ:
        reasons.append(f"the files of the model folder {new['model']} changed since this "
                       "collection began (their names, sizes or modification times), as "
                       "when another checkpoint is saved there: its shards would mix two "
                       "models' responses and states; a copy that did not keep the times "
                       "(cp without -p) counts as changed")
    listed = [k for k in differ if k != MODEL_FILES]
    if listed:
        changes = "; ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in listed)
        reasons.append(f"differs in {listed}: {changes}")
    return (f"{out} holds a different collection ({'; '.join(reasons)}); use a new --out, or "
            "--overwrite to delete it")


def _note_upgrade(out: Path, old: Any, new: dict[str, str | None]) -> None:
    """Say that a resume runs other package versions than the shards before it: the states
    are of the same model, but may differ in their last bits (another kernel), so a user
    comparing runs should know. The manifest keeps the first run's (labels hold its hash)."""
    changed = changed_versions(old, new)
    if changed:
        print(f"collect: {out} was begun with other package versions ({'; '.join(changed)}); "
              "its finished shards are kept and the manifest records the first run's",
              file=sys.stderr, flush=True)


def _holds_work(out: Path) -> bool:
    """Whether a collection folder holds any shard or label (anything a rerun must keep)."""
    return any(out.glob("shard-*")) or (out / "labels").exists()


def _remove_stale_temporaries(out: Path) -> None:
    """Half-written files of a killed run (never renamed into place, so never read)."""
    for path in out.glob(".shard-*.tmp"):
        path.unlink(missing_ok=True)


def _remove_collection(out: Path) -> None:
    """Delete the collection and its label sets, holding each label set's lock meanwhile: a
    `label` still running on one would lose its files under its feet."""
    with contextlib.ExitStack() as held:
        for lock in sorted(out.glob(label_lock_name("*"))):
            held.enter_context(exclusive_folder(
                out, "collect --overwrite", lock_name=lock.name,
                what=f"label set {label_set_of(lock)!r} of --out",
                instead="let it end before deleting it"))
        _remove_stale_temporaries(out)
        for pattern in ("shard-*.jsonl", "shard-*.safetensors", MANIFEST_FILE):
            for path in out.glob(pattern):
                path.unlink()
        shutil.rmtree(out / "labels", ignore_errors=True)


def collect(*, engines: Engines | None = None, **options: Any) -> dict[str, Any]:
    """Collect responses and states; see :class:`CollectOptions` for the options.

    Returns the summary (also printed as a table). ``engines`` replaces vLLM (tests only).
    """
    opts = build_options(CollectOptions, options, "collect")
    opts.check()
    started = time.perf_counter()
    prompts = load_prompts(opts.prompts, opts.split, opts.prompt_column, opts.prompt_format,
                           opts.data_dir, opts.max_prompts)
    manifest = build_manifest(opts, prompts)
    with exclusive_folder(opts.out, "collect"):
        return _collect_into(opts, manifest, prompts, engines, started)


def _collect_into(opts: CollectOptions, manifest: dict[str, Any], prompts: Sequence[str],
                  engines: Engines | None, started: float) -> dict[str, Any]:
    out = _prepare_out(opts, manifest)
    plans = manifest_shards(manifest)
    status = {p.name: shard_status(out, p.name) for p in plans}
    to_generate = [p for p in plans if status[p.name] == "pending"]
    to_encode = [p for p in plans if status[p.name] != "done"]
    already = len(plans) - len(to_encode)
    if to_encode:
        if opts.ray:
            from .ray_collect import run_with_ray

            run_with_ray(opts, manifest, prompts, to_generate, to_encode)
        else:
            worker = CollectWorker(str(out), manifest, opts.engine_args,
                                   opts.pooling_engine_args, opts.in_process, engines=engines)
            try:
                run_phases(worker_calls(worker), prompts, to_generate, to_encode, opts.progress)
            finally:
                worker.close()
    summary = summarize(out, manifest, already, time.perf_counter() - started)
    print(summary_table(f"vllm-recontrol collect -> {out}", list(summary.items())), flush=True)
    return summary


def worker_calls(worker: CollectWorker):
    """Adapt an in-process worker to run_phases' (generate, release, encode) callables."""
    return worker.generate_shard, worker.release_generator, worker.states_shard


def run_phases(calls: tuple[Callable, Callable, Callable], prompts: Sequence[str],
               to_generate: Sequence[ShardPlan], to_encode: Sequence[ShardPlan],
               show_progress: bool = True) -> None:
    """Phase 1: responses of every pending shard; then free the generator; phase 2: states."""
    generate, release, encode = calls
    for plan in progress(to_generate, desc="collect: generate", unit="shard",
                         disable=not show_progress or not to_generate):
        generate(plan, prompts[plan.prompt_start:plan.prompt_end])
    release()
    for plan in progress(to_encode, desc="collect: states", unit="shard",
                         disable=not show_progress or not to_encode):
        encode(plan.name)


def summarize(out: Path, manifest: dict[str, Any], skipped: int, seconds: float) -> dict[str, Any]:
    """Counts from the files themselves (one shard's rows in memory at a time)."""
    plans = manifest_shards(manifest)
    responses = states = eos = 0
    done = 0
    for plan in plans:
        if shard_status(out, plan.name) != "done":
            continue
        done += 1
        index = read_shard_index(out, plan.name)
        responses += index.num_responses
        states += index.num_states
        eos += sum(r["finish_reason"] == "stop" for r in read_rows(out, plan.name))
    size = sum(p.stat().st_size for p in out.glob("shard-*"))
    return {
        "model": manifest["model"],
        "prompts": manifest["num_prompts"],
        "samples per prompt": manifest["sampling"]["samples_per_prompt"],
        "shards done / planned": f"{done} / {len(plans)}",
        "shards skipped (already done)": skipped,
        "responses": responses,
        "states (s_0..s_T)": states,
        "mean states per response": states / responses if responses else 0.0,
        # vLLM reports both as "stop"; rows keep the stop string's tokens, not its text
        ("responses ended by EOS or a stop string" if manifest["sampling"].get("stop")
         else "responses ended by EOS"): eos,
        "hidden size": manifest["hidden_size"],
        "state dtype": manifest["state_dtype"],
        "disk (MB)": round(size / 1e6, 3),
        "wall time (s)": round(seconds, 1),
    }


# ----------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vllm-recontrol collect",
        description="Sample responses with vLLM and store the post-norm states s_0..s_T of "
                    "every response step, in resumable safetensors shards.")
    parser.add_argument("--model", help="model name or folder (as for vllm.LLM)")
    parser.add_argument("--prompts", help="JSONL/Parquet file with a prompt column, a data "
                        "folder, or a datasets name such as Anthropic/hh-rlhf")
    parser.add_argument("--out", help="output folder (created; a rerun resumes it)")
    parser.add_argument("--split", help="data set split (default train; not for a prompt file)")
    parser.add_argument("--data-dir", help="datasets data_dir (e.g. harmless-base; not for a "
                        "prompt file)")
    parser.add_argument("--prompt-column", help="column with prompts (default prompt, or chosen)")
    parser.add_argument("--prompt-format", choices=PROMPT_FORMATS,
                        help="hh-rlhf: keep the dialogue up to its last 'Assistant:' (auto: for "
                             "chosen/rejected columns)")
    parser.add_argument("--max-prompts", type=int, help="use only the first N prompts")
    parser.add_argument("--chat-template", action="store_true",
                        help="wrap prompts in the model's chat template")
    parser.add_argument("--samples-per-prompt", type=int, help="responses per prompt (paper: 1)")
    parser.add_argument("--max-new-tokens", type=int, help="new tokens per response (paper: 128)")
    parser.add_argument("--temperature", type=float, help="sampling temperature (default 1.0)")
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int, help="0 = off")
    parser.add_argument("--stop", action="append",
                        help="end a response where this string appears (repeatable), e.g. "
                             "--stop 'Human:' --stop 'User:': states then stop where label's "
                             "cut at a next turn does, instead of running on past it")
    parser.add_argument("--seed", type=int, help="base seed; per-request seeds derive from it")
    parser.add_argument("--shard-size", type=int, help="prompts per shard (default 256)")
    parser.add_argument("--state-dtype", choices=sorted(STATE_DTYPES))
    parser.add_argument("--engine-args", type=json_argument,
                        help='JSON keyword arguments for both vllm.LLM engines, e.g. '
                             '\'{"dtype": "bfloat16", "max_model_len": 2048}\'')
    parser.add_argument("--pooling-engine-args", type=json_argument,
                        help="JSON overrides for the pooling (states) engine only")
    parser.add_argument("--in-process", action="store_true",
                        help="run the vLLM engine core inside this process: ~2 s instead of "
                             "~30 s per engine start on a small CPU; on a GPU keep the default "
                             "(a separate engine process frees all its memory on shutdown)")
    add_ray_arguments(parser, "one vLLM engine per Ray actor, whole shards each")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the collection in --out (its shards and labels) and "
                        "start over, also one made with the same options")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    options = parse_command_line(parser, argv, required=("model", "prompts", "out"))
    return run_main(collect, options)
