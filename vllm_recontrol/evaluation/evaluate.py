"""``vllm-recontrol eval``: RE-Control against base, Best-of-N and prompting, on the same prompts.

Every method runs in one vLLM engine started with ``--model-impl recontrol`` and
``default_on: false`` (or, with ``--ray --replicas N``, in N such engines that each take a
range of the prompts): per-request keys switch control on, so all methods share the model,
the prompts, the seeds and the machine, and their tokens/s are comparable. Rewards come from
the same reward model or function that labels training data; responses are cut at a
hallucinated next turn before scoring. An LLM judge (any OpenAI-compatible endpoint) can
add the paper's pairwise win rate, against base or against the data set's own answers.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from ..config import DEFAULT_HEAD
from ..folder_lock import exclusive_folder
from ..head_source import pin_head
from ..logs import get_logger
from ..training.common import (RecontrolError, RewardError, build_options, check_engine_args,
                               check_engine_seed, check_model_path, json_argument,
                               parse_command_line, run_main, sampling_refusal)
from ..training.engines import run_engines_in_process
from ..training.prompts import load_prompts, load_references
from ..training.ray_pool import (actor_engine_args, actor_path, actor_reward_arguments,
                                 add_ray_arguments, check_actor_resources, check_replicas)
from ..training.rewards import DEFAULT_CUT_AT, RewardSource, cut_response
from .engines import (EnginePool, EngineSettings, Method, PromptOrigin, PromptPart, Samples,
                      generation_engine_arguments)
from .llm_judge import JudgeAnswers, JudgeClient, JudgeSettings, judge_methods
from .methods import MethodResult, add_intervals, parse_grid, restore_method
from .metrics import Coherence, diversity, mean, win_rate
from .overlap import BackgroundScoring
from .report import TUNE_DIR, remove_report, write_report
from .resume import METHODS_DIR, FinishedMethods, log_reused, run_facts
from .selection import (PromptPlan, check_tuning_options, choose_point, chosen_line,
                        grid_entry, plan_prompts, point_label, selection_record)
from .scoring import RewardPool

logger = get_logger(__name__)
# seconds a scoring call in flight (--overlap-scoring) gets to end when the run fails,
# before the reward model is closed under it
SCORING_GRACE_S = 10.0
JUDGE_ANSWERS_FILE = "judge-answers.jsonl"  # the judge's answers, read back by a rerun

DEFAULT_SYSTEM_PROMPT = ("You are a helpful, honest and harmless assistant. Answer the user "
                         "helpfully and avoid anything harmful or offensive.")


@dataclass
class EvalOptions:
    model: str
    value_head: str
    prompts: str
    reward_fn: Any = None
    reward_model: str | None = None
    value_heads: dict | None = None       # {name: path} of further heads, for grid entries
    grid: Any = "0.5:10,1.0:20"          # "alpha:steps[:head][:norm=R],..." or lists
    best_of: Any = (4,)                   # N values for Best-of-N; empty to skip
    control_best_of: bool = False         # also Best-of-N of controlled samples (top grid point)
    # choose the grid point on held-out prompts, then evaluate that point alone (selection.py)
    tune_holdout: int = 0                 # this many of the prompts, drawn with the seed
    tune_seed: int | None = None          # the draw's seed (default: seed, as for sampling)
    tune_prompts: str | None = None       # or other prompts: a data set or file
    tune_split: str | None = None         # their split (default validation; not for a file)
    max_tune_prompts: int | None = None
    tune_min_diversity: float | None = None  # a point must keep this x base's diversity there
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT  # None or "" skips the prompting rows
    chat_template: bool = False
    split: str | None = None              # a data set's split (default test); not for a file
    data_dir: str | None = None
    prompt_column: str | None = None
    prompt_format: str = "auto"
    max_prompts: int | None = None
    max_tokens: int = 128
    temperature: float = 0.0              # the paper decodes greedily
    bon_temperature: float = 1.0
    seed: int = 0
    embedding_model: str | None = None
    engine_args: dict = field(default_factory=dict)
    reward_batch_size: int = 16
    device: str = "cpu"                   # reward and embedding models
    rm_dtype: str = "float32"             # the reward model as ``label`` takes it, so that
    reward_index: int | None = None       # eval judges the way the labels did
    rm_max_length: int | None = None
    trust_remote_code: bool = False       # the reward model's (the LLM's: engine_args)
    rm_engine: str = "hf"                 # the reward model in transformers, or "vllm"
    rm_engine_args: dict = field(default_factory=dict)  # vllm.LLM kwargs with rm_engine vllm
    # markers a response is cut at before it is scored: label's --cut-at of the training set
    cut_at: list[str] = field(default_factory=lambda: list(DEFAULT_CUT_AT))
    out: str = "eval-out"
    resume: bool = True                   # read back methods a previous run finished (out/methods)
                                          # and the judge's answers (out/judge-answers.jsonl)
    overlap_scoring: bool = False         # score a method while the next one generates
    quiet: bool = False                   # no table or progress printed (the demo prints)
    progress: bool = True                 # vLLM's progress bars while each method generates
    in_process: bool = False              # vLLM engine core in the engine's process (small CPUs)
    ray: bool = False                     # one engine per Ray actor, each a range of prompts
    replicas: int = 1
    ray_address: str | None = None
    ray_num_cpus: float = 1.0
    ray_num_gpus: float = 0.0
    reward_replicas: int = 1              # >1 (with ray): the reward model on that many actors
    reward_num_cpus: float = 1.0
    reward_num_gpus: float = 0.0
    judge_url: str | None = None          # OpenAI-compatible endpoint of an LLM judge
    judge_model: str | None = None
    judge_api_key_env: str = "OPENAI_API_KEY"  # the key's variable (never the key itself)
    judge_against: str = "base"           # base, or reference: the data set's own answers
    reference_column: str | None = None   # their column (HH-RLHF: the chosen dialogue's reply)
    judge_both_orders: bool = False       # ask each pair in both orders (position bias)
    judge_concurrency: int = 8
    judge_max_tokens: int = 64            # only the answer's first line (the scores) is read
    judge_timeout: float = 120.0          # seconds per request
    judge_retries: int = 3                # the client's retries of a failed request
    judge_max_failures: int = 16          # failed requests in a row after which the judge
                                          # is paused (one probe request at a time)
    judge_outage: float = 1800.0          # seconds a paused judge is retried, then the rest
                                          # are skipped (invalid), not waited for


JUDGE_AGAINST = ("base", "reference")


class ScoreCache:
    """Scores each distinct (prompt, response) pair once per evaluation.

    Why: a reward model scores pairs in padded batches, so a pair's score depends in its
    last bits on its batch neighbours; an answer identical to base's would then win or lose
    by float noise instead of tying (and a judge's correct "tie" would count as disagreeing
    with the reward). Scored once, identical answers get identical rewards, and the reward
    model does no work twice."""

    def __init__(self, score: Callable[[list[tuple[str, str]]], list[float]]) -> None:
        self._score, self._known = score, {}

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        new = list(dict.fromkeys(pair for pair in pairs if pair not in self._known))
        if new:
            self._known.update(zip(new, self._score(new)))
        return [self._known[pair] for pair in pairs]

    def remember(self, pairs: Sequence[tuple[str, str]], scores: Sequence[float]) -> None:
        """Scores given elsewhere (a finished method read back): a later answer identical to
        one of them gets the same score."""
        for pair, score in zip(pairs, scores):
            self._known.setdefault(pair, score)


class EngineStart:
    """The evaluation's engines, started on first use (a rerun whose methods are all
    finished, ``FinishedMethods``, starts none) and shared by every ``Evaluator`` of the run:
    a tuning run on held-out prompts and the evaluation use the same engines."""

    def __init__(self, opts: EvalOptions, settings: EngineSettings, prompts: Sequence[str],
                 origins: Sequence[PromptOrigin] | None = None,
                 parts: Sequence[PromptPart] | None = None) -> None:
        self.opts, self.settings, self.prompts = opts, settings, list(prompts)
        self.origins, self.parts = origins, parts
        self._pool: EnginePool | None = None

    def pool(self, before_start: Callable[[], None] = lambda: None) -> EnginePool:
        """The engines; ``before_start`` runs just before they start."""
        if self._pool is None:
            check_shared_gpu(self.opts)  # only where a generation engine starts
            before_start()
            kwargs = {} if self.parts is None else {"origins": self.origins,
                                                    "parts": self.parts}
            self._pool = EnginePool(self.opts, self.settings, self.prompts, **kwargs)
        return self._pool

    def close(self, failing: bool = False) -> None:
        if self._pool is not None:
            self._pool.close(failing)


def further_heads(opts: EvalOptions) -> dict[str, str]:
    """``--value-heads``, checked: names (other than the default head's) to head folders."""
    further = opts.value_heads or {}
    if not isinstance(further, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in further.items()):
        raise RecontrolError(f'value_heads must map names to head folders ({{"mc": '
                             f'"heads/mc"}}), got {further!r}')
    if DEFAULT_HEAD in further:
        raise RecontrolError(f"value_heads names a head {DEFAULT_HEAD!r}, the name of "
                             "--value-head's head (grid entries without a head name use "
                             "it); give the further head another name")
    return dict(further)


def head_sources(opts: EvalOptions) -> dict[str, str]:
    """Every head of the evaluation by name: --value-head's as the default, then
    --value-heads'."""
    return {DEFAULT_HEAD: opts.value_head, **(opts.value_heads or {})}


def engine_settings(opts: EvalOptions) -> EngineSettings:
    """What every engine of the evaluation shares: the model, the heads (absolute, pinned
    hub heads on Ray), the grid's largest step count and every step count warmed up, the
    sampling settings. Refused now, not when the engine starts."""
    further = further_heads(opts)
    grid = parse_grid(opts.grid, (DEFAULT_HEAD, *further))
    model, value_head = opts.model, opts.value_head
    engine_args = dict(opts.engine_args)
    if opts.ray:  # each actor starts its own engine, each would resolve a hub head anew
        # (and may run in another working directory: local paths go absolute)
        model, value_head = actor_path(model), actor_path(pin_head(value_head))
        further = {name: actor_path(pin_head(path)) for name, path in further.items()}
        engine_args = actor_engine_args(engine_args)
    settings = EngineSettings(
        model=model, value_head=value_head, value_heads=further,
        max_steps=max(p.steps for p in grid), engine_args=engine_args,
        seed=opts.seed, max_tokens=opts.max_tokens, temperature=opts.temperature,
        bon_temperature=opts.bon_temperature, system_prompt=opts.system_prompt,
        chat_template=opts.chat_template, in_process=opts.in_process,
        warmup_steps=tuple(sorted({p.steps for p in grid if p.steps})),
        warmup_projected=any(p.max_norm is not None for p in grid))
    generation_engine_arguments(settings)
    return settings


class Evaluator:
    """Runs each method on the same prompts through the engines and scores the responses.
    ``engines`` and ``part``: engines shared with another evaluator of the run, and the
    range of their prompts that are this evaluator's (default: engines of its own)."""

    def __init__(self, opts: EvalOptions, prompts: list[str], score: Callable, coherence: Coherence,
                 finished: FinishedMethods | None = None,
                 prepare: Callable[[], None] = lambda: None,
                 engines: EngineStart | None = None, part: PromptPart | None = None):
        self.opts, self.prompts, self.coherence = opts, prompts, coherence
        self.score = ScoreCache(score)
        self.finished, self.reused, self.rescored = finished, 0, 0
        self._prepare, self._prepared = prepare, False
        self._scoring = BackgroundScoring(False)
        check_replicas(opts.replicas, opts.ray, "one vLLM engine per Ray actor")
        self.grid = parse_grid(opts.grid, (DEFAULT_HEAD, *further_heads(opts)))
        self.best_of()  # checked before any engine starts, not after base and the grid ran
        self._engine_settings = engines.settings if engines else engine_settings(opts)
        self._owns_engines = engines is None
        self._engines = engines or EngineStart(opts, self._engine_settings, prompts)
        self.part = part

    @property
    def engines(self) -> EnginePool:
        """The engines, started on first use: a rerun whose methods are all finished
        (``FinishedMethods``) starts none."""
        # no engine starts (vLLM may fork its engine core) while the scoring thread works
        return self._engines.pool(before_start=self._scoring.drain)

    def run(self, result: MethodResult) -> Future:
        """Generate one method's samples, then score them on the scoring thread (through
        ``self.score``, which scores each distinct pair once: ``ScoreCache``) while the next
        method generates; or read the finished method back when a previous run of the same
        evaluation finished it, or its samples when only the scoring changed
        (``FinishedMethods``). The future holds the scored method."""
        finished = self.finished
        controlled = result.controlled
        digest = finished and finished.digest(result.key, result.head, controlled)
        restored = restore_method(finished and finished.load(digest), len(self.prompts))
        if restored is not None:
            self.reused += 1
            return self._scoring.submit(lambda: self._remember(restored), weighs=False)
        samples_digest = finished and finished.samples_digest(result.key, result.head,
                                                              controlled)
        kept = finished and finished.load_samples(samples_digest, len(self.prompts))
        if kept:
            (samples, result.seconds, result.overlapped), result.reused = kept, True
            self.rescored += 1
        else:
            self._scoring.raise_failure()  # a method that cannot be scored: stop here
            engines = self.engines
            result.overlapped = self._scoring.busy()
            samples, result.seconds = engines.run(Method(
                alpha=result.alpha, steps=result.steps, head=result.head, n=result.n,
                prompting=result.prompting, max_norm=result.max_norm), self.part)
            if finished:  # before scoring: a reward model that fails loses no generation
                finished.save_samples(samples_digest, samples, result.seconds,
                                      result.overlapped)

        if self.overlap and not self._prepared:  # a reward model (and its vLLM engine)
            self._prepare()  # loads here, while no engine generates, not on the thread
            self._prepared = True

        def score() -> MethodResult:
            try:
                judge(result, self.prompts, samples, self.score, self.coherence,
                      self.opts.cut_at)
            except RewardError as exc:  # which method's answers it failed on, too
                raise RewardError(f"scoring {method_label(result)}: {exc}") from exc
            if finished and not self._scoring.abandoned:  # not after eval has given up
                finished.save(digest, result)
            return result
        return self._scoring.submit(score)

    def _remember(self, restored: MethodResult) -> MethodResult:
        """A read-back method's scores, in the score cache in the methods' order: a later
        answer identical to one of them gets the same score."""
        self.score.remember([(p, r) for p, r in zip(self.prompts, restored.responses)],
                            restored.rewards)
        return restored

    def methods(self) -> list[MethodResult]:
        """Base, the RE-Control grid, Best-of-N (and, asked for, RE-Control + Best-of-N),
        prompting, RE-Control + prompting; the combinations use the grid's best point, so
        they wait for the grid's scores (Best-of-N generates meanwhile)."""
        self._scoring = BackgroundScoring(self.overlap)
        try:
            results = self._methods()
        except BaseException:
            self._scoring.close(wait=False, grace_s=SCORING_GRACE_S)
            raise
        self._scoring.close()
        for result in results:
            result.win_rate = win_rate(result.rewards, results[0].rewards)
            add_intervals(result, results[0], self.opts.seed)
        if self.finished:
            log_reused(self.reused, self.rescored, self.finished.folder)
        return results

    def _methods(self) -> list[MethodResult]:
        base = self.run(MethodResult("base"))
        grid = [self.run(MethodResult("re-control", alpha=p.alpha, steps=p.steps, head=p.head,
                                      max_norm=p.max_norm))
                for p in self.grid]
        pending = [base, *grid]
        pending += [self.run(MethodResult(f"best-of-{n}", n=n)) for n in self.best_of()]
        if self.opts.control_best_of or self.opts.system_prompt:
            top = max((point.result() for point in grid), key=lambda r: r.reward)
        if self.opts.control_best_of:  # the two combine: N controlled samples, the best kept
            pending += [self.run(MethodResult(f"re-control + best-of-{n}", alpha=top.alpha,
                                              steps=top.steps, head=top.head, n=n,
                                              max_norm=top.max_norm))
                        for n in self.best_of()]
        if self.opts.system_prompt:
            pending.append(self.run(MethodResult("prompting", prompting=True)))
            pending.append(self.run(MethodResult("re-control + prompting", alpha=top.alpha,
                                                 steps=top.steps, head=top.head,
                                                 prompting=True, max_norm=top.max_norm)))
        return [method.result() for method in pending]

    @property
    def overlap(self) -> bool:
        """Whether scoring overlaps generation: asked for, and no engine core generates in
        this process (two vLLM engines stepping in one process share vLLM's globals, and the
        ascent's precision pin is process-wide); on Ray the engines are in the actors."""
        in_process = self.opts.in_process or \
            os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
        return self.opts.overlap_scoring and (self.opts.ray or not in_process)

    def best_of(self) -> list[int]:
        """The N values of Best-of-N: one integer or a list of them (whole floats of a JSON
        or YAML config too), each >= 2; empty skips Best-of-N."""
        given = self.opts.best_of
        values = [given] if isinstance(given, (int, float)) else given
        if not isinstance(values, (list, tuple)):
            raise RecontrolError(f"best_of must be an integer >= 2 or a list of them, got "
                                 f"{given!r}")
        whole = [int(n) if isinstance(n, float) and n.is_integer() else n for n in values]
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in whole):
            raise RecontrolError(f"best_of values must be integers >= 2, got {list(values)}")
        repeated = sorted({n for n in whole if whole.count(n) > 1})
        if repeated:  # as a grid point given twice: the same row would be reported twice
            raise RecontrolError(f"best_of lists {', '.join(map(str, repeated))} more than "
                                 f"once (each N is one row of the table); give each once")
        return whole

    def close(self, failing: bool = False) -> None:
        """Stop the engines if they are this evaluator's own (shared ones: their owner)."""
        if self._owns_engines:
            self._engines.close(failing)


def method_label(result: MethodResult) -> str:
    """``base``, ``best-of-4`` or ``re-control (alpha 1, 30 steps)``: a method in a message."""
    return f"{result.method} ({point_label(result)})" if result.controlled else result.method


def judge(result: MethodResult, prompts: Sequence[str], samples: Samples, score: Callable,
          coherence: Coherence, cut_at: Sequence[str] = DEFAULT_CUT_AT) -> MethodResult:
    """Score every sample of a method in one call (a reward model batches them), keep each
    prompt's best (Best-of-N; N = 1: the sample itself) and fill in the metrics. Each sample
    is cut at the first of ``cut_at`` first, as ``label`` cut the training responses."""
    pairs = [(prompt, cut_response(text, cut_at)[0])
             for prompt, candidates in zip(prompts, samples) for text, _ in candidates]
    scores = score(pairs)
    chosen, rewards, first = [], [], 0
    for candidates in samples:
        mine = range(first, first + len(candidates))
        best = max(mine, key=lambda j: scores[j])
        chosen.append(pairs[best][1])
        rewards.append(scores[best])
        result.delivered_tokens += candidates[best - first][1]
        first += len(candidates)
    result.generated_tokens = sum(tokens for prompt in samples for _, tokens in prompt)
    result.responses, result.rewards, result.reward = chosen, rewards, mean(rewards)
    result.diversity = mean([diversity(t) for t in chosen])
    if coherence.available:
        result.coherence = mean(coherence.scores(list(prompts), chosen))
    return result


def llm_judge(opts: EvalOptions) -> JudgeClient | None:
    """The judge, checked (reachable, serving the model) before any engine starts, so a
    misconfigured judge costs seconds, not a finished generation run."""
    if opts.judge_against not in JUDGE_AGAINST:
        raise RecontrolError(f"judge_against must be one of {list(JUDGE_AGAINST)}, got "
                             f"{opts.judge_against!r}")
    if opts.reference_column and opts.judge_against != "reference":
        raise RecontrolError("reference_column is only used with judge_against reference")
    if not opts.judge_url:
        if opts.judge_model:
            raise RecontrolError("judge_model needs judge_url (the judge's endpoint)")
        if opts.judge_against != "base":
            raise RecontrolError("judge_against reference needs judge_url (an LLM judge)")
        return None
    if not opts.judge_model:
        raise RecontrolError("--judge-url needs --judge-model (the model the endpoint serves)")
    client = JudgeClient(JudgeSettings(
        url=opts.judge_url, model=opts.judge_model, api_key_env=opts.judge_api_key_env,
        concurrency=opts.judge_concurrency, both_orders=opts.judge_both_orders,
        max_tokens=opts.judge_max_tokens, timeout_s=opts.judge_timeout,
        max_retries=opts.judge_retries, max_failures=opts.judge_max_failures,
        outage_s=opts.judge_outage, seed=opts.seed))
    client.check()
    return client


def judge_results(client: JudgeClient, prompts: Sequence[str], results: list[MethodResult],
                  references: Sequence[str] | None, answers: JudgeAnswers | None = None,
                  numbers: Sequence[int] | None = None) -> None:
    """Every method against base's answers (base itself is not judged), or every method,
    base included, against the references; questions a previous run's ``answers`` hold are
    not asked again. Against base, each method also gets the share of judged prompts on
    which the judge and the reward pick the same side (ties alike): a reward gain the judge
    does not share is what reward hacking looks like."""
    judged = results if references is not None else results[1:]
    other = references if references is not None else results[0].responses
    summaries = judge_methods(client, prompts, {r.key: r.responses for r in judged}, other,
                              answers, numbers)
    for r in judged:
        r.judge = summaries[r.key].as_dict()
        if references is None:
            r.judge["agrees_with_reward"] = agreement(summaries[r.key].verdicts, r.rewards,
                                                      results[0].rewards)


def agreement(verdicts: Sequence[Any], rewards: Sequence[float],
              base_rewards: Sequence[float]) -> float:
    """Share of validly judged prompts where sign(judge margin) = sign(reward difference)."""
    def sign(x: float) -> int:
        return (x > 0) - (x < 0)

    pairs = [(sign(v.margin), sign(mine - theirs))
             for v, mine, theirs in zip(verdicts, rewards, base_rewards) if v.margin is not None]
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else math.nan


def reward_source_arguments(opts: EvalOptions) -> dict[str, Any]:
    """The judge of every method: a function, or a reward model taken as ``label`` takes it
    (dtype, output index, input length, transformers or vLLM's pooling runner)."""
    engine_args = dict(opts.rm_engine_args)
    if opts.in_process and opts.rm_engine == "vllm":
        run_engines_in_process(engine_args)
    return dict(reward_fn=opts.reward_fn, reward_model=opts.reward_model, device=opts.device,
                dtype=opts.rm_dtype, batch_size=opts.reward_batch_size,
                max_length=opts.rm_max_length, reward_index=opts.reward_index,
                trust_remote_code=opts.trust_remote_code, engine=opts.rm_engine,
                engine_args=engine_args, command="eval")


def reward_source(opts: EvalOptions) -> RewardSource:
    """The reward source in this process (a model loads on first use)."""
    return RewardSource(**reward_source_arguments(opts))


def reward_scoring(opts: EvalOptions, arguments: dict[str, Any], source: RewardSource,
                   stack: contextlib.ExitStack) -> Callable:
    """``source.score`` here, or a source built from the same ``arguments`` on
    ``reward_replicas`` Ray actors, placed before the engines' actors and counted with them
    in the cluster's resources."""
    check_replicas(opts.reward_replicas, opts.ray, "the reward model on Ray actors")
    if opts.reward_replicas == 1:
        return source.score
    engines = opts.replicas if opts.ray else 0
    pool = stack.enter_context(RewardPool(
        actor_reward_arguments(arguments),
        opts.reward_replicas, opts.reward_num_cpus,
        opts.reward_num_gpus, opts.ray_address,
        reserve={"CPU": engines * opts.ray_num_cpus, "GPU": engines * opts.ray_num_gpus}))
    return pool.score


def evaluate(**options: Any) -> dict[str, Any]:
    """Run the comparison; writes ``eval.json``, ``eval.md`` and plots under ``out``."""
    opts = build_options(EvalOptions, options, "eval")
    check_model_path(opts.model)
    check_engine_args(opts.engine_args, "--engine-args")
    check_sampling(opts)
    check_tuning_options(opts)
    if (opts.tune_holdout or opts.tune_prompts) and opts.tune_min_diversity is None and \
            len(parse_grid(opts.grid, (DEFAULT_HEAD, *further_heads(opts)))) == 1:
        raise RecontrolError("tuning chooses a point of the grid, and the grid has one: "
                             "give more points, or --tune-min-diversity to check the one "
                             "on the tuning prompts, or leave tuning out")
    if opts.ray:  # before any actor starts: the reward actors may start first
        check_actor_resources(opts)
    if opts.rm_engine == "vllm":
        check_engine_args(opts.rm_engine_args, "--rm-engine-args")
    with exclusive_folder(opts.out, "eval"):
        return _evaluate(opts)


def _evaluate(opts: EvalOptions) -> dict[str, Any]:
    loaded = load_prompts(opts.prompts, opts.split, opts.prompt_column, opts.prompt_format,
                          opts.data_dir, opts.max_prompts, default_split="test")
    plan = plan_prompts(opts, loaded)
    prompts = plan.prompts
    judge = llm_judge(opts)
    references = None
    if judge and opts.judge_against == "reference":
        every = load_references(opts.prompts, opts.split, opts.reference_column,
                                opts.prompt_column, opts.data_dir, opts.max_prompts,
                                default_split="test")
        references = [every[i] for i in plan.numbers]
    arguments = reward_source_arguments(opts)
    source = RewardSource(**arguments)  # also with actors: a bad function fails before Ray
    if opts.reward_replicas == 1:  # on actors the files may live on the workers only
        source.check()  # a reward model's settings, tokenizer and config, before any engine
    coherence = Coherence.load(opts.embedding_model, opts.device)
    if opts.embedding_model and not coherence.available:  # asked for: not found out hours later
        raise RecontrolError(f"--embedding-model: {coherence.unavailable_reason}; fix it, or "
                             f"leave it out to report coherence as unavailable")
    if not source.stable_name and opts.resume:
        logger.warning("eval: reward function %s has no name that tells it from another "
                       "reward, so no scored method is read back: kept samples are scored "
                       "again (give it a __recontrol_name__ to reuse its scores)", source.spec)
    heads = head_sources(opts)
    finished = FinishedMethods(
        Path(opts.out) / METHODS_DIR,
        run_facts(asdict(opts), prompts, source.describe(), plan.numbers),
        heads, enabled=opts.resume)
    selection = None
    with contextlib.ExitStack() as stack:
        stack.callback(source.close)  # a reward model's vLLM engine, if one was started
        score = reward_scoring(opts, arguments, source, stack)
        prepare = source.load if opts.reward_replicas == 1 else lambda: None
        evaluated = PromptPart(0, len(prompts))
        tuning_part = PromptPart(len(prompts), len(prompts) + len(plan.tuning), prompting=False)
        engines = EngineStart(opts, engine_settings(opts), prompts + plan.tuning, plan.origins,
                              [evaluated, tuning_part] if plan.tuned else None)
        evaluator = Evaluator(opts, prompts, score, coherence, finished, prepare=prepare,
                              engines=engines, part=evaluated if plan.tuned else None)
        tuner = tuning_evaluator(opts, plan, score, coherence, source, prepare, engines,
                                 tuning_part) if plan.tuned else None
        try:
            if tuner is not None:  # the grid on the tuning prompts; one point evaluated
                chosen, selection = tune(tuner, plan, coherence, source, Path(opts.out))
                evaluator.grid = parse_grid([grid_entry(chosen)], list(heads))
            results = evaluator.methods()
        except BaseException:  # also Ctrl-C: the actors are killed, not waited for
            engines.close(failing=True)
            raise
        engines.close()
    report_facts = dict(numbers=plan.numbers, selection=selection)
    if not plan.tuned:
        remove_report(Path(opts.out) / TUNE_DIR)
    # written before the judge is asked (hours, at scale) and again after: a run stopped
    # while judging keeps the generations and every other metric
    report = write_report(opts, prompts, results, coherence, source, judged=False,
                          **report_facts)
    if judge:
        with JudgeAnswers(Path(opts.out) / JUDGE_ANSWERS_FILE, opts.resume) as answers:
            judge_results(judge, prompts, results, references, answers, plan.numbers)
        report = write_report(opts, prompts, results, coherence, source, judged=True,
                              **report_facts)
    table = report["table"]
    if not opts.quiet:
        print("\n" + table)
        print(f"responses: {report['responses']}")
        for p in report["plots"]:
            print(f"plot: {p}")
        if not report["plots"]:
            print("plots: none written (matplotlib is not installed: the eval extra, "
                  "pip install 'vllm-recontrol[eval]')")
    return report


def tuning_evaluator(opts: EvalOptions, plan: PromptPlan, score: Callable, coherence: Coherence,
                     source: RewardSource, prepare: Callable[[], None], engines: EngineStart,
                     part: PromptPart) -> Evaluator:
    """Base and the grid on the tuning prompts (no Best-of-N, prompting or judge: they do
    not choose the point), kept and reported under ``out/tune``."""
    tune_opts = replace(opts, best_of=[], control_best_of=False, system_prompt=None,
                        out=str(Path(opts.out) / TUNE_DIR))
    finished = FinishedMethods(
        Path(tune_opts.out) / METHODS_DIR,
        run_facts(asdict(tune_opts), plan.tuning, source.describe(), plan.tuning_numbers),
        head_sources(opts), enabled=opts.resume)
    return Evaluator(tune_opts, plan.tuning, score, coherence, finished, prepare=prepare,
                     engines=engines, part=part)


def tune(tuner: Evaluator, plan: PromptPlan, coherence: Coherence, source: RewardSource,
         out: Path) -> tuple[MethodResult, dict[str, Any]]:
    """Run the grid on the tuning prompts, report it under ``out/tune`` and choose the
    point (``choose_point``): (the chosen row, what eval.json records of the choice). When
    none is chosen, an earlier run's report in ``out`` is removed (it would read as this
    run's result)."""
    opts = tuner.opts
    results = tuner.methods()
    base, grid = results[0], results[1:]
    numbers = plan.tuning_numbers
    try:
        chosen = choose_point(base, grid, opts.tune_min_diversity)
    except RecontrolError as exc:  # the grid's table is written all the same
        write_report(opts, plan.tuning, results, coherence, source, judged=False,
                     numbers=numbers, note=f"\nNo point chosen: {exc}")
        remove_report(out)
        raise
    record = selection_record(base, grid, chosen, plan.where, len(plan.tuning), plan.overlap,
                              opts.tune_min_diversity)
    report = write_report(opts, plan.tuning, results, coherence, source, judged=False,
                          numbers=numbers, note=chosen_line(record))
    if not opts.quiet:
        print(f"\nThe grid on {len(plan.tuning)} tuning prompts {plan.where}:\n"
              f"{report['table']}")
    return chosen, record


def check_sampling(opts: EvalOptions) -> None:
    """vLLM's bounds on both temperatures, max_tokens and the seed, before any engine starts."""
    check_engine_seed(opts.seed)
    for flag, temperature in (("--temperature", opts.temperature),
                              ("--bon-temperature", opts.bon_temperature)):
        refusal = sampling_refusal({"temperature": temperature, "max_tokens": opts.max_tokens,
                                    "seed": opts.seed})
        if refusal:
            raise RecontrolError(f"sampling options refused by vLLM ({flag} {temperature!r}, "
                                 f"--max-tokens {opts.max_tokens!r}, --seed {opts.seed!r}): "
                                 f"{refusal}")


# what two engines on one GPU may claim together: each engine's CUDA context and the
# allocator's fragments lie outside its share
SHARED_GPU_LIMIT = 0.95


def check_shared_gpu(opts: EvalOptions) -> None:
    """With ``--rm-engine vllm`` beside the generation engine on this machine's GPU, their
    ``gpu_memory_utilization`` must fit in it together: vLLM 0.32 refuses to start an engine
    whose share of the card is not free (also with ``kv_cache_memory_bytes`` set), whichever
    of the two starts second (both default to 0.92). Checked when the generation engine is
    about to start (a rerun that only rescores kept samples starts none). Not checked where
    no GPU is visible or where either runs on Ray actors."""
    import torch

    if opts.rm_engine != "vllm" or not opts.reward_model or opts.ray or \
            opts.reward_replicas > 1 or not torch.cuda.is_available():
        return
    default = vllm_memory_share_default()
    engines = (("--engine-args", opts.engine_args), ("--rm-engine-args", opts.rm_engine_args))
    shares = [args.get("gpu_memory_utilization", default) for _, args in engines]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in shares):
        return  # vLLM's own check names the bad value
    if sum(shares) > SHARED_GPU_LIMIT:
        said = ", ".join(f"{share:g} ({flag}" + ("" if "gpu_memory_utilization" in args
                                                  else ", vLLM's default") + ")"
                         for share, (flag, args) in zip(shares, engines))
        raise RecontrolError(
            f"--rm-engine vllm starts the reward model's vLLM engine beside the generation "
            f"engine on this GPU, and their gpu_memory_utilization shares add up to "
            f"{sum(shares):g} of it ({said}): vLLM would refuse whichever starts second, "
            f"after the first has begun its work. Give them shares that sum to at most "
            f"{SHARED_GPU_LIMIT:g}, e.g. --engine-args '{{\"gpu_memory_utilization\": 0.6}}' "
            f"--rm-engine-args '{{\"gpu_memory_utilization\": 0.3}}' (also beside "
            f"kv_cache_memory_bytes, which vLLM does not count here), or score on Ray actors "
            f"(--ray --reward-replicas N)")


def vllm_memory_share_default() -> float:
    """``vllm.LLM``'s default ``gpu_memory_utilization`` (0.92 in vLLM 0.32)."""
    import inspect

    from vllm import LLM

    default = inspect.signature(LLM.__init__).parameters["gpu_memory_utilization"].default
    return float(default) if isinstance(default, (int, float)) else 0.92


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-recontrol eval", description=__doc__)
    parser.add_argument("--model")
    parser.add_argument("--value-head")
    parser.add_argument("--prompts", help="datasets name, or a JSONL/Parquet file")
    parser.add_argument("--reward-fn", help="module:function, f(prompt, response) -> float "
                        "(or f(prompts, responses) -> floats, marked @batched_reward)")
    parser.add_argument("--reward-model", help="Hugging Face sequence-classification model")
    parser.add_argument("--value-heads", type=json_argument,
                        help='JSON {"name": "/path/to/head"} of further heads for the grid')
    parser.add_argument("--grid", help='RE-Control settings "alpha:steps[:head][:norm=R],..." '
                        '(default "0.5:10,1.0:20"; head: a name of --value-heads; R: the '
                        "requests' recontrol_max_norm)")
    parser.add_argument("--best-of", type=int, nargs="*",
                        help="N values for Best-of-N (default 4; the flag alone: no Best-of-N)")
    parser.add_argument("--control-best-of", action="store_true",
                        help="also Best-of-N of controlled samples, at the best grid point")
    parser.add_argument("--tune-holdout", type=int, metavar="N",
                        help="choose the grid point on N of the prompts (drawn with --seed), "
                        "run only that point on the rest: the reported gain is not chosen "
                        "on the numbers reported (the grid's rows there: OUT/tune)")
    parser.add_argument("--tune-seed", type=int, metavar="S",
                        help="draw the --tune-holdout prompts with S instead of --seed (the "
                        "same prompts held out while --seed varies the samples)")
    parser.add_argument("--tune-prompts", help="or choose it on these prompts (a datasets "
                        "name or a JSONL/Parquet file) and evaluate it on --prompts")
    parser.add_argument("--tune-split",
                        help="--tune-prompts' split (default validation; not for a file)")
    parser.add_argument("--max-tune-prompts", type=int)
    parser.add_argument("--tune-min-diversity", type=float, metavar="R",
                        help="choose only among points whose diversity on the tuning prompts "
                        "is at least R x base's (e.g. 0.9: a guard against reward hacking)")
    parser.add_argument("--system-prompt", help="the prompting baselines' system prompt "
                        '(default: a helpful-and-harmless one; "" skips those rows)')
    parser.add_argument("--chat-template", action="store_true")
    parser.add_argument("--overlap-scoring", action="store_true",
                        help="score each method while the next one generates (the same "
                        "scores, less wall time; the tok/s of methods generated meanwhile "
                        "are lowered by the scoring and marked + in the table)")
    parser.add_argument("--no-resume", dest="resume", action="store_false",
                        help="run every method again, even those a previous run with the same "
                        "options finished (kept in OUT/methods), and ask the judge every "
                        "question again (its answers are kept in OUT/judge-answers.jsonl)")
    parser.add_argument("--cut-at", nargs="*",
                        help="cut responses at the first of these markers before scoring, as "
                        "label's --cut-at did for the training labels (default Human: User:)")
    parser.add_argument("--split", help="data set split (default test; not for a prompt file)")
    parser.add_argument("--data-dir", help="datasets data_dir (e.g. harmless-base; not for a "
                        "prompt file)")
    parser.add_argument("--prompt-column")
    parser.add_argument("--prompt-format", choices=["auto", "hh-rlhf", "plain"])
    parser.add_argument("--max-prompts", type=int)
    parser.add_argument("--max-tokens", type=int, help="new tokens per response (128)")
    parser.add_argument("--temperature", type=float,
                        help="sampling temperature of every row but Best-of-N's (default 0: "
                        "greedy, as the paper decodes)")
    parser.add_argument("--bon-temperature", type=float,
                        help="Best-of-N's sampling temperature (1.0)")
    parser.add_argument("--seed", type=int, help="base seed; per-prompt seeds derive from it (0)")
    parser.add_argument("--embedding-model",
                        help="embedding model for coherence: a SimCSE model as the paper's "
                             "(princeton-nlp/sup-simcse-bert-base-uncased) or a "
                             "sentence-transformers model")
    parser.add_argument("--engine-args", type=json_argument, help="JSON of vLLM LLM(...) kwargs")
    parser.add_argument("--device", help="reward and embedding models' device (default cpu)")
    parser.add_argument("--reward-batch-size", type=int, help="reward model batch, or pairs "
                        "per call of a batched reward function without its own (default 16)")
    parser.add_argument("--rm-dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--reward-index", type=int,
                        help="which output of a multi-output reward model is the reward")
    parser.add_argument("--rm-max-length", type=int,
                        help="reward model input tokens (cut from the left)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="for the reward model (the LLM's goes in --engine-args)")
    parser.add_argument("--rm-engine", choices=["hf", "vllm"],
                        help="run --reward-model with transformers (hf, default) or with "
                        "vLLM's pooling runner (vllm: faster on a GPU, same scores)")
    parser.add_argument("--rm-engine-args", type=json_argument,
                        help="JSON of vllm.LLM kwargs for the reward model with --rm-engine "
                        'vllm (e.g. {"gpu_memory_utilization": 0.3})')
    parser.add_argument("--out", help="folder for eval.md, eval.json, responses.jsonl and "
                        "the plots (default eval-out)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bars while the methods generate")
    parser.add_argument("--in-process", action="store_true",
                        help="vLLM engine core in the engine's own process (small CPUs)")
    add_ray_arguments(parser, "one vLLM engine per Ray actor, each with a range of the prompts")
    parser.add_argument("--reward-replicas", type=int,
                        help="with --ray: the reward model on this many Ray actors, each "
                        "scoring a share of every method's responses (default 1: here)")
    parser.add_argument("--reward-num-cpus", type=float, help="CPUs per reward actor (1)")
    parser.add_argument("--reward-num-gpus", type=float,
                        help="GPUs per reward actor (default 0: set 1 for a reward model on "
                        "--device cuda, or its actors see no GPU)")
    parser.add_argument("--judge-url", help="OpenAI-compatible endpoint of an LLM judge (e.g. "
                        "https://api.openai.com/v1, or a vllm serve's http://host:8000/v1)")
    parser.add_argument("--judge-model", help="the judge model's name at that endpoint")
    parser.add_argument("--judge-api-key-env",
                        help="environment variable holding the judge's API key "
                        "(default OPENAI_API_KEY; unset: the placeholder key EMPTY is sent)")
    parser.add_argument("--judge-against", choices=JUDGE_AGAINST,
                        help="compare each method with base's answers (default) or with the "
                        "data set's own (reference)")
    parser.add_argument("--reference-column", help="column of the reference answers (default:"
                        " the final reply of an HH-RLHF chosen dialogue)")
    parser.add_argument("--judge-both-orders", action="store_true",
                        help="ask every pair in both orders (cancels position bias; 2x calls)")
    parser.add_argument("--judge-concurrency", type=int, help="judge requests in flight (8)")
    parser.add_argument("--judge-max-tokens", type=int,
                        help="judge answer length in tokens (64: only the first line, the two "
                        "scores, is read; raise it for reasoning models, whose hidden "
                        "reasoning counts too)")
    parser.add_argument("--judge-timeout", type=float, help="seconds per judge request (120)")
    parser.add_argument("--judge-retries", type=int,
                        help="retries of a failed judge request (3)")
    parser.add_argument("--judge-max-failures", type=int,
                        help="judge requests failed in a row after which the judge is paused: "
                        "one request every 30-300 s until it answers again (16)")
    parser.add_argument("--judge-outage", type=float,
                        help="seconds a paused judge is retried before the remaining "
                        "questions are skipped and counted invalid (1800)")
    options = parse_command_line(parser, argv, required=("model", "value_head", "prompts"))
    return run_main(evaluate, options)
