"""eval --tune-holdout / --tune-prompts: the grid point is chosen on prompts the report does
not use, and only that point runs on the evaluated prompts."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest

from vllm_recontrol.evaluation.methods import MethodResult
from vllm_recontrol.evaluation.selection import choose_point, hold_out
from vllm_recontrol.toy_world import NEGATIVE, POSITIVE
from vllm_recontrol.training.common import RecontrolError

evaluation = importlib.import_module("vllm_recontrol.evaluation.evaluate")
REWARD = "vllm_recontrol.toy_world:positive_share"


def test_hold_out_draws_disjoint_ordered_indices_with_the_seed():
    for count, held in ((10, 1), (10, 9), (37, 12)):
        kept, tuning = hold_out(count, held, seed=3)
        assert len(tuning) == held and sorted(tuning) == tuning and sorted(kept) == kept
        assert sorted(kept + tuning) == list(range(count))
        assert hold_out(count, held, seed=3) == (kept, tuning)
    draws = {tuple(hold_out(40, 10, seed).tuning) for seed in range(5)}
    assert len(draws) == 5  # the seed decides which
    for bad in (0, -1, True, 2.5):
        with pytest.raises(RecontrolError, match="tune_holdout must be a whole number"):
            hold_out(10, bad, 0)
    with pytest.raises(RecontrolError, match="holds out every one of the 4 prompts, leaving "
                       "none to evaluate: hold out fewer, or evaluate more prompts"):
        hold_out(4, 4, 0)


def row(alpha: float, reward: float, diversity: float = 0.8) -> MethodResult:
    return MethodResult("re-control", alpha=alpha, steps=10, reward=reward,
                        diversity=diversity)


def test_choose_point_takes_the_best_reward_that_keeps_enough_diversity():
    base = MethodResult("base", reward=0.1, diversity=0.8)
    grid = [row(0.5, 0.3), row(1.0, 0.6), row(2.0, 0.9, diversity=0.2), row(3.0, 0.6)]
    assert choose_point(base, grid).alpha == 2.0
    assert choose_point(base, grid, min_diversity=0.9).alpha == 1.0  # the first of equals
    assert choose_point(base, [row(1.0, math.nan), row(2.0, 0.2)]).alpha == 2.0
    with pytest.raises(RecontrolError, match="no grid point has a mean reward"):
        choose_point(base, [row(1.0, math.nan)])
    with pytest.raises(RecontrolError, match=r"no grid point kept diversity >= 1\.5 x base's "
                       r"\(0\.800\) .*alpha 0\.5, 10 steps: 0\.800.*--tune-min-diversity"):
        choose_point(base, grid, min_diversity=1.5)


def answer(prompt: str, alpha: float, number: int, sample: int) -> str:
    """A response whose positive share depends on the prompt's kind and the edit: prompts
    marked "strong" want alpha 2, the others alpha 1 (alpha 2 turns them sour); alpha 3 says
    one positive word over and over (best reward, no diversity). The prompt's number and the
    sample's index are in the text, so a row shows which seed it would have had."""
    strong = "strong" in prompt
    if alpha >= 3:
        words = [POSITIVE[0]] * 12
    elif alpha == 0:
        words = POSITIVE[:1] + NEGATIVE[:3]
    elif (alpha >= 2) == strong:
        words = POSITIVE[:4]
    else:
        words = POSITIVE[:2] + NEGATIVE[:2]
    return " ".join(words + [f"n{number}", f"s{sample}"])


@pytest.fixture
def fake_engines(monkeypatch):
    """EnginePool stand-in that honours the prompts' origins and the parts (the samples
    depend on the prompt, its number and the method); records the engine starts and every
    (part, method) run."""
    record = {"started": 0, "runs": []}

    class PartPool:
        def __init__(self, opts, settings, prompts, origins=None, parts=None) -> None:
            record["started"] += 1
            record["settings"] = settings
            record["seed"] = opts.seed
            self.prompts = list(prompts)
            self.numbers = [o.number for o in origins] if origins else \
                list(range(len(self.prompts)))

        def run(self, method, part=None):
            lo, hi = (part.start, part.end) if part else (0, len(self.prompts))
            record["runs"].append((self.prompts[lo:hi], method.alpha, method.n))
            return [[(answer(self.prompts[i], method.alpha, self.numbers[i], j), 4)
                     for j in range(method.n)] for i in range(lo, hi)], 1.0

        def close(self, failing: bool = False) -> None:
            pass

    monkeypatch.setattr(evaluation, "EnginePool", PartPool)
    return record


@pytest.fixture
def head(tmp_path) -> str:
    from vllm_recontrol.value_head import ValueHead

    ValueHead(8, [4], seed=0).save(tmp_path / "head")
    return str(tmp_path / "head")


def write_prompts(path: Path, texts: list[str]) -> str:
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return str(path)


def responses(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]


def test_tune_prompts_choose_the_point_and_only_it_runs_on_the_evaluated_prompts(
        tmp_path, fake_engines, head):
    """Tuning prompts that want alpha 2, evaluation prompts that want alpha 1: the untuned
    run picks alpha 1 for its combination rows on the very prompts it reports (and says
    so); the tuned one chooses alpha 2 on the tuning prompts, runs only it on the
    evaluation prompts, and reports its (lower) reward there honestly."""
    evaluated = write_prompts(tmp_path / "eval.jsonl", [f"plain question {i}" for i in range(6)])
    tuning = write_prompts(tmp_path / "tune.jsonl", [f"strong question {i}" for i in range(4)])
    options = dict(model="m", value_head=head, prompts=evaluated, reward_fn=REWARD,
                   grid="1:2,2:2", best_of=[2], control_best_of=True, system_prompt="",
                   quiet=True)

    untuned = evaluation.evaluate(**options, out=str(tmp_path / "untuned"))
    rows = [(r["method"], r["alpha"], r["reward"]) for r in untuned["results"]]
    assert rows[:3] == [("base", 0.0, 0.25), ("re-control", 1.0, 1.0), ("re-control", 2.0, 0.5)]
    assert rows[4][:2] == ("re-control + best-of-2", 1.0)
    assert untuned["selection"] is None
    assert "use the grid point of highest reward on these same prompts (alpha 1, 2 steps)" \
        in (tmp_path / "untuned" / "eval.md").read_text()

    fake_engines["runs"].clear()
    out = tmp_path / "tuned"
    tuned = evaluation.evaluate(**options, out=str(out), tune_prompts=tuning)
    assert fake_engines["started"] == 2  # one engine per run: tuning and evaluation share it
    tune_texts = [f"strong question {i}" for i in range(4)]
    eval_texts = [f"plain question {i}" for i in range(6)]
    assert [(texts, alpha, n) for texts, alpha, n in fake_engines["runs"]] == [
        (tune_texts, 0.0, 1), (tune_texts, 1.0, 1), (tune_texts, 2.0, 1),
        (eval_texts, 0.0, 1), (eval_texts, 2.0, 1), (eval_texts, 0.0, 2), (eval_texts, 2.0, 2)]
    assert [(r["method"], r["alpha"], r["reward"]) for r in tuned["results"]] == [
        ("base", 0.0, 0.25), ("re-control", 2.0, 0.5), ("best-of-2", 0.0, 0.25),
        ("re-control + best-of-2", 2.0, 0.5)]
    selection = tuned["selection"]
    assert selection["chosen"] == {"alpha": 2.0, "steps": 2, "head": "default", "max_norm": None}
    assert selection["prompts"] == 4 and selection["also_evaluated"] == 0
    assert selection["on"] == f"of --tune-prompts {tuning}"
    assert [(g["alpha"], g["reward"], g["eligible"]) for g in selection["grid"]] == [
        (1.0, 0.5, True), (2.0, 1.0, True)]
    table = (out / "eval.md").read_text()
    assert "RE-Control's point (alpha 2, 2 steps) was chosen on 4 prompts of --tune-prompts" \
        in table and "highest reward on these same prompts" not in table
    # the tuning run's own report: base and the grid on the tuning prompts
    assert "Chosen here by highest mean reward, and evaluated in ../eval.md: alpha 2, 2 steps" \
        in (out / "tune" / "eval.md").read_text()
    tune_report = json.loads((out / "tune" / "eval.json").read_text())
    assert [(r["method"], r["alpha"], r["reward"]) for r in tune_report["results"]] == [
        ("base", 0.0, 0.25), ("re-control", 1.0, 0.5), ("re-control", 2.0, 1.0)]
    assert [r["prompt"] for r in responses(out / "tune")][:4] == tune_texts
    # a rerun reads every method of both back and starts no engine
    fake_engines["runs"].clear()
    again = evaluation.evaluate(**options, out=str(out), tune_prompts=tuning)
    assert fake_engines["runs"] == [] and fake_engines["started"] == 2
    assert again["selection"] == selection
    assert [r["rewards"] for r in again["results"]] == [r["rewards"] for r in tuned["results"]]
    # an untuned run in the folder leaves no tuned run's report in tune/ to be read as its
    # own; the kept tuning methods stay
    evaluation.evaluate(**options, out=str(out))
    assert sorted(p.name for p in (out / "tune").iterdir()) == ["methods"]


def test_held_out_prompts_keep_their_numbers_and_seeds(tmp_path, fake_engines, head):
    """--tune-holdout 3 of 8: the held-out prompts are hold_out's draw with the seed; each
    evaluated prompt samples as in a run of all eight (its seed follows its number in
    --prompts, which responses.jsonl and eval.json report)."""
    texts = [f"{'strong' if i % 2 else 'plain'} question {i}" for i in range(8)]
    prompts = write_prompts(tmp_path / "p.jsonl", texts)
    options = dict(model="m", value_head=head, prompts=prompts, reward_fn=REWARD,
                   grid="1:2,2:2", best_of=[3], system_prompt="", quiet=True, seed=5)
    whole = evaluation.evaluate(**options, out=str(tmp_path / "whole"))
    out = tmp_path / "held"
    report = evaluation.evaluate(**options, out=str(out), tune_holdout=3)
    kept, tuning = hold_out(8, 3, seed=5)
    assert report["num_prompts"] == 5 and report["prompt_numbers"] == kept
    assert report["selection"]["on"] == "held out of --prompts (drawn with seed 5)"
    chosen = report["selection"]["chosen"]["alpha"]
    strong_held = sum(i % 2 for i in tuning)
    assert chosen == (2.0 if strong_held * 2 > len(tuning) else 1.0)
    tune_rows = responses(out / "tune")
    assert [r["prompt_index"] for r in tune_rows[:3]] == tuning
    assert [r["prompt"] for r in tune_rows[:3]] == [texts[i] for i in tuning]
    # every evaluated row (Best-of-N's samples too) is the whole run's row for that prompt
    mine = {(r["method"], r["alpha"], r["prompt_index"]): r for r in responses(out)}
    theirs = {(r["method"], r["alpha"], r["prompt_index"]): r
              for r in responses(tmp_path / "whole")}
    assert {key[2] for key in mine} == set(kept) and len(mine) == 3 * 5
    for key, r in mine.items():
        assert (r["response"], r["reward"], r["prompt"]) == \
            (theirs[key]["response"], theirs[key]["reward"], theirs[key]["prompt"]), key
    assert len(whole["results"]) == 4
    # --tune-seed draws the same prompts while --seed moves the samples
    other = evaluation.evaluate(**{**options, "seed": 6}, out=str(tmp_path / "seed6"),
                                tune_holdout=3, tune_seed=5)
    assert other["prompt_numbers"] == kept
    assert other["selection"]["on"] == "held out of --prompts (drawn with seed 5)"
    assert fake_engines["seed"] == 6  # the samples' seed
    assert hold_out(8, 3, seed=6).tuning != tuning  # without it, seed 6 holds out others


def test_the_diversity_floor_keeps_a_reward_hacking_point_from_being_chosen(
        tmp_path, fake_engines, head):
    """alpha 3 repeats one positive word (reward 1, diversity near 0): chosen without a
    floor, passed over with --tune-min-diversity 0.5; a floor no point keeps stops eval
    before the evaluated prompts run, naming every point's diversity."""
    prompts = write_prompts(tmp_path / "p.jsonl", [f"strong question {i}" for i in range(8)])
    options = dict(model="m", value_head=head, prompts=prompts, reward_fn=REWARD,
                   grid="1:2,3:2", best_of=[], system_prompt="", quiet=True, tune_holdout=4)
    free = evaluation.evaluate(**options, out=str(tmp_path / "free"))
    assert free["selection"]["chosen"]["alpha"] == 3.0
    floored = evaluation.evaluate(**options, out=str(tmp_path / "floor"), tune_min_diversity=0.5)
    assert floored["selection"]["chosen"]["alpha"] == 1.0
    assert [g["eligible"] for g in floored["selection"]["grid"]] == [True, False]
    assert "among points keeping diversity >= 0.5 x base's" in floored["selection"]["rule"]
    fake_engines["runs"].clear()
    with pytest.raises(RecontrolError, match=r"no grid point kept diversity >= 5 x base's"):
        evaluation.evaluate(**options, out=str(tmp_path / "none"), tune_min_diversity=5)
    assert len(fake_engines["runs"]) == 3  # base and the grid on the tuning prompts only
    # in a folder with a run that chose a point, the grid's table is written again, saying
    # that none was chosen this time
    with pytest.raises(RecontrolError, match=r"no grid point kept diversity >= 5 x base's"):
        evaluation.evaluate(**options, out=str(tmp_path / "floor"), tune_min_diversity=5)
    table = (tmp_path / "floor" / "tune" / "eval.md").read_text()
    assert "No point chosen: no grid point kept diversity >= 5" in table
    assert "Chosen here" not in table and "| re-control * | 3 | 2 |" in table
    # ... and the earlier run's report of the evaluated prompts is gone (it would read as
    # this run's result); its kept methods stay
    left = sorted(p.name for p in (tmp_path / "floor").iterdir() if p.name[0] != ".")
    assert left == ["methods", "tune"], left


@pytest.mark.parametrize("extra, message", [
    ({"tune_holdout": 2, "tune_prompts": "t.jsonl"}, "give --tune-prompts or --tune-holdout"),
    ({"tune_split": "validation"}, "--tune-split and --max-tune-prompts are for"),
    ({"max_tune_prompts": 3}, "--tune-split and --max-tune-prompts are for"),
    ({"tune_min_diversity": 0.9}, "--tune-min-diversity is a rule for choosing"),
    ({"tune_holdout": 2, "tune_min_diversity": 0}, "tune_min_diversity must be a finite"),
    ({"tune_holdout": 2, "tune_min_diversity": math.inf}, "tune_min_diversity must be"),
    ({"tune_holdout": -1}, "tune_holdout must be a whole number"),
    ({"tune_holdout": 1.5}, "tune_holdout must be an integer"),
    ({"tune_holdout": 9}, "holds out every one of the 8 prompts"),
    ({"tune_prompts": " "}, "--tune-prompts is empty"),
    ({"tune_seed": 3}, "--tune-seed draws the --tune-holdout prompts: give --tune-holdout"),
    ({"tune_seed": 3, "tune_prompts": "t.jsonl"}, "--tune-seed draws the --tune-holdout"),
    ({"tune_holdout": 2, "tune_seed": "3"}, "option tune_seed must be an integer, got '3'"),
    ({"tune_prompts": "t.jsonl", "max_tune_prompts": 0},
     r"--max-tune-prompts must be a positive integer, got 0"),
    ({"tune_prompts": "/nowhere/t.jsonl"},
     r"^--tune-prompts: prompt file /nowhere/t\.jsonl does not exist"),
    ({"tune_holdout": 2, "grid": "1:2"}, "tuning chooses a point of the grid, and the grid "
                                         "has one"),
])
def test_tuning_options_that_do_not_fit_are_refused_before_any_engine(
        tmp_path, fake_engines, head, extra, message):
    prompts = write_prompts(tmp_path / "p.jsonl", [f"q{i}" for i in range(8)])
    options = dict(model="m", value_head=head, prompts=prompts, reward_fn=REWARD,
                   grid="1:2,2:2", quiet=True, out=str(tmp_path / "out"))
    with pytest.raises(RecontrolError, match=message):
        evaluation.evaluate(**{**options, **extra})
    assert fake_engines["started"] == 0


def test_a_reward_error_names_the_method_it_was_scoring(tmp_path, fake_engines, head):
    """The reward's error named a row and its text, not which method's answers they were."""
    import sys
    import types

    def picky(prompt: str, response: str) -> float:
        if response.count(POSITIVE[0]) > 3:  # alpha 3's answer: one word, over and over
            raise ValueError("no such mood")
        return 0.5

    module = types.ModuleType("recontrol_test_picky_reward")
    module.picky = picky
    sys.modules[module.__name__] = module
    prompts = write_prompts(tmp_path / "p.jsonl", [f"q{i}" for i in range(3)])
    with pytest.raises(RecontrolError, match=r"^scoring re-control \(alpha 3, 2 steps\): reward "
                       r"function recontrol_test_picky_reward:picky raised ValueError: no such "
                       r"mood on row 0"):
        evaluation.evaluate(model="m", value_head=head, prompts=prompts, grid="1:2,3:2",
                            reward_fn="recontrol_test_picky_reward:picky", best_of=[],
                            system_prompt="", quiet=True, out=str(tmp_path / "out"))


def test_a_one_point_grid_is_tuned_only_as_a_check_of_its_diversity(tmp_path, fake_engines,
                                                                  head):
    prompts = write_prompts(tmp_path / "p.jsonl", [f"q{i}" for i in range(8)])
    report = evaluation.evaluate(model="m", value_head=head, prompts=prompts, reward_fn=REWARD,
                                 grid="1:2", best_of=[], system_prompt="", quiet=True,
                                 out=str(tmp_path / "out"), tune_holdout=2,
                                 tune_min_diversity=0.5)
    assert report["selection"]["chosen"]["alpha"] == 1.0 and report["num_prompts"] == 6


def test_a_tuning_file_with_a_split_is_refused_and_overlap_is_reported(
        tmp_path, fake_engines, head, caplog):
    prompts = write_prompts(tmp_path / "p.jsonl", [f"plain question {i}" for i in range(4)])
    tuning = write_prompts(tmp_path / "t.jsonl", ["plain question 1", "strong question 9"])
    options = dict(model="m", value_head=head, prompts=prompts, reward_fn=REWARD,
                   grid="1:2,2:2", best_of=[], system_prompt="", quiet=True,
                   tune_prompts=tuning)
    with pytest.raises(RecontrolError, match="is a file: it has no splits"):
        evaluation.evaluate(**options, tune_split="validation", out=str(tmp_path / "a"))
    report = evaluation.evaluate(**options, out=str(tmp_path / "b"))
    assert report["selection"]["also_evaluated"] == 1
    assert "1 of the 2 tuning prompts are also evaluation prompts" in caplog.text
    assert "(WARNING: 1 of them are also evaluation prompts)" in \
        (tmp_path / "b" / "eval.md").read_text()


def test_engine_seeds_and_messages_follow_the_prompts_origins(monkeypatch):
    """A prompt numbered i in its source is sampled with seed + n i, whichever position it
    has among the engine's prompts; a refused one is named by its source and number; the
    tuning part's prompts are not checked with the system prompt (no prompting rows run
    there)."""
    from types import SimpleNamespace

    import vllm

    from vllm_recontrol.evaluation.engines import (PROMPT_SET, EnginePool, EngineSettings,
                                                   Method, PromptOrigin, PromptPart)
    from vllm_recontrol.training.common import DataError

    asked = []

    class SeedLLM:  # one token per word, max_model_len 6; records each request's seed
        def __init__(self, **kwargs) -> None:
            self.model_config = SimpleNamespace(max_model_len=6)
            self.llm_engine = SimpleNamespace(engine_core=SimpleNamespace(shutdown=lambda: None))

        def get_tokenizer(self):
            return lambda text: {"input_ids": text.split()}

        def generate(self, inputs, params, use_tqdm=False):
            asked.extend((text, p.seed) for text, p in zip(inputs, params))
            return []

    monkeypatch.setattr(vllm, "LLM", SeedLLM)
    settings = EngineSettings(model="m", value_head="h", value_heads={}, max_steps=30,
                              engine_args={}, seed=100, max_tokens=8, temperature=0.0,
                              bon_temperature=1.0, system_prompt="be very kind now",
                              chat_template=False)
    prompts = ["a", "b", "c", "long tuning prompt here"]
    origins = [PromptOrigin(PROMPT_SET, 0), PromptOrigin(PROMPT_SET, 3),
               PromptOrigin(PROMPT_SET, 7), PromptOrigin("the tuning prompts", 1)]
    opts = SimpleNamespace(ray=False, progress=False, quiet=True)
    pool = EnginePool(opts, settings, prompts, origins,
                      [PromptPart(0, 3), PromptPart(3, 4, prompting=False)])
    pool.run(Method(n=2), PromptPart(0, 3))
    assert asked[-3:] == [("a", 100), ("b", 106), ("c", 114)]
    asked.clear()
    pool.run(Method(), PromptPart(3, 4))
    assert asked[-1] == ("long tuning prompt here", 101)
    with pytest.raises(DataError, match=r"^prompt 1 of the tuning prompts \(counted from 0\) "
                                        r"has 8 tokens with the system prompt"):
        EnginePool(opts, settings, prompts, origins, [PromptPart(0, 3), PromptPart(3, 4)])


def test_ray_engines_split_each_part_between_them(monkeypatch):
    """On Ray every actor holds every prompt; a part's prompts go out in one contiguous
    range per actor (its warm-up too), and the part is checked with its own prompting."""
    ray = pytest.importorskip("ray")
    from types import SimpleNamespace

    from vllm_recontrol.evaluation.engines import EnginePool, Method, PromptPart

    calls = []
    prompts = [f"p{i}" for i in range(12)]

    class Actor:
        def __init__(self, name: str) -> None:
            def generate(method, lo, hi, progress=False, tokens=None):
                calls.append((name, lo, hi, tokens))
                return [[(prompts[i], 1)] for i in range(lo, hi)]

            def check(lo, hi, prompting):
                calls.append((name, "check", lo, hi, prompting))

            self.generate = SimpleNamespace(remote=generate)
            self.check_prompts = SimpleNamespace(remote=check)

    monkeypatch.setattr(ray, "get", lambda refs: refs)
    pool = EnginePool.__new__(EnginePool)
    pool.local, pool.actors, pool.count = None, [Actor("a"), Actor("b")], len(prompts)
    pool.progress, pool._warmed_parts = False, set()
    tuning = PromptPart(5, 12, prompting=False)
    pool._check_prompts(tuning)
    assert calls == [("a", "check", 5, 9, False), ("b", "check", 9, 12, False)]
    calls.clear()
    samples, _ = pool.run(Method(), tuning)
    assert [s[0][0] for s in samples] == prompts[5:12]
    assert calls == [("a", 5, 9, 16), ("b", 9, 12, 16),   # the part's first batch, short
                     ("a", 5, 6, None), ("b", 9, 10, None),  # this method's own path
                     ("a", 5, 9, None), ("b", 9, 12, None)]  # timed
    calls.clear()
    pool.run(Method(), tuning)
    assert len(calls) == 4  # warmed already: one prompt per actor, then the timed run


def test_a_held_out_prompt_is_put_to_the_judge_as_in_an_untuned_run(tmp_path, fake_engines,
                                                                    head):
    """The judge's order coin follows the prompt's number in --prompts, not its place among
    the evaluated ones: a tuned run asks no question an untuned run over the same prompts
    asked (all read back from judge-answers.jsonl), and a judge that always prefers the
    answer shown first gives every prompt the same verdict in both; references stay with
    their prompts."""
    import re

    from fake_judge import fake_judge

    texts = [f"{'strong' if i % 2 else 'plain'} question {i}" for i in range(10)]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t, "ref": f"reference {i}"}) + "\n"
                               for i, t in enumerate(texts)))
    misplaced = []

    def first_wins(prompt: str, first: str, second: str) -> str:
        number = re.search(r"question (\d+)", prompt).group(1)
        misplaced.extend(a for a in (first, second)
                         if a.startswith("reference") and a != f"reference {number}")
        return "9 1\nthe first"

    options = dict(model="m", value_head=head, prompts=str(prompts), reward_fn=REWARD,
                   best_of=[], system_prompt="", quiet=True, grid="1:2,2:2", seed=1,
                   judge_model="judge")
    with fake_judge(first_wins) as server:
        untuned = evaluation.evaluate(**options, out=str(tmp_path / "j"), judge_url=server["url"])
        asked = len(server["asked"])
        tuned = evaluation.evaluate(**options, out=str(tmp_path / "j"), judge_url=server["url"],
                                    tune_holdout=4)
        assert len(server["asked"]) == asked
        evaluation.evaluate(**options, out=str(tmp_path / "r"), judge_url=server["url"],
                            judge_against="reference", reference_column="ref", tune_holdout=4)
    assert misplaced == []
    alpha = tuned["selection"]["chosen"]["alpha"]

    def verdicts(report: dict) -> dict:
        row = next(r for r in report["results"] if r["method"] == "re-control"
                   and r["alpha"] == alpha)
        numbers = report.get("prompt_numbers", list(range(report["num_prompts"])))
        return dict(zip(numbers, (v["outcome"] for v in row["judge"]["verdicts"])))

    mine, theirs = verdicts(tuned), verdicts(untuned)
    assert len(mine) == 6 and mine == {n: theirs[n] for n in mine}
    assert tuned["results"][1]["judge"]["read_back"] == 6
