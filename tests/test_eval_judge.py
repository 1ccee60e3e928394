"""The LLM-judge win rate of ``eval`` against a stand-in OpenAI-compatible judge server."""

from __future__ import annotations

import json
import math
import threading

import pytest

from fake_judge import fake_judge
from vllm_recontrol.evaluation import llm_judge
from vllm_recontrol.evaluation.llm_judge import (JudgeAnswers, JudgeClient, JudgeSettings,
                                                 judge_methods, method_goes_first,
                                                 parse_scores)
from vllm_recontrol.training.common import DataError, RecontrolError
from vllm_recontrol.training.prompts import load_prompts, load_references

PROMPTS = [f"question {i}" for i in range(12)]
BASE = [" ".join(["good"] * (i % 4)) for i in range(12)]
METHOD = [" ".join(["good"] * ((i * 5) % 7)) for i in range(12)]


def goods(text: str) -> int:
    return text.split().count("good")


def content_rule(prompt: str, first: str, second: str) -> str:
    """An order-blind judge: more "good" words, higher score (scores in the order shown)."""
    return f"{goods(first)} {goods(second)}\nbecause"


def expected_rate(mine, theirs) -> float:
    outcomes = [1.0 if goods(a) > goods(b) else 0.5 if goods(a) == goods(b) else 0.0
                for a, b in zip(mine, theirs)]
    return sum(outcomes) / len(outcomes)


def client_for(server: dict, **settings) -> JudgeClient:
    return JudgeClient(JudgeSettings(url=server["url"], model="judge", **settings))


@pytest.mark.parametrize("answer,scores", [
    ("8 6", (8.0, 6.0)), ("\n  7.5, 3\nthe first is better", (7.5, 3.0)),
    ("**Scores:** 9 and 2", (9.0, 2.0)), ("10 0.", (10.0, 0.0)),
    ("8/10", None), ("Assistant 1 is better", None), ("11 2", None), ("8", None), ("", None),
    ("The scores are 8 and 6 because", None), ("Score 8 6", (8.0, 6.0)),
    # a label ending in the answer's index: the index is not a score
    ("Assistant 1 8\nAssistant 2 6", None), ("Score for Assistant 1 9", None),
    ("Answer 1 7", None), ("Assistant 2 5", None),
    ("Assistant 1: 8, Assistant 2: 6", (8.0, 6.0)), ("**Assistant 1:** 3 **Assistant 2:** 9",
                                                     (3.0, 9.0)),
    ("Assistant 2: 8, Assistant 1: 6", None), ("Response 1 9", None),
    ("Responses 1 and 2", None), ("Evaluation of Assistants 1 and 2", None),
    ("**Comparison of Answers 1 and 2**\n8 6", None), ("Assistant number 1 8", None),
    ("Assistant scores: 8 6", (8.0, 6.0)),
    # word labels without a colon are still read
    ("The scores are 8 and 6.", (8.0, 6.0)), ("Final scores 8 6", (8.0, 6.0)),
    ("I give 8 and 6", (8.0, 6.0)), ("Model: 8 6", (8.0, 6.0)),
])
def test_scores_are_read_from_the_first_line_only(answer, scores):
    assert parse_scores(answer) == scores


@pytest.mark.parametrize("both_orders", [False, True])
def test_win_rate_follows_the_judges_scores_whatever_the_order(both_orders):
    """An order-blind judge: the rate is the share of prompts whose answer has more "good"
    words (ties half), in either order mode; the judge saw the answers in the order the
    verdicts record, and a single-order run puts the method first on some prompts only."""
    with fake_judge(content_rule) as server:
        client = client_for(server, both_orders=both_orders, concurrency=4)
        summary = judge_methods(client, PROMPTS, {"m": METHOD}, BASE)["m"]
    assert summary.win_rate == pytest.approx(expected_rate(METHOD, BASE))
    assert summary.count("invalid") == 0
    assert len(server["asked"]) == len(PROMPTS) * (2 if both_orders else 1)
    for i, verdict in enumerate(summary.verdicts):
        for mine_first in verdict.method_first:
            shown = (METHOD[i], BASE[i]) if mine_first else (BASE[i], METHOD[i])
            assert (PROMPTS[i], *shown) in server["asked"]
    firsts = [v.method_first[0] for v in summary.verdicts]
    if both_orders:
        assert all(v.method_first == [True, False] for v in summary.verdicts)
    else:
        assert firsts == [method_goes_first(0, "m", i) for i in range(len(PROMPTS))]
        assert any(firsts) and not all(firsts)


def test_both_orders_cancel_a_judge_that_prefers_the_first_answer():
    """A judge that always prefers Assistant 1: asked once per pair, the method 'wins' the
    prompts on which it went first; asked both ways, every pair is a tie."""
    def first_wins(prompt, first, second):
        return "9 1"

    with fake_judge(first_wins) as server:
        once = judge_methods(client_for(server), PROMPTS, {"m": METHOD}, BASE)["m"]
        both = judge_methods(client_for(server, both_orders=True), PROMPTS, {"m": METHOD},
                             BASE)["m"]
    firsts = [method_goes_first(0, "m", i) for i in range(len(PROMPTS))]
    assert once.win_rate == pytest.approx(sum(firsts) / len(firsts))
    assert both.win_rate == 0.5 and both.count("tie") == len(PROMPTS)


def test_unreadable_and_refused_verdicts_are_counted_and_left_out():
    """Prompts 0-2 get prose without scores, prompt 3 an HTTP 400, prompt 4 a reply without
    choices: five invalid verdicts, kept with what the judge said, and the rate is over the
    other seven prompts."""
    def flaky(prompt, first, second):
        index = int(prompt.split()[1])
        if index < 3:
            return "Both answers are fine."
        if index == 3:
            return 400
        if index == 4:
            return {"id": "c", "object": "chat.completion", "created": 0, "model": "judge",
                    "choices": []}
        return content_rule(prompt, first, second)

    with fake_judge(flaky) as server:
        summary = judge_methods(client_for(server), PROMPTS, {"m": METHOD}, BASE)["m"]
    assert summary.count("invalid") == 5
    assert [v.outcome for v in summary.verdicts[:5]] == ["invalid"] * 5
    assert summary.verdicts[0].first_lines == ["Both answers are fine."]
    assert summary.verdicts[3].first_lines[0].startswith("error: BadRequestError")
    assert summary.verdicts[4].first_lines[0].startswith("error: IndexError")
    assert summary.win_rate == pytest.approx(expected_rate(METHOD[5:], BASE[5:]))
    assert summary.as_dict()["invalid"] == 5


def test_a_judge_that_never_answers_gives_no_rate():
    with fake_judge(lambda *asked: "no idea") as server:
        summary = judge_methods(client_for(server), PROMPTS[:3], {"m": METHOD[:3]}, BASE[:3])
    assert math.isnan(summary["m"].win_rate) and summary["m"].count("invalid") == 3


def test_judge_check_names_what_is_wrong(monkeypatch):
    """Checked before any generation: an unreachable endpoint, a model the endpoint does
    not serve, a refused key (read from the named environment variable, sent as bearer)."""
    with fake_judge(content_rule, model="judge-7b", api_key="secret") as server:
        url = server["url"]
        monkeypatch.setenv("MY_JUDGE_KEY", "secret")
        JudgeClient(JudgeSettings(url=url, model="judge-7b", api_key_env="MY_JUDGE_KEY")).check()
        with pytest.raises(RecontrolError, match=r"does not serve 'gpt-4'; it serves "
                           r"\['judge-7b'\]"):
            JudgeClient(JudgeSettings(url=url, model="gpt-4", api_key_env="MY_JUDGE_KEY")).check()
        monkeypatch.delenv("MY_JUDGE_KEY")
        with pytest.raises(RecontrolError, match=r"refused the API key \(read from "
                           r"\$MY_JUDGE_KEY"):
            JudgeClient(JudgeSettings(url=url, model="judge-7b", api_key_env="MY_JUDGE_KEY")).check()
    with pytest.raises(RecontrolError, match="cannot be reached"):
        JudgeClient(JudgeSettings(url=url, model="judge-7b")).check()


def test_a_url_without_v1_is_refused_and_an_endpoint_without_a_model_list_is_asked():
    """A 404 for the model list: one short question decides. A URL missing its /v1 gets 404
    for that too (every verdict would have been invalid); an endpoint that only lacks the
    list answers it."""
    with fake_judge(content_rule) as server:
        with pytest.raises(RecontrolError, match=r"answers neither the model list nor a chat "
                                                 r"completion for 'judge' .* end in /v1"):
            JudgeClient(JudgeSettings(url=server["url"][:-len("/v1")], model="judge")).check()
    with fake_judge(content_rule, lists_models=False) as server:
        client_for(server).check()
        assert len(server["asked"]) == 1  # the one short question


def test_a_failing_judge_is_not_waited_for_after_max_failures_in_a_row():
    with fake_judge(lambda *asked: 500) as server:
        client = client_for(server, concurrency=1, max_retries=0, max_failures=3, outage_s=0)
        summary = judge_methods(client, PROMPTS, {"m": METHOD}, BASE)["m"]
        assert len(server["asked"]) == 3  # then the rest were skipped, not sent
    assert summary.count("invalid") == len(PROMPTS)
    assert summary.verdicts[2].first_lines[0].startswith("error: InternalServerError")
    assert summary.verdicts[3].first_lines == ["error: skipped after 3 failed judge requests "
                                               "in a row and 0 s without an answer"]
    with pytest.raises(RecontrolError, match="judge timeout must be a number of seconds > 0"):
        JudgeClient(JudgeSettings(url="http://x/v1", model="j", timeout_s=0.0))


def fails_first(count: int):
    """A judge rule that answers HTTP 500 to its first ``count`` requests, then as
    ``content_rule`` (a restarting server, a burst of rate limits)."""
    seen, lock = [0], threading.Lock()

    def rule(prompt, first, second):
        with lock:
            seen[0] += 1
            failing = seen[0] <= count
        return 500 if failing else content_rule(prompt, first, second)
    return rule


@pytest.mark.parametrize("concurrency", [1, 3])
def test_a_paused_judge_is_probed_and_resumes_when_it_answers(monkeypatch, concurrency):
    """Five failures with max_failures 3: paused, probed (one request at a time) until it
    answers, then every remaining question is asked; only the failed requests are invalid.
    (It used to skip every question after the third failure.)"""
    monkeypatch.setattr(llm_judge, "PROBE_COOLDOWN_S", (0.01, 0.02))
    with fake_judge(fails_first(5)) as server:
        client = client_for(server, concurrency=concurrency, max_retries=0, max_failures=3,
                            outage_s=60)
        summary = judge_methods(client, PROMPTS, {"m": METHOD}, BASE)["m"]
        assert len(server["asked"]) == len(PROMPTS)  # every question sent once
    assert summary.count("invalid") == 5
    valid = [v for v in summary.verdicts if v.outcome != "invalid"]
    assert all(not v.first_lines[0].startswith("error") for v in valid)


def test_a_paused_judge_that_never_answers_is_given_up_after_the_outage(monkeypatch):
    monkeypatch.setattr(llm_judge, "PROBE_COOLDOWN_S", (0.05, 0.1))  # a few probes in 0.2 s
    with fake_judge(lambda *asked: 500) as server:
        client = client_for(server, concurrency=2, max_retries=0, max_failures=2,
                            outage_s=0.2)
        summary = judge_methods(client, PROMPTS, {"m": METHOD}, BASE)["m"]
        probes = len(server["asked"])
    assert summary.count("invalid") == len(PROMPTS)
    assert 2 < probes < len(PROMPTS)  # probed during the outage, the rest skipped
    assert summary.verdicts[-1].first_lines == ["error: skipped after 2 failed judge "
                                                "requests in a row and 0.2 s without an answer"]


def test_a_run_stopped_while_the_judge_is_paused_does_not_wait_out_the_outage(monkeypatch):
    """Ctrl-C while questions wait on a paused judge returns at once: nothing more is asked,
    not after the 30 s cooldown or the 60 s outage (SIGINT sent to this process after 1 s)."""
    import os
    import signal
    import time

    monkeypatch.setattr(llm_judge, "PROBE_COOLDOWN_S", (30.0, 30.0))
    with fake_judge(lambda *asked: 500) as server:
        client = client_for(server, concurrency=2, max_retries=0, max_failures=2, outage_s=60)
        timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
        started = time.monotonic()
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            judge_methods(client, PROMPTS, {"m": METHOD}, BASE)
        took = time.monotonic() - started
        asked = len(server["asked"])
    # the failures that paused it, and a request that got in while the second was failing
    assert asked in (2, 3) and client.cancelled
    assert took < 30


def test_a_success_resets_the_count_of_failures_in_a_row():
    def every_other(prompt, first, second):
        return 500 if int(prompt.split()[1]) % 2 else content_rule(prompt, first, second)

    with fake_judge(every_other) as server:
        client = client_for(server, concurrency=1, max_retries=0, max_failures=2)
        summary = judge_methods(client, PROMPTS, {"m": METHOD}, BASE)["m"]
        assert len(server["asked"]) == len(PROMPTS)
    assert summary.count("invalid") == len(PROMPTS) // 2


@pytest.mark.parametrize("options,message", [
    ({"judge_against": "reference"}, "judge_against reference needs judge_url"),
    ({"judge_url": "http://x/v1"}, "--judge-url needs --judge-model"),
    ({"judge_model": "gpt-4"}, "judge_model needs judge_url"),
    ({"judge_against": "chosen"}, "judge_against must be one of"),
    ({"reference_column": "answer"}, "only used with judge_against reference"),
    ({"judge_url": "http://127.0.0.1:9/v1", "judge_model": "j"}, "cannot be reached"),
])
def test_eval_refuses_a_bad_judge_before_loading_anything_else(tmp_path, options, message):
    from vllm_recontrol.evaluation.evaluate import evaluate

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello"}) + "\n")
    with pytest.raises(RecontrolError, match=message):
        evaluate(model="org/no-model", value_head=str(tmp_path / "no-head"),
                 prompts=str(prompts), reward_fn="vllm_recontrol.toy_world:positive_share",
                 out=str(tmp_path / "e"), **options)


def test_references_are_the_final_replies_of_the_chosen_dialogues(tmp_path):
    rows = [{"chosen": f"\n\nHuman: q{i}\n\nAssistant: a{i}\n\nHuman: more?\n\nAssistant:"
                       f" final {i} ", "rejected": "x"} for i in range(5)]
    data = tmp_path / "hh.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = load_prompts(str(data), max_prompts=3)
    references = load_references(str(data), max_prompts=3)
    assert references == ["final 0", "final 1", "final 2"]
    assert prompts[2].endswith("more?\n\nAssistant:")
    assert load_references(str(data), reference_column="rejected") == ["x"] * 5


def test_references_need_a_column_when_the_prompts_hold_no_answers(tmp_path):
    data = tmp_path / "plain.jsonl"
    data.write_text(json.dumps({"prompt": "p", "answer": 3}) + "\n")
    with pytest.raises(DataError, match="holds no answers.*--reference-column"):
        load_references(str(data))
    with pytest.raises(DataError, match="line 1 column 'answer' is int"):
        load_references(str(data), reference_column="answer")


def test_eval_judges_methods_against_base_or_against_the_references():
    """Against base every other method is judged and base is not; against references every
    method is, base included; the table gets the judge's column, invalid verdicts named.
    Against base, the judge's agreement with the reward: a judge that ranks as the reward
    does agrees on every judged prompt, a contrary one only where both see a tie."""
    from vllm_recontrol.evaluation.evaluate import judge_results
    from vllm_recontrol.evaluation.methods import MethodResult
    from vllm_recontrol.evaluation.report import markdown_table
    from vllm_recontrol.evaluation.metrics import Coherence

    references = ["good good good"] * len(PROMPTS)

    def results():
        made = [MethodResult("base", rewards=[float(goods(b)) for b in BASE], seconds=1.0,
                             delivered_tokens=1),
                MethodResult("re-control", alpha=1.0, steps=30, seconds=1.0,
                             rewards=[float(goods(m)) for m in METHOD], delivered_tokens=1)]
        made[0].responses, made[1].responses = list(BASE), list(METHOD)
        for r in made:
            r.reward = r.win_rate = r.diversity = 0.0
        return made

    def rule(prompt, first, second):
        return "unsure" if prompt == PROMPTS[0] else content_rule(prompt, first, second)

    def contrary(prompt, first, second):
        return f"{goods(second)} {goods(first)}"

    with fake_judge(rule) as server:
        against_base, against_refs = results(), results()
        judge_results(client_for(server), PROMPTS, against_base, None)
        judge_results(client_for(server), PROMPTS, against_refs, references)
    with fake_judge(contrary) as server:
        contrarian = results()
        judge_results(client_for(server), PROMPTS, contrarian, None)
    assert against_base[0].judge is None
    assert against_base[1].judge["agrees_with_reward"] == 1.0
    ties = sum(goods(m) == goods(b) for m, b in zip(METHOD, BASE)) / len(PROMPTS)
    assert 0 < ties < 1 and contrarian[1].judge["agrees_with_reward"] == pytest.approx(ties)
    assert "agrees_with_reward" not in against_refs[1].judge
    assert against_base[1].judge["win_rate"] == pytest.approx(expected_rate(METHOD[1:],
                                                                            BASE[1:]))
    for r, answers in zip(against_refs, (BASE, METHOD)):
        assert r.judge["win_rate"] == pytest.approx(expected_rate(answers[1:], references[1:]))
    coherence = Coherence(None, None, "none")
    table = markdown_table(against_base, coherence)
    assert "| judge win vs. base |" in table.splitlines()[0]
    rate = against_base[1].judge["win_rate"]
    assert "| 0.000 | n/a | 0.000 |" in table
    assert f"| {rate:.3f} (1 invalid, agrees 1.00) |" in table
    assert "| judge win vs. reference |" in markdown_table(against_refs, coherence, "reference")
    assert "judge" not in markdown_table(results(), coherence)


def canned_evaluator(evaluation):
    """An Evaluator stand-in: base's and a method's answers as generated and scored,
    without engines."""
    class Canned:
        def __init__(self, opts, prompts, score, coherence, finished=None, **_) -> None:
            pass

        def methods(self):
            made = [evaluation.MethodResult("base", seconds=1.0, delivered_tokens=1),
                    evaluation.MethodResult("re-control", alpha=1.0, steps=30, seconds=1.0,
                                            delivered_tokens=1)]
            for r, answers in zip(made, (BASE, METHOD)):
                r.responses, r.rewards = list(answers), [float(goods(a)) for a in answers]
                r.reward = r.win_rate = r.diversity = 0.0
            return made

        def close(self, failing: bool = False) -> None:
            pass
    return Canned


def test_eval_writes_its_report_before_asking_the_judge(tmp_path, monkeypatch):
    """Judging can take hours at scale: a run stopped while judging (here interrupted) has
    already written eval.json, eval.md and the responses, without verdicts; a finished run
    rewrites them with the verdicts."""
    import importlib

    evaluation = importlib.import_module("vllm_recontrol.evaluation.evaluate")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))

    Canned = canned_evaluator(evaluation)

    seen = []

    def interrupted(*args) -> None:
        seen.append(json.loads((tmp_path / "out" / "eval.json").read_text()))
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "Evaluator", Canned)
    options = dict(model="org/model", value_head=str(tmp_path / "head"), prompts=str(prompts),
                   reward_fn="vllm_recontrol.toy_world:positive_share", quiet=True,
                   out=str(tmp_path / "out"), judge_model="judge")
    with fake_judge(content_rule) as server:
        with monkeypatch.context() as patched:
            patched.setattr(evaluation, "judge_results", interrupted)
            with pytest.raises(KeyboardInterrupt):
                evaluation.evaluate(judge_url=server["url"], **options)
        assert seen and seen[0]["judge_prompt"] is None
        assert [r["judge"] for r in seen[0]["results"]] == [None, None]
        lines = (tmp_path / "out" / "responses.jsonl").read_text().splitlines()
        assert len(lines) == 2 * len(PROMPTS) and (tmp_path / "out" / "eval.md").exists()
        report = evaluation.evaluate(judge_url=server["url"], **options)
    written = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert written["judge_prompt"] and written["results"][1]["judge"]["win_rate"] == \
        pytest.approx(expected_rate(METHOD, BASE))
    assert report["results"][1]["judge"] == written["results"][1]["judge"]


# ----------------------------------------------------------------- answers kept on disk

OTHER = [" ".join(["good"] * ((i * 3) % 5) + ["ok"]) for i in range(12)]  # no text alike


def answers_first(count: int):
    """A judge rule that answers its first ``count`` requests as ``content_rule``, then HTTP
    500 to every one (a judge that dies part-way)."""
    seen, lock = [0], threading.Lock()

    def rule(prompt, first, second):
        with lock:
            seen[0] += 1
            answering = seen[0] <= count
        return content_rule(prompt, first, second) if answering else 500
    return rule


def switchable(rule):
    """A fake judge's rule that a test can swap between runs on one server (its URL is part
    of what the answers are kept under)."""
    current = {"rule": rule}
    return current, lambda *question: current["rule"](*question)


def kept_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_rerun_asks_the_judge_only_what_a_stopped_run_did_not_get(tmp_path):
    """A judge that dies after 5 answers (one at a time, the sixth request fails, the rest
    are skipped): the 5 answers are on disk, the failed request is not. The rerun asks
    exactly the 19 other questions, the failed one included, and its verdicts are those of
    one uninterrupted run."""
    path = tmp_path / "judge-answers.jsonl"
    methods = {"m": METHOD, "o": OTHER}
    current, rule = switchable(answers_first(5))
    with fake_judge(rule) as server:
        with JudgeAnswers(path) as answers:
            stopped = judge_methods(client_for(server, concurrency=1, max_retries=0,
                                               max_failures=1, outage_s=0),
                                    PROMPTS, methods, BASE, answers)
        first_run = list(server["asked"])
        assert len(first_run) == 6  # 5 answered, 1 failed, 18 skipped
        assert sum(s.count("invalid") for s in stopped.values()) == 19
        assert len(kept_lines(path)) == 5  # the failed request is not kept

        current["rule"] = content_rule
        server["asked"].clear()
        with JudgeAnswers(path) as answers:
            rerun = judge_methods(client_for(server, concurrency=3), PROMPTS, methods, BASE,
                                  answers)
        rerun_asked = list(server["asked"])
        server["asked"].clear()
        whole = judge_methods(client_for(server), PROMPTS, methods, BASE)  # nothing kept
        every = list(server["asked"])
    assert len(every) == 24 and len(set(every)) == 24
    assert sorted(rerun_asked) == sorted(set(every) - set(first_run[:5]))
    assert first_run[5] in rerun_asked  # the failed one is asked again
    assert rerun["m"].read_back + rerun["o"].read_back == 5
    assert rerun["m"].as_dict()["read_back"] == rerun["m"].read_back
    for name, answers_of in methods.items():
        assert [vars(v) for v in rerun[name].verdicts] == \
            [vars(v) for v in whole[name].verdicts]
        assert rerun[name].win_rate == pytest.approx(expected_rate(answers_of, BASE))
        assert rerun[name].count("invalid") == 0
    assert len(kept_lines(path)) == 24


def test_a_changed_judge_setting_or_answer_text_is_asked_again(tmp_path):
    """Answers are kept under the judge's model and URL, the settings sent and the texts:
    the same questions are all read back; a changed answer text asks that one question; a
    changed model, max_tokens or endpoint asks them all."""
    path = tmp_path / "judge-answers.jsonl"

    def run(server, method=METHOD, **settings):
        server["asked"].clear()
        with JudgeAnswers(path) as answers:
            summary = judge_methods(JudgeClient(JudgeSettings(
                url=server["url"], **{"model": "judge", **settings})), PROMPTS,
                {"m": method}, BASE, answers)["m"]
        return summary, list(server["asked"])

    with fake_judge(content_rule) as server:
        first, asked = run(server)
        assert len(asked) == 12 and first.read_back == 0
        again, asked = run(server)
        assert asked == [] and again.read_back == 12
        assert [vars(v) for v in again.verdicts] == [vars(v) for v in first.verdicts]
        changed = list(METHOD)
        changed[4] += " good good"
        edited, asked = run(server, changed)
        shown = (changed[4], BASE[4]) if method_goes_first(0, "m", 4) else (BASE[4], changed[4])
        assert asked == [(PROMPTS[4], *shown)] and edited.read_back == 11
        assert edited.verdicts[4].margin == goods(changed[4]) - goods(BASE[4])
        for settings in ({"model": "judge-2"}, {"max_tokens": 65}):
            other, asked = run(server, **settings)
            assert len(asked) == 12 and other.read_back == 0, settings
    with fake_judge(content_rule) as elsewhere:
        moved, asked = run(elsewhere)
        assert len(asked) == 12 and moved.read_back == 0


def test_a_truncated_last_line_is_skipped_with_one_warning(tmp_path, caplog):
    """A run killed while writing leaves half a line: it is skipped (its question asked
    again), said once, and the file is usable afterwards."""
    path = tmp_path / "judge-answers.jsonl"
    with fake_judge(content_rule) as server:
        with JudgeAnswers(path) as answers:
            judge_methods(client_for(server, concurrency=1), PROMPTS, {"m": METHOD}, BASE,
                          answers)
        lines = path.read_text().splitlines(keepends=True)
        assert len(lines) == 12
        path.write_text("".join(lines[:-1]) + lines[-1][:len(lines[-1]) // 2])
        server["asked"].clear()
        caplog.set_level("WARNING", logger=llm_judge.logger.name)
        with JudgeAnswers(path) as answers:
            summary = judge_methods(client_for(server), PROMPTS, {"m": METHOD}, BASE,
                                    answers)["m"]
        last = (METHOD[11], BASE[11]) if method_goes_first(0, "m", 11) else (BASE[11], METHOD[11])
        assert server["asked"] == [(PROMPTS[11], *last)]
        assert summary.read_back == 11 and summary.count("invalid") == 0
        damaged = [r for r in caplog.records if "damaged line" in r.getMessage()]
        assert len(damaged) == 1 and "1 damaged line(s)" in damaged[0].getMessage()
        server["asked"].clear()
        with JudgeAnswers(path) as answers:
            summary = judge_methods(client_for(server), PROMPTS, {"m": METHOD}, BASE,
                                    answers)["m"]
        assert server["asked"] == [] and summary.read_back == 12
    assert len(kept_lines(path)) == 12


def test_eval_stopped_while_judging_asks_only_the_rest_and_no_resume_asks_all(
        tmp_path, monkeypatch):
    """eval stopped (an exception) after 4 judge answers: OUT/judge-answers.jsonl holds
    them; the rerun asks the other 8, says in eval.json that 4 were read back, and gives an
    uninterrupted run's verdicts; --no-resume asks all 12 again and the file then holds this
    run's answers only. The API key is written nowhere."""
    import importlib

    evaluation = importlib.import_module("vllm_recontrol.evaluation.evaluate")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))

    Canned = canned_evaluator(evaluation)

    monkeypatch.setattr(evaluation, "Evaluator", Canned)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-not-to-be-written")
    out = tmp_path / "out"
    options = dict(model="org/model", value_head=str(tmp_path / "head"), prompts=str(prompts),
                   reward_fn="vllm_recontrol.toy_world:positive_share", quiet=True,
                   judge_model="judge", judge_concurrency=1)
    sent = [0]
    send = JudgeClient.send

    def stopping(self, request):
        if sent[0] == 4:
            raise KeyboardInterrupt
        sent[0] += 1
        return send(self, request)

    with fake_judge(content_rule, api_key="sk-not-to-be-written") as server:
        options["judge_url"] = server["url"]
        whole = evaluation.evaluate(out=str(tmp_path / "whole"), **options)["results"][1]
        with monkeypatch.context() as patched:
            patched.setattr(JudgeClient, "send", stopping)
            with pytest.raises(KeyboardInterrupt):
                evaluation.evaluate(out=str(out), **options)
        assert len(kept_lines(out / "judge-answers.jsonl")) == 4
        server["asked"].clear()
        evaluation.evaluate(out=str(out), **options)
        assert len(server["asked"]) == 8
        rerun = json.loads((out / "eval.json").read_text())["results"][1]
        assert rerun["judge"]["read_back"] == 4 and whole["judge"]["read_back"] == 0
        assert rerun["judge"]["verdicts"] == whole["judge"]["verdicts"]
        assert rerun["judge"]["win_rate"] == pytest.approx(expected_rate(METHOD, BASE))
        assert len(kept_lines(out / "judge-answers.jsonl")) == 12

        server["asked"].clear()
        evaluation.evaluate(out=str(out), resume=False, **options)
        assert len(server["asked"]) == 12
    again = json.loads((out / "eval.json").read_text())["results"][1]
    assert again["judge"]["read_back"] == 0
    assert again["judge"]["verdicts"] == whole["judge"]["verdicts"]
    kept = kept_lines(out / "judge-answers.jsonl")
    assert len(kept) == 12 and len({row["key"] for row in kept}) == 12
    for folder in (out, tmp_path / "whole"):
        for path in folder.rglob("*"):
            if path.is_file():
                assert b"sk-not-to-be-written" not in path.read_bytes(), path
