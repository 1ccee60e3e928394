"""Reward sources for labelling: a user function, or a sequence-classification reward model
run by Hugging Face transformers or by vLLM's pooling runner.

Why both: the paper scores responses with a sequence-classification reward model, but rule
based rewards (a lexicon, a format check) need no GPU and make end-to-end tests possible.
vLLM serves the same model faster on a GPU (no padding, continuous batching); both engines
see the same token ids (same text format, same left truncation) and return the raw score.
Either way a response is cut at a hallucinated next turn first, as the paper does before
scoring: a model that writes "Human: ..." after its answer is scored on its answer only.
A function scores one pair per call, or (marked with ``batched_reward``) a list of pairs
per call: a reward served over the network or a model of the user's own pays its cost per
call, not per pair.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import numbers
import os
import sys
import uuid
from collections.abc import Mapping, Set
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar, overload

from ..config import FLOAT32_MAX
from ..logs import get_logger
from .common import RewardError, folder_fingerprint, sha256_bytes
from .prompts import prompt_messages

logger = get_logger(__name__)

DEFAULT_CUT_AT = ("Human:", "User:")
RM_ENGINES = ("hf", "vllm")
SCORED_TOKEN = "last"  # in describe(): see RewardModelScorer._absent_id
# in describe(): the response is joined to the prompt as the model's continuation (see
# join_continuation); releases without this key put a second space before a response that
# began with one (vLLM's text keeps its first token's space), so their rewards differ
TEXT_FORMAT = "continuation"


def cut_response(response: str, markers: Sequence[str] = DEFAULT_CUT_AT) -> tuple[str, bool]:
    """The response up to the first hallucinated turn marker, without trailing whitespace
    whether cut or not, and whether it was cut. Stripped either way: vLLM's stop strings
    (``collect --stop``) end the text where the marker begins and keep the whitespace
    before it, and the same answer must get the same score as when it was cut here."""
    positions = [i for i in (response.find(m) for m in markers if m) if i >= 0]
    if not positions:
        return response.rstrip(), False
    return response[:min(positions)].rstrip(), True


def join_continuation(prefix: str, response: str) -> str:
    """``prefix`` (a dialogue ending in "Assistant:") followed by ``response`` as the model
    wrote it, with one space added only where neither side has whitespace at the seam, and
    nothing added for an empty response.

    Why: vLLM's response text keeps its first token's leading space (" Sure", SentencePiece
    and byte-level BPE alike), and the paper scores prompt and continuation decoded as one
    text; another space would give the reward model "Assistant:  Sure", a text it never saw.
    A response without one (a stripped text, a function's) still gets its single space."""
    if not response or prefix[-1:].isspace() or response[0].isspace():
        return prefix + response
    return f"{prefix} {response}"


BATCHED_MARK = "__recontrol_batched_reward__"
RewardFn = TypeVar("RewardFn", bound=Callable[..., Any])


@overload
def batched_reward(function: RewardFn, *, batch_size: int | None = None) -> RewardFn: ...


@overload
def batched_reward(function: None = None, *,
                   batch_size: int | None = None) -> Callable[[RewardFn], RewardFn]: ...


def batched_reward(function: RewardFn | None = None, *,
                   batch_size: int | None = None) -> RewardFn | Callable[[RewardFn], RewardFn]:
    """Mark ``f(prompts: list[str], responses: list[str]) -> Sequence[float]`` as a batched
    reward function: ``label`` and ``eval`` call it once per chunk of at most ``batch_size``
    pairs (default: the command's ``--batch-size`` / ``--reward-batch-size``) and expect one
    reward per pair, in order. Use as ``@batched_reward`` or ``@batched_reward(batch_size=N)``.

    Why a mark and not a guess from the signature: ``f(a, b)`` reads the same either way,
    and a per-pair function handed lists (or the reverse) must fail, not score nonsense.
    The mark is an attribute of the function itself, so ``module:function`` specs, pickling
    to Ray actors and ``RewardSource.describe()`` see the same function as before."""
    if batch_size is not None and (isinstance(batch_size, bool) or
                                   not isinstance(batch_size, int) or batch_size <= 0):
        raise RewardError(f"batched_reward: batch_size must be a positive integer (or "
                          f"omitted), got {batch_size!r}")

    def mark(target: RewardFn) -> RewardFn:
        if not callable(target):
            raise RewardError(f"batched_reward marks a function, got {target!r:.80}")
        try:  # a bound method: its function (attributes cannot be set on the method)
            setattr(getattr(target, "__func__", target), BATCHED_MARK,
                    {"batch_size": batch_size})
        except (AttributeError, TypeError) as exc:
            raise RewardError(f"batched_reward cannot mark {target!r:.80} ({exc}); mark the "
                              "function where it is defined") from exc
        return target

    if function is not None and not callable(function):  # @batched_reward(64)
        raise RewardError(f"batched_reward takes the batch size by name: "
                          f"@batched_reward(batch_size={function!r:.20}), not a positional "
                          "argument")
    return mark if function is None else mark(function)


def batched_mark(function: Any) -> dict[str, Any] | None:
    """``batched_reward``'s mark of ``function`` (or of its ``__call__``: an instance of a
    class whose ``__call__`` is marked), or None for a per-pair function."""
    for candidate in (function, getattr(function, "__call__", None)):
        marking = getattr(candidate, BATCHED_MARK, None)
        if isinstance(marking, dict):
            return marking
    return None


def load_reward_fn(spec: str) -> Callable[..., Any]:
    """Import ``module:function`` (``f(prompt, response) -> float``, or a batched function
    marked with ``batched_reward``)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise RewardError(f"--reward-fn must look like module:function, got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # like `python -m`: a module in the current folder
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RewardError(f"--reward-fn {spec}: cannot import module {module_name!r}: {exc}") from exc
    except (Exception, SystemExit) as exc:  # the user's module: a syntax error, a failed setup
        raise RewardError(f"--reward-fn {spec}: importing module {module_name!r} failed: "
                          f"{type(exc).__name__}: {exc}") from exc
    function = module
    for part in attr.split("."):
        if not hasattr(function, part):
            raise RewardError(f"--reward-fn {spec}: module {module_name!r} has no attribute "
                              f"{attr!r}")
        function = getattr(function, part)
    if not callable(function):
        raise RewardError(f"--reward-fn {spec}: {attr!r} is not callable")
    return function


def reward_fn_modules(reward_fn: Any) -> list[str]:
    """The modules a process imports to rebuild ``reward_fn`` ("module:function" or a
    function): the spec's module (which may re-export a function defined elsewhere) or the
    function's own module; none for a function defined in ``__main__`` (pickled by value)."""
    if reward_fn is None:
        return []
    if callable(reward_fn):
        while isinstance(reward_fn, functools.partial):  # the partial's function's module
            reward_fn = reward_fn.func
        module = getattr(getattr(reward_fn, "__func__", reward_fn), "__module__", None)
        return [module] if module and module != "__main__" else []
    return [str(reward_fn).partition(":")[0]]


def as_reward(value: Any) -> float | None:
    """``value`` as a finite float (within float32's range), or None when it is not such
    a number (bools are not numbers)."""
    if not isinstance(value, numbers.Real) and tuple(getattr(value, "shape", (1,))) == () \
            and callable(getattr(value, "item", None)):
        value = value.item()  # a 0-d torch tensor or numpy array
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
            type(value).__name__ == "bool_":
        return None
    try:
        value = float(value)
    except OverflowError:  # an int past float's range
        return None
    # training reads rewards as float32: past its range a reward would be inf there
    return value if abs(value) <= FLOAT32_MAX else None


def warn_on_cpu_beside_a_gpu(device: Any, what: str, flag: str = "--device") -> None:
    """Say so when a model is about to run on the CPU of a machine with a GPU: the device
    defaults to the CPU (so tests and CPU machines work), and a forgotten ``--device cuda``
    turns a 7B reward model's minutes into days without another sign."""
    import torch

    try:
        on_cpu = torch.device(device).type == "cpu"
    except (RuntimeError, TypeError):  # a bad device is refused where the model loads
        return
    if on_cpu and torch.cuda.is_available():
        logger.warning("%s runs on the CPU although this machine has a GPU; pass %s cuda to "
                       "use it", what, flag)


def reward_model_settings(model: str, device: str, dtype: str, batch_size: Any,
                          reward_index: int | None, trust_remote_code: bool,
                          engine: str = "hf") -> tuple:
    """What can be checked of a reward model without its weights: the device, batch size and
    dtype, and its tokenizer and config (which output is the reward). Returns (torch device,
    tokenizer, config, reward index). Why apart from loading: ``eval`` checks these before its
    vLLM engine starts and base generates, not at the first score (``RewardSource.check``)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    try:
        torch_device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise RewardError(f"reward model device {device!r} is not a torch device (cpu, "
                          f"cuda, cuda:1, ...): {exc}") from exc
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise RewardError(f"reward model batch_size must be a positive integer, got "
                          f"{batch_size!r}")
    if engine == "hf" and not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise RewardError(f"reward model dtype {dtype!r} is not a torch dtype (float32, "
                          f"bfloat16, float16)")
    folder = Path(str(model)).expanduser()
    if folder.is_dir() and not (folder / "config.json").is_file():  # transformers would
        # blame the tokenizer (five lines on sentencepiece) or say nothing of the folder
        raise RewardError(f"cannot load reward model {model!r}: the folder has no "
                          f"config.json (a model folder is one saved with save_pretrained)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise RewardError(f"cannot load reward model {model!r}: {type(exc).__name__}: "
                          f"{exc}") from exc
    labels = int(getattr(config, "num_labels", 1))
    if reward_index is None and labels != 1:
        raise RewardError(f"reward model {model!r} has {labels} outputs; name the one that "
                          f"is the reward with --reward-index")
    index = 0 if reward_index is None else int(reward_index)
    if not 0 <= index < labels:
        raise RewardError(f"--reward-index {index} is out of range: reward "
                          f"model {model!r} has {labels} output(s)")
    return torch_device, tokenizer, config, index


class RewardModelScorer:
    """Batched scores of a sequence-classification reward model (transformers or vLLM).

    Text format: the model's chat template when its tokenizer has one (HH-RLHF prompts become
    turn-by-turn messages, the response without surrounding whitespace the assistant's), else
    the HH-RLHF dialogue (a plain prompt wrapped as ``\\n\\nHuman: {prompt}\\n\\nAssistant:``)
    continued by the response as written (``join_continuation``). Long inputs are cut from
    the left, so the response (the part being judged) is kept.
    ``engine="vllm"`` scores through ``vllm.LLM(runner="pooling").classify`` with the
    activation off (the raw score, as transformers returns it); ``engine_args`` go to the LLM.
    """

    def __init__(self, model: str, device: str = "cpu", dtype: str = "float32",
                 batch_size: int = 16, max_length: int | None = None,
                 reward_index: int | None = None, trust_remote_code: bool = False,
                 engine: str = "hf", engine_args: dict[str, Any] | None = None) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification

        if engine not in RM_ENGINES:
            raise RewardError(f"reward model engine must be one of {list(RM_ENGINES)}, "
                              f"got {engine!r}")
        self.name = model
        self.engine = engine
        self.device, self.tokenizer, config, self.reward_index = reward_model_settings(
            model, device, dtype, batch_size, reward_index, trust_remote_code, engine)
        self.batch_size = batch_size
        self.model: Any = None
        self.llm: Any = None
        if engine == "hf":
            warn_on_cpu_beside_a_gpu(self.device, f"reward model {model!r}")
            try:
                self.model = AutoModelForSequenceClassification.from_pretrained(
                    model, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
                self.model.to(self.device).eval()
            except Exception as exc:
                raise RewardError(f"cannot load reward model {model!r}: {type(exc).__name__}: "
                                  f"{exc}") from exc
        self.tokenizer.truncation_side = "left"
        limit = max_length or getattr(config, "max_position_embeddings", None) or 4096
        tokenizer_limit = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tokenizer_limit, int) and tokenizer_limit < 1_000_000:
            limit = min(limit, tokenizer_limit)
        self.max_length = int(limit)
        engine_limit = (engine_args or {}).get("max_model_len") if engine == "vllm" else None
        if isinstance(engine_limit, int) and 0 < engine_limit < self.max_length:
            if max_length is not None:  # two limits the user set, the engine's the smaller
                raise RewardError(
                    f"the reward model's max length {max_length} (label's --max-length, "
                    f"eval's --rm-max-length) is above its engine's max_model_len "
                    f"{engine_limit}: texts cut to the first would be refused by the engine; "
                    f"give a max length of at most {engine_limit}")
            self.max_length = engine_limit  # the engine's limit is the user's cut
        self.uses_chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        if engine == "vllm":
            self.llm = _pooling_llm(model, dtype, self.max_length, trust_remote_code,
                                    engine_args or {})

    def format(self, prompt: str, response: str) -> tuple[str, bool]:
        """(text, add_special_tokens) for one prompt/response pair. A chat message's content
        is stripped (the template places it; a leading space is no part of an answer)."""
        if self.uses_chat_template:
            messages = prompt_messages(prompt) + [{"role": "assistant",
                                                   "content": response.strip()}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False), False
        if prompt.rstrip().endswith("Assistant:") and "Human:" in prompt:
            return join_continuation(prompt, response), True  # already an HH-RLHF dialogue
        return join_continuation(f"\n\nHuman: {prompt}\n\nAssistant:", response), True

    def encode(self, pairs: Sequence[tuple[str, str]]) -> list[list[int]]:
        """Token ids of each pair as the model will see them (formatted, cut from the left)."""
        encoded = []
        for prompt, response in pairs:
            text, special = self.format(prompt, response)
            encoded.append(self.tokenizer(text, add_special_tokens=special, truncation=True,
                                          max_length=self.max_length)["input_ids"])
        return encoded

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """Rewards of (prompt, response) pairs (transformers: batched by similar length)."""
        import torch

        encoded = self.encode(pairs)
        if self.llm is not None:
            return self._score_vllm(encoded)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        scores = [0.0] * len(encoded)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            pad = self._absent_id([encoded[i] for i in chunk])
            # transformers scores the rightmost token that is not the (text) config's
            # pad_token_id (the last one, alone and unpadded, when it is None)
            for config in self._pad_configs():
                config.pad_token_id = pad
            for group in [chunk] if pad is not None else [[i] for i in chunk]:
                input_ids, attention_mask = right_padded([encoded[i] for i in group], pad or 0)
                with torch.no_grad():
                    logits = self.model(input_ids=input_ids.to(self.device),
                                        attention_mask=attention_mask.to(self.device)).logits
                values = logits[:, self.reward_index].float().cpu().tolist()
                for i, value in zip(group, values):
                    scores[i] = value
        return scores

    def _absent_id(self, sequences: list[list[int]]) -> int | None:
        """A token id that occurs in none of ``sequences``, to pad them with and to be the
        model's ``pad_token_id`` (None: every id occurs; the rows then go one at a time).

        Why: transformers scores a sequence-classification model at the rightmost token that
        is not ``config.pad_token_id``. A pad id that differed from the one padding the batch
        (a config with ``pad_token_id: 0``, a tokenizer without one) read a padded row's
        score off a pad, so it changed with its neighbours; one that is also a real token
        (eos closing a chat turn) moved the score to the token before. With an absent id the
        scored token is each text's last, alone or in a batch, as vLLM's pooler takes it."""
        used = {token for sequence in sequences for token in sequence}
        vocab = self.model.get_input_embeddings().num_embeddings
        configured = [getattr(c, "pad_token_id", None) for c in self._pad_configs()]
        preferred = (*configured, self.tokenizer.pad_token_id, self.tokenizer.unk_token_id,
                     self.tokenizer.eos_token_id)
        return next((i for i in (*preferred, *range(vocab)) if isinstance(i, int)
                     and 0 <= i < vocab and i not in used), None)

    def _pad_configs(self) -> list[Any]:
        """The configs whose ``pad_token_id`` transformers reads to find the scored token:
        the text config of a composite model (Gemma-3, Qwen3.5: the top level has none),
        else the model's own."""
        config = self.model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return [text] + ([config] if text is not config and hasattr(config, "pad_token_id")
                         else [])

    def _score_vllm(self, encoded: list[list[int]]) -> list[float]:
        from vllm import PoolingParams

        outputs = self.llm.classify([{"prompt_token_ids": ids} for ids in encoded],
                                    pooling_params=PoolingParams(use_activation=False),
                                    use_tqdm=False)
        return [float(o.outputs.probs[self.reward_index]) for o in outputs]

    def close(self) -> None:
        """Free the vLLM engine (no-op for transformers)."""
        if self.llm is not None:
            from .._vllm_adapter import shutdown_llm

            shutdown_llm(self.llm)
            self.llm = None


def right_padded(sequences: list[list[int]], pad: int) -> tuple[Any, Any]:
    """(input_ids, attention_mask) of ``sequences`` padded on the right with ``pad``."""
    import torch

    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, :len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, :len(sequence)] = 1
    return input_ids, attention_mask


def _pooling_llm(model: str, dtype: str, max_length: int, trust_remote_code: bool,
                 engine_args: dict[str, Any]) -> Any:
    """A vLLM classification engine for the reward model, started as every engine of this
    package is (``start_offline_engine``: a failure names the model and ends the command
    with vLLM's reason and the memory hint)."""
    from .engines import start_offline_engine

    args = {"runner": "pooling", "dtype": dtype, "max_model_len": max_length,
            "trust_remote_code": trust_remote_code, "enable_prefix_caching": False,
            **engine_args}
    return start_offline_engine(f"reward model {model!r}", model=model, **args)


class RewardSource:
    """Exactly one of a user function or a reward model, scoring (prompt, response) pairs.

    Shared by ``label`` and ``eval`` so both judge responses the same way. A value that is
    not a finite number stops with where it happened (``where(i)`` names row i). A function
    marked with ``batched_reward`` is called once per chunk of at most its own batch size
    (else ``batch_size``, the reward model's batch option) pairs.
    """

    def __init__(self, reward_fn: Any = None, reward_model: str | None = None,
                 device: str = "cpu", dtype: str = "float32", batch_size: int = 16,
                 max_length: int | None = None, reward_index: int | None = None,
                 trust_remote_code: bool = False, command: str = "label",
                 engine: str = "hf", engine_args: dict[str, Any] | None = None) -> None:
        if (reward_fn is None) == (reward_model is None):
            raise RewardError(f"{command} needs exactly one of --reward-fn module:function and "
                              "--reward-model NAME")
        self.function: Callable[..., Any] | None = None
        self.stable_name = True  # False: a callable no name tells apart (callable_spec)
        self.scorer: RewardModelScorer | None = None
        if engine not in RM_ENGINES:
            raise RewardError(f"{command}: reward model engine must be one of "
                              f"{list(RM_ENGINES)}, got {engine!r}")
        self._model_args = (reward_model, device, dtype, batch_size, max_length, reward_index,
                            trust_remote_code, engine, dict(engine_args or {}))
        if reward_fn is not None:
            if callable(reward_fn):
                self.function = reward_fn
                self.spec, self.stable_name = callable_spec(reward_fn)
                if not self.stable_name:  # told apart from every other source, resumed never
                    self._nonce = uuid.uuid4().hex
            else:
                self.spec = str(reward_fn)
                self.function = load_reward_fn(self.spec)
        else:
            self.spec = str(reward_model)
        # pairs per call of a batched function; None: a per-pair function (or a model)
        self.chunk: int | None = None
        marking = batched_mark(self.function) if self.function is not None else None
        if marking is not None:
            self.chunk = marking.get("batch_size") or batch_size
            if isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or \
                    self.chunk <= 0:
                raise RewardError(f"{command}: the batch size of batched reward function "
                                  f"{self.spec} must be a positive integer, got "
                                  f"{self.chunk!r}")

    def check(self) -> None:
        """A reward model's settings, tokenizer and config, without loading its weights (a
        function needs nothing): so ``eval`` refuses a mistyped model, device or index before
        its engine starts and base generates, not at the first score."""
        if self.function is None and self.scorer is None:
            model, device, dtype, batch_size, _, reward_index, trust, engine, _ = \
                self._model_args
            reward_model_settings(model, device, dtype, batch_size, reward_index, trust, engine)

    def describe(self) -> dict[str, Any]:
        """What decides the rewards, compared by ``label`` (resuming a set) and ``eval``
        (reusing scored methods). A function is named only, batched or not: batching is how
        it is called (as a reward model's batch size, left out too), so a set begun by the
        per-pair form of a function resumes under its batched form of the same name. A
        model's local folder is described by its files too (``folder_fingerprint``): another
        checkpoint saved at the same path is another reward; a hub id, or a folder that only
        Ray workers hold, has None there."""
        if self.function is not None:
            if not self.stable_name:
                return {"reward_fn": self.spec, "unnamed": self._nonce}
            return {"reward_fn": self.spec}
        _, _, dtype, _, max_length, reward_index, _, _, _ = self._model_args
        # "scored_token": what this release scores (each text's last token, padding with an
        # absent id), "text_format": how it joins prompt and response; label sets and eval
        # runs of releases that differed there do not match
        return {"reward_model": self.spec, "reward_index": reward_index,
                "max_length": max_length, "dtype": dtype, "scored_token": SCORED_TOKEN,
                "text_format": TEXT_FORMAT, "model_files": folder_fingerprint(self.spec)}

    def score(self, pairs: Sequence[tuple[str, str]],
              where: Callable[[int], str] | None = None) -> list[float]:
        """One reward per pair, in order; a value that is not a finite number, or a function
        that raises, stops with a RewardError naming the rows (``where(i)``)."""
        where = where or (lambda i: f"row {i}")
        if self.function is not None and self.chunk is not None:
            pairs = list(pairs)
            return [reward for start in range(0, len(pairs), self.chunk)
                    for reward in self._call_batch(where, start,
                                                   pairs[start:start + self.chunk])]
        if self.function is not None:
            return [self._call(where(i), prompt, response)
                    for i, (prompt, response) in enumerate(pairs)]
        import torch

        self.load()
        try:
            scores = self.scorer.score(pairs)
        except torch.OutOfMemoryError as exc:
            raise self._out_of_memory(exc) from exc
        for i, value in enumerate(scores):
            if as_reward(value) is None:
                raise RewardError(f"reward model {self.spec} gave {value!r} for {where(i)}")
        return scores

    def load(self) -> None:
        """Load a reward model now (``score`` loads it on first use: a resumed run may need
        none); a function needs nothing. For ``eval --overlap-scoring``, which loads it in
        the main thread while no engine generates."""
        import torch

        if self.function is None and self.scorer is None:
            try:
                self.scorer = RewardModelScorer(*self._model_args)
            except torch.OutOfMemoryError as exc:
                raise self._out_of_memory(exc) from exc

    def _out_of_memory(self, exc: Exception) -> RewardError:
        _, device, dtype, batch_size, *_ = self._model_args
        return RewardError(
            f"reward model {self.spec} ran out of memory on {device} ({dtype}, batches of "
            f"{batch_size}): lower the batch size, load it in bfloat16 (rm_dtype), or give "
            "it more room; beside a vLLM engine on the same GPU (eval) lower that engine's "
            "gpu_memory_utilization in engine_args, or put the reward model on another "
            f"device. {str(exc)[:200]}")

    def close(self) -> None:
        """Free the reward model's engine, if one was started."""
        if self.scorer is not None:
            self.scorer.close()

    def _call(self, where: str, prompt: str, response: str) -> float:
        place = _place(where, prompt, response)
        try:
            value = self.function(prompt, response)
        except (Exception, SystemExit) as exc:  # SystemExit: ended the command without a word
            raise RewardError(f"reward function {self.spec} raised {type(exc).__name__}: {exc} "
                              f"on {place}") from exc
        reward = as_reward(value)
        if reward is None:
            # an unmarked batched function, handed one pair, returns a sequence
            hint = ("; a function that scores a whole batch, f(prompts, responses), must be "
                    "marked with @vllm_recontrol.batched_reward"
                    if not isinstance(value, (str, bytes)) and _has_items(value) else "")
            raise RewardError(f"reward function {self.spec} returned {value!r:.80} (type "
                              f"{type(value).__name__}), not a finite number, on {place}{hint}")
        return reward

    def _call_batch(self, where: Callable[[int], str], start: int,
                    chunk: list[tuple[str, str]]) -> list[float]:
        """A batched function's rewards of ``chunk`` (rows ``start``... of the call): one
        finite number per pair, or a RewardError naming the chunk's rows (or the row)."""
        last = start + len(chunk) - 1
        rows = (f"the batch of {len(chunk)} pairs from {_place(where(start), *chunk[0])} to "
                f"{_place(where(last), *chunk[-1])}" if len(chunk) > 1 else
                f"the batch of 1 pair, {_place(where(start), *chunk[0])}")
        name = f"batched reward function {self.spec}"
        try:
            values = self.function([p for p, _ in chunk], [r for _, r in chunk])
        except (Exception, SystemExit) as exc:
            raise RewardError(f"{name} raised {type(exc).__name__}: {exc} on {rows}") from exc
        returned = f"{values!r:.80} (type {type(values).__name__})"
        try:  # a str, a mapping or a set iterates, but is no list of rewards in order
            if isinstance(values, (str, bytes, Mapping, Set)):
                raise TypeError
            iterator = iter(values)  # a number, or a 0-d array or tensor: TypeError
        except TypeError:
            raise RewardError(f"{name} returned {returned}, not a sequence of {len(chunk)} "
                              f"rewards (one per pair, in order), for {rows}; a per-pair "
                              "f(prompt, response) must not be marked with batched_reward") \
                from None
        try:  # a generator runs the function's work here
            values = list(iterator)
        except (Exception, SystemExit) as exc:
            raise RewardError(f"{name} raised {type(exc).__name__}: {exc} on {rows}") from exc
        if len(values) != len(chunk):
            raise RewardError(f"{name} returned {len(values)} rewards for {rows}; it must "
                              "return one per pair, in order")
        rewards = []
        for offset, value in enumerate(values):
            reward = as_reward(value)
            if reward is None:
                raise RewardError(
                    f"{name} returned {value!r:.80} (type {type(value).__name__}), not a "
                    f"finite number, at item {offset} of {len(chunk)} on "
                    f"{_place(where(start + offset), *chunk[offset])}")
            rewards.append(reward)
        return rewards


def _has_items(value: Any) -> bool:
    """A sized value with at least one item (a list; not a 0-d tensor or array, whose len()
    raises, nor a mapping)."""
    if isinstance(value, Mapping):
        return False
    try:
        return len(value) > 0
    except Exception:
        return False


NAME_ATTRIBUTE = "__recontrol_name__"  # a name a user gives a reward callable
_PLAIN = (str, int, float, bool, type(None))


def callable_spec(function: Callable[..., Any]) -> tuple[str, bool]:
    """(how a reward callable is named, whether that name is stable): label sets and eval's
    kept methods compare the name, so it must tell two different rewards apart in any
    process. Stable: a callable that its ``module:qualname`` resolves to (a module-level
    function or class, also a decorated or ``lru_cache``'d one), a ``functools.partial`` of
    one with plain-data arguments, or a callable carrying a ``__recontrol_name__`` (set on
    the function, on the object, or on a bound method's object). Anything else (an object
    with ``__call__``, a bound method, a lambda, a closure, a factory's wrapper) is named for
    messages only: its state is in no name, and reprs hold addresses that Python reuses."""
    given = _given_name(function)
    if given is not None:
        return f"named:{given}", True
    if type(function) is functools.partial:
        inner, stable = callable_spec(function.func)
        arguments = [*function.args, *function.keywords.values()]
        shown = ", ".join([repr(a) for a in function.args] +
                          [f"{k}={v!r}" for k, v in function.keywords.items()])
        if len(shown) > 200:  # the full arguments in a digest, not in every message
            digest = sha256_bytes(shown.encode(errors="replace"))[:16]
            shown = f"{shown[:120]}... (arguments sha256 {digest})"
        spec = f"functools.partial({inner}" + (f", {shown})" if shown else ")")
        return spec, stable and all(_plain_data(a) for a in arguments)
    name, module = getattr(function, "__qualname__", None), getattr(function, "__module__", None)
    if isinstance(name, str) and isinstance(module, str):
        if _resolves_to(module, name, function):
            return f"{module}:{name}", True
        if inspect.isfunction(function):  # a lambda, a closure, a factory's wrapper
            return f"{module}:{name} (not reachable by that name)", False
    owner = getattr(function, "__self__", None)
    if inspect.ismethod(function) and owner is not None:
        return (f"{type(owner).__module__}:{type(owner).__qualname__}.{function.__name__} "
                "(a bound method)"), False
    kind = type(function)
    return f"{kind.__module__}:{kind.__qualname__} (an object)", False


def _resolves_to(module: str, qualname: str, function: Any) -> bool:
    """Whether ``module:qualname`` names ``function`` itself (not another object that took
    its name, as ``functools.wraps`` gives a factory's wrapper)."""
    if "<" in qualname or module not in sys.modules:
        return False
    found: Any = sys.modules[module]
    try:
        for part in qualname.split("."):
            found = getattr(found, part, None)
            if found is None:
                return False
        return found is function or bool(found == function)
    except Exception:  # a user object's __getattr__ or __eq__ that raises
        return False


def _given_name(function: Any) -> str | None:
    """A ``__recontrol_name__`` set on this very function or object (its own ``__dict__``,
    not its class's: every instance would share it), or on a bound method's object, then
    with the method's name (two methods of one model are two rewards)."""
    own = _own_name(function)
    if own is not None:
        return own
    owner = getattr(function, "__self__", None) if inspect.ismethod(function) else None
    name = _own_name(owner) if owner is not None else None
    return f"{name}.{function.__name__}" if name is not None else None


def _own_name(holder: Any) -> str | None:
    try:
        name = vars(holder).get(NAME_ATTRIBUTE)
    except TypeError:  # no __dict__
        return None
    return name if isinstance(name, str) and name else None


def _plain_data(value: Any, depth: int = 0) -> bool:
    """Compared by value through its repr: str, numbers, None and lists, tuples and dicts of
    them, exactly those types (a tensor's or an array's repr elides values, a model's shows
    no weights, a subclass may hide its state); nested at most 32 deep."""
    if depth > 32:
        return False
    if type(value) in _PLAIN:
        return True
    if type(value) in (list, tuple):
        return all(_plain_data(v, depth + 1) for v in value)
    if type(value) is dict:
        return all(type(k) in _PLAIN and _plain_data(v, depth + 1) for k, v in value.items())
    return False


def _place(where: str, prompt: str, response: str) -> str:
    """A row as error messages name it: where, and the start of its prompt and response."""
    return f"{where}, prompt {prompt[:60]!r}, response {response[:60]!r}"
