"""Labelling: reward functions (and their failures), cutting, and a tiny HF reward model."""

from __future__ import annotations

import json
import math
import sys
import types

import pytest
import torch

from training_fakes import fake_collect, good_reward
from vllm_recontrol.errors import RecontrolError
from vllm_recontrol.training.common import DataError, RewardError, read_jsonl
from vllm_recontrol.training.labeler import label, labels_dir, read_shard_labels
from vllm_recontrol.training.ray_pool import local_code
from vllm_recontrol.training.rewards import (RewardModelScorer, RewardSource, as_reward,
                                             cut_response, load_reward_fn, reward_fn_modules)
from vllm_recontrol.training.shards import read_rows


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return fake_collect(tmp_path_factory.mktemp("label"), count=24, shard_size=8)[0]


def _module(name: str, **functions) -> str:
    module = types.ModuleType(name)
    for key, value in functions.items():
        setattr(module, key, value)
    sys.modules[name] = module
    return name


def test_cut_at_hallucinated_turn():
    assert cut_response("fine thanks\n\nHuman: and you?") == ("fine thanks", True)
    assert cut_response("a User: b Human: c") == ("a", True)
    assert cut_response("plain answer") == ("plain answer", False)
    # what vLLM leaves when a stop string (collect --stop 'Human:') ended the response: the
    # same text as when the marker is cut here
    assert cut_response("fine thanks\n\n") == ("fine thanks", False)


def test_as_reward_accepts_numbers_only():
    assert as_reward(1) == 1.0 and as_reward(0.5) == 0.5
    assert as_reward(torch.tensor(2.0)) == 2.0
    import numpy as np

    assert as_reward(np.float32(0.25)) == 0.25
    for bad in (True, "1.0", None, float("nan"), float("inf"), [1.0], torch.tensor([1.0, 2.0]),
                10 ** 400, 1e39):  # past float's range; past float32's (training's) range
        assert as_reward(bad) is None, bad


def test_reward_fn_modules_name_what_an_actor_imports():
    assert reward_fn_modules("pkg.sub:score") == ["pkg.sub"]
    assert reward_fn_modules(good_reward) == [good_reward.__module__]
    main_function = types.FunctionType(good_reward.__code__, {"__name__": "__main__"})
    assert main_function.__module__ == "__main__" and reward_fn_modules(main_function) == []
    assert reward_fn_modules(None) == []


def test_local_code_ships_only_what_no_installation_provides(tmp_path, monkeypatch):
    """Ray actors elsewhere get the driver's own modules (a package's folder, a module's
    file), never installed or standard-library ones (the cluster has its own)."""
    (tmp_path / "lone_rewards_mod.py").write_text("def score(p, r):\n    return 1.0\n")
    package = tmp_path / "team_rewards_pkg"
    (package / "inner").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "inner" / "__init__.py").write_text("")
    (package / "inner" / "scoring.py").write_text("def score(p, r):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert local_code(["lone_rewards_mod"]) == [str(tmp_path / "lone_rewards_mod.py")]
    # the top-level package travels whole, once, imported or not
    import team_rewards_pkg.inner.scoring  # noqa: F401
    assert local_code(["team_rewards_pkg.inner.scoring", "team_rewards_pkg"]) == [str(package)]
    assert local_code(["json", "torch.nn", "vllm_recontrol.toy_world", "__main__"]) == []
    assert local_code(["no_such_module_anywhere"]) == []


def test_reward_fn_labels_every_row(data):
    summary = label(data=str(data), reward_fn="training_fakes:good_reward", progress=False)
    assert summary["responses labelled"] == 24 and summary["shards labelled now"] == 3
    for shard in ("shard-00000", "shard-00001", "shard-00002"):
        rows = read_rows(data, shard)
        labels = read_shard_labels(data, "reward", shard)
        assert [l["response_id"] for l in labels] == [r["response_id"] for r in rows]
        for row, lab in zip(rows, labels):
            assert lab["reward"] == good_reward(row["prompt"], cut_response(row["response"])[0])
    # A rerun skips finished shards; another source under the same name is refused.
    again = label(data=str(data), reward_fn="training_fakes:good_reward", progress=False)
    assert again["shards skipped (already labelled)"] == 3 and again["shards labelled now"] == 0
    with pytest.raises(DataError, match="made differently"):
        label(data=str(data), reward_fn="training_fakes:opposite_reward", progress=False)
    info = json.loads((labels_dir(data, "reward") / "info.json").read_text())
    assert info["source"] == {"reward_fn": "training_fakes:good_reward"}


def test_overwrite_relabels_a_set_made_the_same_way(data):
    """The function behind one module:function name changed: --overwrite relabels every
    shard (it used to skip them all, the set's info being unchanged)."""
    _module("recontrol_test_changing", score=lambda p, r: 1.0)
    common = dict(data=str(data), reward_fn="recontrol_test_changing:score", name="changing",
                  progress=False)
    label(**common)
    _module("recontrol_test_changing", score=lambda p, r: 2.0)
    assert label(**common)["shards labelled now"] == 0  # without --overwrite: resumable
    assert label(**common, overwrite=True)["shards labelled now"] == 3
    assert {row["reward"] for row in read_shard_labels(data, "changing", "shard-00001")} == {2.0}


def test_responses_are_cut_before_scoring(data):
    seen = []

    def spy(prompt, response):
        seen.append(response)
        return 0.0

    first = read_rows(data, "shard-00000")[0]
    rows_path = data / "shard-00000.jsonl"
    original = rows_path.read_text()
    try:  # a response that runs on into a made-up next turn
        rows = [json.loads(line) for line in original.splitlines()]
        rows[0]["response"] = first["response"] + " Human: more"
        rows_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        label(data=str(data), reward_fn=spy, name="cutcheck", progress=False)
    finally:
        rows_path.write_text(original)
    assert seen[0] == first["response"].rstrip()
    labels = read_shard_labels(data, "cutcheck", "shard-00000")
    assert labels[0]["cut"] is True and not any(l["cut"] for l in labels[1:])


@pytest.mark.parametrize("returned, shown", [("high", "'high'"), (None, "None"),
                                             (float("nan"), "nan"), (True, "True")])
def test_reward_fn_returning_a_non_number_names_the_row(data, returned, shown):
    rows = read_rows(data, "shard-00001")

    def bad(prompt, response):
        return returned if prompt == rows[3]["prompt"] and response == rows[3]["response"] else 1.0

    with pytest.raises(RewardError) as info:
        label(data=str(data), reward_fn=bad, name=f"bad{abs(hash(shown))}", progress=False)
    message = str(info.value)
    assert "shard-00001 row 3" in message and f"response_id {rows[3]['response_id']}" in message
    assert shown in message and "not a finite number" in message
    # Nothing of the failing shard was written; earlier shards keep their finished files.
    folder = labels_dir(data, f"bad{abs(hash(shown))}")
    assert (folder / "shard-00000.jsonl").is_file()
    assert not (folder / "shard-00001.jsonl").exists()


def test_reward_fn_that_raises_names_the_row_and_the_error(data):
    def boom(prompt, response):
        raise KeyError("no lexicon entry")

    _module("recontrol_test_rewards", boom=boom)
    with pytest.raises(RewardError, match=r"recontrol_test_rewards:boom raised KeyError: "
                                          r"'no lexicon entry' on shard shard-00000 row 0"):
        label(data=str(data), reward_fn="recontrol_test_rewards:boom", name="boom",
              progress=False)


def _batched_good_reward(calls: list, batch_size: int | None = None):
    """``good_reward`` scoring a list of pairs per call, recording each call's pairs."""
    from vllm_recontrol import batched_reward

    @batched_reward(batch_size=batch_size)
    def score(prompts, responses):
        calls.append(list(zip(prompts, responses)))
        return [good_reward(p, r) for p, r in zip(prompts, responses)]

    return score


def _expected_labels(data, shard):
    """The oracle: ``good_reward`` on each row's cut response, one pair at a time."""
    return [good_reward(row["prompt"], cut_response(row["response"])[0])
            for row in read_rows(data, shard)]


@pytest.mark.parametrize("marked, option, sizes", [
    (None, 3, [3, 3, 2]),   # no size of its own: label's --batch-size
    (5, 3, [5, 3]),         # its own size wins over --batch-size
    (None, 16, [8])])       # a chunk never spans two shards
def test_a_batched_reward_fn_labels_in_chunks_as_the_per_pair_form_does(data, marked, option,
                                                                        sizes):
    """A ``@batched_reward`` function loaded by module:function gets one call per chunk of
    at most its batch size, in row order; its labels are the per-pair function's."""
    calls = []
    name = f"recontrol_test_batched_{marked}_{option}"
    _module(name, score=_batched_good_reward(calls, marked))
    summary = label(data=str(data), reward_fn=f"{name}:score", name=name, batch_size=option,
                    progress=False)
    assert summary["responses labelled"] == 24 and summary["source"] == f"{name}:score"
    assert [len(call) for call in calls] == sizes * 3  # three shards of 8 rows
    for index, shard in enumerate(("shard-00000", "shard-00001", "shard-00002")):
        rows = read_rows(data, shard)
        shard_calls = calls[index * len(sizes):(index + 1) * len(sizes)]
        assert [pair for call in shard_calls for pair in call] == \
            [(r["prompt"], cut_response(r["response"])[0]) for r in rows]
        labels = read_shard_labels(data, name, shard)
        assert [l["reward"] for l in labels] == _expected_labels(data, shard)
        assert [l["response_id"] for l in labels] == [r["response_id"] for r in rows]
    info = json.loads((labels_dir(data, name) / "info.json").read_text())
    assert info["source"] == {"reward_fn": f"{name}:score"}  # named only, as before


def test_a_set_begun_per_pair_resumes_with_the_batched_form_of_the_same_name(data):
    """describe() names a function only, batched or not: a run stopped part-way by the
    per-pair form resumes with the batched form of the same module:function, labelling only
    the missing shards, and the set holds the same labels as one made in one go."""
    second = read_rows(data, "shard-00001")[0]

    def stops_at_shard_1(prompt, response):
        if prompt == second["prompt"] and response == cut_response(second["response"])[0]:
            raise RuntimeError("reward server went away")
        return good_reward(prompt, response)

    _module("recontrol_test_switch", score=stops_at_shard_1)
    common = dict(data=str(data), reward_fn="recontrol_test_switch:score", name="switch",
                  progress=False)
    with pytest.raises(RewardError, match="reward server went away"):
        label(**common)
    calls = []
    _module("recontrol_test_switch", score=_batched_good_reward(calls))
    summary = label(**common)
    assert summary["shards labelled now"] == 2 and summary["shards skipped (already labelled)"] \
        == 1
    assert [len(call) for call in calls] == [8, 8]  # shards 1 and 2 only
    for shard in ("shard-00000", "shard-00001", "shard-00002"):
        assert [l["reward"] for l in read_shard_labels(data, "switch", shard)] == \
            _expected_labels(data, shard)


def _rows_message(data, shard, start, stop):
    rows = read_rows(data, shard)
    return rows, (f"shard {shard} row {start} (response_id {rows[start]['response_id']})",
                  f"shard {shard} row {stop} (response_id {rows[stop]['response_id']})")


@pytest.mark.parametrize("fault, message", [
    ("short", r"returned 2 rewards for the batch of 3 pairs from {first}, prompt .* to "
              r"{last}, prompt .*; it must return one per pair, in order"),
    ("long", r"returned 4 rewards for the batch of 3 pairs from {first}, .* to {last}, "),
    ("nan", r"returned nan \(type float\), not a finite number, at item 1 of 3 on {row}, "
            r"prompt {prompt}, response {response}$"),
    ("word", r"returned 'high' \(type str\), not a finite number, at item 1 of 3 on {row}, "),
    ("bool", r"returned True \(type bool\), not a finite number, at item 1 of 3 on {row}, "),
    ("scalar", r"returned 1.0 \(type float\), not a sequence of 3 rewards \(one per pair, in "
               r"order\), for the batch of 3 pairs from {first}, .* to {last}, .*must not be "
               r"marked with batched_reward"),
    ("dict", r"returned \{{.*\}} \(type dict\), not a sequence of 3 rewards"),
    ("generator", r"raised ZeroDivisionError: division by zero on the batch of 3 pairs from "
                  r"{first}, .* to {last}, "),
    ("raise", r"raised ConnectionError: reward server refused on the batch of 3 pairs from "
              r"{first}, prompt .* to {last}, prompt ")],
    ids=["short", "long", "nan", "word", "bool", "scalar", "dict", "generator", "raise"])
def test_a_batched_reward_fn_that_fails_names_the_function_and_its_rows(data, fault, message):
    """Rows 3-5 of shard-00001 are the failing chunk (batch size 3), row 4 the bad value:
    every fault stops with the function and the rows, and the shard is not written."""
    import re

    rows, (first, last) = _rows_message(data, "shard-00001", 3, 5)
    bad_row = rows[4]
    name = f"recontrol_test_batched_fault_{fault}"

    def faulty(prompts, responses):
        rewards = [good_reward(p, r) for p, r in zip(prompts, responses)]
        if bad_row["prompt"] not in prompts or \
                cut_response(bad_row["response"])[0] not in responses:
            return rewards
        at = responses.index(cut_response(bad_row["response"])[0])
        if fault in ("nan", "word", "bool"):
            rewards[at] = {"nan": float("nan"), "word": "high", "bool": True}[fault]
            return rewards
        if fault == "raise":
            raise ConnectionError("reward server refused")
        if fault == "generator":  # fails while label reads it, after the call returned
            return (1 / (i != at) for i in range(len(rewards)))
        return {"short": rewards[:-1], "long": rewards + [0.0], "scalar": 1.0,
                "dict": dict(enumerate(rewards))}[fault]

    from vllm_recontrol import batched_reward

    _module(name, score=batched_reward(faulty))
    row = f"shard shard-00001 row 4 (response_id {bad_row['response_id']})"
    expected = message.format(first=re.escape(first), last=re.escape(last), row=re.escape(row),
                              prompt=re.escape(repr(bad_row["prompt"][:60])),
                              response=re.escape(repr(cut_response(bad_row["response"])[0]
                                                      [:60])))
    with pytest.raises(RewardError, match=f"batched reward function {name}:score {expected}"):
        label(data=str(data), reward_fn=f"{name}:score", name=name, batch_size=3,
              progress=False)
    folder = labels_dir(data, name)
    assert (folder / "shard-00000.jsonl").is_file()
    assert not (folder / "shard-00001.jsonl").exists()


def test_batched_reward_marks_explicitly_and_refuses_what_it_cannot_mark():
    from vllm_recontrol import batched_reward
    from vllm_recontrol.training.rewards import batched_mark

    def pairs_of(prompts, responses):
        return [1.0] * len(prompts)

    assert batched_reward(pairs_of) is pairs_of and batched_mark(pairs_of) == {"batch_size": None}
    assert batched_mark(good_reward) is None  # never guessed from a signature

    class Server:  # a client object whose __call__ is marked
        @batched_reward(batch_size=2)
        def __call__(self, prompts, responses):
            return [float(len(r)) for r in responses]

    _module("recontrol_test_server", score=Server())  # a model object, loaded by name
    source = RewardSource(reward_fn="recontrol_test_server:score", batch_size=16)
    assert source.chunk == 2 and source.score([("p", "a"), ("p", "bb"), ("p", "c")]) == \
        [1.0, 2.0, 1.0]
    for size in (0, -1, True, 2.5, "8"):
        with pytest.raises(RewardError, match="batch_size must be a positive integer"):
            batched_reward(batch_size=size)
    with pytest.raises(RewardError, match=r"by name: @batched_reward\(batch_size=64\)"):
        batched_reward(64)
    with pytest.raises(RewardError, match="batch size of batched reward function .* must be a "
                                          "positive integer, got 0"):
        RewardSource(reward_fn=batched_reward(lambda p, r: [0.0] * len(p)), batch_size=0)
    assert RewardSource(reward_fn=pairs_of).score([]) == []  # nothing to score: no call


def test_an_unmarked_batched_function_is_refused_with_a_hint(data):
    """A function written for batches but not marked is handed one pair, and what it returns
    (a list) is refused, the message saying how to mark it."""
    def unmarked(prompts, responses):
        return [good_reward(p, r) for p, r in zip(prompts, responses)]

    with pytest.raises(RewardError, match=r"returned \[.*\] \(type list\), not a finite number, "
                                          r"on shard shard-00000 row 0 .*must be marked with "
                                          r"@vllm_recontrol.batched_reward"):
        label(data=str(data), reward_fn=unmarked, name="unmarked", progress=False)


def test_a_batched_function_reaches_label_actors_by_name_and_by_value(data, tmp_path):
    """What ``label --ray`` hands its actors: the source arguments, pickled by cloudpickle
    (a function from ``__main__`` by value), from which each ``LabelWorker`` builds its own
    source. The mark travels with the function; the labels are the per-pair form's."""
    import cloudpickle

    from vllm_recontrol.training.labeler import LabelOptions, LabelWorker

    calls = []
    name = _module("recontrol_test_batched_actor", score=_batched_good_reward(calls, 4))
    module = sys.modules[name]
    cloudpickle.register_pickle_by_value(module)
    try:  # as a function defined in the driver's script travels
        by_value = cloudpickle.dumps(LabelOptions(data=str(data), reward_fn=module.score)
                                     .source_arguments())
    finally:
        cloudpickle.unregister_pickle_by_value(module)
    assert cloudpickle.loads(by_value)["reward_fn"] is not module.score  # a copy
    by_name = cloudpickle.dumps(LabelOptions(data=str(data), reward_fn=f"{name}:score")
                                .source_arguments())
    for index, blob in enumerate((by_value, by_name)):
        arguments = cloudpickle.loads(blob)
        folder = tmp_path / f"actor-{index}"
        folder.mkdir()
        worker = LabelWorker(str(data), str(folder), arguments, ["Human:", "User:"])
        assert worker.source.chunk == 4
        worker.label_shard("shard-00002")
        assert [r["reward"] for r in read_jsonl(folder / "shard-00002.jsonl")] == \
            _expected_labels(data, "shard-00002")
    assert [len(call) for call in calls] == [4, 4]  # by name: this process's module


def test_reward_fn_spec_errors():
    with pytest.raises(RewardError, match="module:function"):
        load_reward_fn("no_colon")
    with pytest.raises(RewardError, match="cannot import"):
        load_reward_fn("surely_not_a_module_xyz:f")
    with pytest.raises(RewardError, match="no attribute"):
        load_reward_fn("math:not_there")
    with pytest.raises(RewardError, match="not callable"):
        load_reward_fn("math:pi")
    assert load_reward_fn("math:sqrt")(4.0) == 2.0


def test_a_reward_module_that_fails_to_import_is_named(tmp_path, monkeypatch):
    """Only a missing module was caught: a syntax error in the user's reward file, or a
    module failing its own set-up at import, ended label and eval with a bare traceback."""
    (tmp_path / "recontrol_syntax_slip.py").write_text("def f(p, r) return 1\n")
    (tmp_path / "recontrol_no_server.py").write_text(
        "raise RuntimeError('cannot reach reward server')\n")
    (tmp_path / "recontrol_exits.py").write_text("raise SystemExit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for module, message in (
            ("recontrol_syntax_slip", r"importing module 'recontrol_syntax_slip' failed: "
                                      r"SyntaxError: expected ':' \(recontrol_syntax_slip.py, "
                                      r"line 1\)"),
            ("recontrol_no_server", r"importing module 'recontrol_no_server' failed: "
                                    r"RuntimeError: cannot reach reward server"),
            ("recontrol_exits", r"importing module 'recontrol_exits' failed: SystemExit: 3")):
        with pytest.raises(RewardError, match=rf"^--reward-fn {module}:f: {message}"):
            load_reward_fn(f"{module}:f")


def test_a_reward_fn_that_exits_is_named_not_a_silent_end(data):
    """SystemExit from a reward function (a helper library that exits on a failed request)
    ended label without a word, with the function's own status."""
    from vllm_recontrol import batched_reward

    def leaves(prompt, response):
        raise SystemExit(3)

    @batched_reward
    def leaves_batch(prompts, responses):
        sys.exit("reward server gone")

    _module("recontrol_test_exits", leaves=leaves, leaves_batch=leaves_batch)
    with pytest.raises(RewardError, match=r"recontrol_test_exits:leaves raised SystemExit: 3 "
                                          r"on shard shard-00000 row 0"):
        label(data=str(data), reward_fn="recontrol_test_exits:leaves", name="exits",
              progress=False)
    with pytest.raises(RewardError, match=r"recontrol_test_exits:leaves_batch raised "
                                          r"SystemExit: reward server gone on the batch"):
        label(data=str(data), reward_fn="recontrol_test_exits:leaves_batch",
              name="exits-batch", progress=False)


def test_a_labelled_shard_whose_rows_are_gone_is_named_not_a_traceback(tmp_path):
    data = fake_collect(tmp_path, count=16, shard_size=8)[0]
    common = dict(data=str(data), reward_fn="training_fakes:good_reward", progress=False)
    label(**common)
    (data / "shard-00001.jsonl").unlink()
    with pytest.raises(DataError, match=r"shard rows .*shard-00001.jsonl are missing; rerun "
                       r"`vllm-recontrol collect`"):
        label(**common)


def test_a_label_file_short_of_its_shard_s_responses_is_labelled_again(tmp_path, capsys):
    """Label files are written whole, so a short one was edited or damaged: it counted as
    done (labels of 43 of 60 responses reported, exit 0) until train refused it."""
    data = fake_collect(tmp_path, count=16, shard_size=8)[0]
    common = dict(data=str(data), reward_fn="training_fakes:good_reward", progress=False)
    label(**common)
    path = labels_dir(data, "reward") / "shard-00001.jsonl"
    whole = path.read_text()
    path.write_text("".join(whole.splitlines(keepends=True)[:3]))
    capsys.readouterr()
    again = label(**common)
    assert "labels of shard shard-00001 hold 3 rows for its 8 responses" in \
        capsys.readouterr().err
    assert again["shards labelled now"] == 1 and again["responses labelled"] == 16
    assert path.read_text() == whole


def test_label_needs_exactly_one_source(data):
    with pytest.raises(RewardError, match="exactly one"):
        label(data=str(data), progress=False)


@pytest.mark.parametrize("options, message", [
    ({"replicas": 2}, "replicas > 1 needs ray"),
    ({"replicas": 0, "ray": True}, "--replicas must be a positive integer"),
    ({"engine_args": "[]"}, "engine_args must be a JSON object"),
    ({"batch_size": -1}, "batch_size must be a positive integer, got -1"),  # was: rewards 0.0
    ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
    ({"max_length": 0}, "max_length must be an integer >= 1"),
    ({"reward_index": -1}, "reward_index must be an integer >= 0"),
])
def test_label_option_errors(data, options, message):
    with pytest.raises(RecontrolError, match=message):  # DataError, or a mistyped option's
        label(data=str(data), reward_fn=lambda p, r: 1.0, progress=False, **options)


# ----------------------------------------------------------------------------- reward model
@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory):
    """A random LlamaForSequenceClassification with the toy word tokenizer (one output)."""
    from vllm_recontrol.toy import build_tokenizer
    from training_fakes import WORDS

    path = tmp_path_factory.mktemp("rm")
    tokenizer = build_tokenizer(path, [w for w in WORDS if not w.startswith("<")] +
                                ["user:", "assistant:"])
    return _save_random_reward_model(path, tokenizer)


def _save_random_reward_model(path, tokenizer):
    """A one-layer random LlamaForSequenceClassification (one output) beside ``tokenizer``."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         num_labels=1, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(str(path))
    return path


def test_reward_model_batches_score_like_single_rows(tiny_rm):
    pairs = [("good a b", "c"), ("bad a", "d e f a b c"), ("good", "a"), ("bad b c d", "e f"),
             ("good a", "b c d e f a b")]
    batched = RewardModelScorer(str(tiny_rm), batch_size=4).score(pairs)
    single = RewardModelScorer(str(tiny_rm), batch_size=1).score(pairs)
    assert len(set(round(s, 6) for s in single)) == len(pairs)  # really different inputs
    for a, b in zip(batched, single):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-5)


def _padding_trap_rm(path, eos_closes_turns: bool, config_pad: int | None, side: str,
                     composite: bool = False):
    """A random reward model whose pad handling once moved the scored token: a chat template
    closing each assistant turn with eos and no pad id anywhere (Llama-2/Mistral style), or a
    config with ``pad_token_id: 0``, a tokenizer without one, padding on the right.
    ``composite``: a Gemma-3 model, whose pad id lives in its text config only."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import (Gemma3Config, Gemma3ForSequenceClassification, LlamaConfig,
                              LlamaForSequenceClassification, PreTrainedTokenizerFast)

    words = "hello how are you fine thanks what is the weather sunny rain good yes no".split()
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *words, "[INST]", "[/INST]"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                        special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    tokenizer.padding_side = side
    if eos_closes_turns:
        tokenizer.chat_template = (
            "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} "
            "[/INST]{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}")
    tokenizer.save_pretrained(path)
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                pad_token_id=config_pad, bos_token_id=1, eos_token_id=2,
                max_position_embeddings=256)
    torch.manual_seed(0)
    if composite:
        config = Gemma3Config(text_config={**text, "head_dim": 16}, num_labels=1,
                              vision_config=dict(hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=1, num_attention_heads=2,
                                                 image_size=28, patch_size=14))
        Gemma3ForSequenceClassification(config).save_pretrained(path)
    else:
        LlamaForSequenceClassification(LlamaConfig(**text, num_labels=1)).save_pretrained(path)
    return path


@pytest.mark.parametrize("eos_closes_turns, config_pad, side, composite", [
    (True, None, "left", False), (False, 0, "right", False), (False, 0, "right", True)])
def test_reward_model_scores_each_texts_last_token_alone_or_batched(
        tmp_path, eos_closes_turns, config_pad, side, composite):
    """Oracle: the score head on each text's own last hidden state, unpadded (what vLLM's
    pooler reads). Before, one case scored the token before a closing eos, the other read a
    padded row's score off a pad (its value changed with the batch); a composite model
    (Gemma-3: the pad id in its text config) must be padded through that config."""
    from transformers import AutoModelForSequenceClassification

    path = _padding_trap_rm(tmp_path / "rm", eos_closes_turns, config_pad, side, composite)
    pairs = [("hello how are you", "fine thanks"), ("what is the weather", "sunny good"),
             ("hello", "yes"), ("what is the weather", "rain no no")]
    scorer = RewardModelScorer(str(path), batch_size=4)
    model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    with torch.no_grad():
        expected = [float(model.score(model.model(input_ids=torch.tensor([ids]))
                                      .last_hidden_state[0, -1])[0])
                    for ids in scorer.encode(pairs)]
    if eos_closes_turns:
        assert all(ids[-1] == 2 for ids in scorer.encode(pairs))  # the trap is set
    batched = scorer.score(pairs)
    alone = [RewardModelScorer(str(path), batch_size=1).score([pair])[0] for pair in pairs]
    for got in (batched, alone):
        for a, b in zip(got, expected):
            assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-5), (got, expected)


def test_a_batch_using_every_token_id_is_scored_row_by_row(tmp_path):
    """No id is left to pad with: the rows go one at a time, each still scored at its last
    token (the same oracle as above)."""
    from transformers import AutoModelForSequenceClassification

    path = _padding_trap_rm(tmp_path / "rm", True, None, "left")
    every_word = "hello how are you fine thanks what is the weather sunny rain good yes no"
    pairs = [(every_word + " zzz <s> [INST] [/INST]", "yes"), ("hello", "fine")]
    scorer = RewardModelScorer(str(path), batch_size=2)
    encoded = scorer.encode(pairs)
    assert set(encoded[0]) | set(encoded[1]) == set(range(len(scorer.tokenizer)))
    model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    with torch.no_grad():
        expected = [float(model.score(model.model(input_ids=torch.tensor([ids]))
                                      .last_hidden_state[0, -1])[0]) for ids in encoded]
    for a, b in zip(scorer.score(pairs), expected):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-5)


def test_models_put_on_the_cpu_beside_a_gpu_are_warned_about(tiny_rm, monkeypatch, caplog):
    """The device defaults to the CPU; on a machine with a GPU a forgotten --device cuda is
    said once per model (reward model, embedding model), not left to show as days."""
    from vllm_recontrol.evaluation.metrics import Coherence

    with caplog.at_level("WARNING"):
        RewardModelScorer(str(tiny_rm))
    assert "runs on the CPU" not in caplog.text  # no GPU here: nothing to say
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with caplog.at_level("WARNING"):
        RewardModelScorer(str(tiny_rm))
        Coherence.load(str(tiny_rm / "no-embedder"))
    assert f"reward model {str(tiny_rm)!r} runs on the CPU although this machine has a GPU; " \
           "pass --device cuda" in caplog.text
    assert "embedding model" in caplog.text


def test_reward_model_index_and_device_errors(tiny_rm):
    with pytest.raises(RewardError, match=r"--reward-index 5 is out of range: reward model .* "
                                          r"has 1 output\(s\)"):
        RewardModelScorer(str(tiny_rm), reward_index=5)
    with pytest.raises(RewardError, match="reward model device 'foo' is not a torch device"):
        RewardModelScorer(str(tiny_rm), device="foo")


def test_a_reward_engine_s_max_model_len_cuts_the_texts_or_is_refused(tiny_rm, monkeypatch):
    """vLLM's reward engine refuses a text longer than its max_model_len (a traceback, maybe
    hours in): without a max length of the user's, texts are cut to it; with one above it,
    the pair is refused before the engine starts."""
    from vllm_recontrol.training import rewards

    started = []
    monkeypatch.setattr(rewards, "_pooling_llm", lambda *args: started.append(args))
    scorer = RewardModelScorer(str(tiny_rm), engine="vllm", engine_args={"max_model_len": 8})
    assert scorer.max_length == 8 and started[-1][2] == 8
    assert RewardModelScorer(str(tiny_rm), engine="vllm", max_length=6,
                             engine_args={"max_model_len": 8}).max_length == 6
    with pytest.raises(RewardError, match=r"max length 64 \(label's --max-length, eval's "
                                          r"--rm-max-length\) is above its engine's "
                                          r"max_model_len 8"):
        RewardModelScorer(str(tiny_rm), engine="vllm", max_length=64,
                          engine_args={"max_model_len": 8})
    assert len(started) == 2
    assert RewardModelScorer(str(tiny_rm), max_length=64).max_length == 64  # transformers


def test_a_reward_engine_that_does_not_start_ends_with_vllms_reason_and_the_memory_hint(
        tiny_rm, monkeypatch, capsys):
    """The reward model's vLLM engine starts as every engine of the package does: a failure
    names the model and vLLM's reason, and the command's last lines give the memory hint
    (it ended with a RewardError and no hint before); its arguments reach vLLM."""
    import vllm

    from vllm_recontrol.training.common import ENGINE_START_HINT, run_main
    from vllm_recontrol.training.engines import EngineStartError

    asked = []

    def no_memory(**kwargs):
        asked.append(kwargs)
        raise ValueError("No available memory for the cache blocks")

    monkeypatch.setattr(vllm, "LLM", no_memory)
    with pytest.raises(EngineStartError, match=r"^reward model '.*': the vLLM engine did not "
                                               r"start \(ValueError: No available memory"):
        RewardModelScorer(str(tiny_rm), engine="vllm", engine_args={"max_model_len": 8,
                                                                     "dtype": "bfloat16"})
    assert asked[0]["runner"] == "pooling" and asked[0]["dtype"] == "bfloat16"
    assert asked[0]["max_model_len"] == 8 and asked[0]["model"] == str(tiny_rm)

    def score() -> None:
        RewardModelScorer(str(tiny_rm), engine="vllm", engine_args={"max_model_len": 8})

    assert run_main(lambda: score(), {}) == 1
    assert capsys.readouterr().err.strip().endswith(ENGINE_START_HINT)


def test_reward_model_text_formats(tiny_rm):
    """A chat template gets the answer without the whitespace around it (the template places
    it); a dialogue ending in "Assistant:" gets the response as written, with one space only
    where it has none, and an empty response adds nothing."""
    scorer = RewardModelScorer(str(tiny_rm))
    assert scorer.uses_chat_template  # the toy tokenizer has one
    assert scorer.format("good a", "b")[0] == "user: good a assistant: b "
    assert scorer.format("good a", " b\n")[0] == "user: good a assistant: b "
    scorer.uses_chat_template = False
    assert scorer.format("good a", "b") == ("\n\nHuman: good a\n\nAssistant: b", True)
    assert scorer.format("good a", " b") == ("\n\nHuman: good a\n\nAssistant: b", True)
    hh = "\n\nHuman: hi\n\nAssistant:"
    assert scorer.format(hh, "yo") == (hh + " yo", True)
    assert scorer.format(hh, " yo") == (hh + " yo", True)
    assert scorer.format(hh, "\nyo") == (hh + "\nyo", True)
    assert scorer.format(hh + " ", "yo") == (hh + " yo", True)  # the prompt's space is the one
    assert scorer.format(hh, "") == (hh, True)


@pytest.fixture(scope="module")
def bpe_rm(tmp_path_factory):
    """A random LlamaForSequenceClassification with a byte-level BPE tokenizer (spaces are
    part of its tokens, as in Llama-3's) and no chat template."""
    from vllm_recontrol.toy import build_tokenizer

    path = tmp_path_factory.mktemp("bpe-rm")
    tokenizer = build_tokenizer(path, kind="byte-bpe")
    (path / "chat_template.jinja").unlink()
    return _save_random_reward_model(path, tokenizer)


def _generated_text(tokenizer, prompt: str, continuation: str) -> str:
    """The response text vLLM reports for ``continuation`` generated after ``prompt``: its
    detokenizer is a DecodeStream primed with the prompt's ids, so the text keeps the
    leading space of its first token."""
    from tokenizers.decoders import DecodeStream

    prompt_ids = tokenizer(prompt)["input_ids"]
    all_ids = tokenizer(prompt + continuation)["input_ids"]
    assert all_ids[:len(prompt_ids)] == prompt_ids  # the continuation's own tokens follow
    stream = DecodeStream(ids=prompt_ids, skip_special_tokens=True)
    return "".join(filter(None, (stream.step(tokenizer.backend_tokenizer, i)
                                 for i in all_ids[len(prompt_ids):])))


@pytest.mark.parametrize("prompt, dialogue", [
    ("\n\nHuman: ba bon kan\n\nAssistant:", "\n\nHuman: ba bon kan\n\nAssistant:"),
    ("ba bon kan", "\n\nHuman: ba bon kan\n\nAssistant:")])
def test_a_generated_response_is_scored_on_the_text_the_model_wrote(bpe_rm, prompt, dialogue):
    """Oracle: the dialogue and the answer tokenized as one text, with one space between
    them (what the paper scores). vLLM's response text begins with that space; it used to
    get another, an extra token the reward model never saw. A response without it gets
    exactly one, and one cut at a hallucinated turn is scored on its answer alone."""
    scorer = RewardModelScorer(str(bpe_rm))
    assert not scorer.uses_chat_template
    natural = scorer.tokenizer(dialogue + " zo ze zi")["input_ids"]
    generated = _generated_text(scorer.tokenizer, dialogue, " zo ze zi")
    assert generated == " zo ze zi"  # the trap: the text begins with a space
    hallucinated, was_cut = cut_response(generated + "\n\nHuman: ba kan")
    assert was_cut
    for response in (generated, "zo ze zi", hallucinated):
        assert scorer.encode([(prompt, response)]) == [natural]


def test_label_with_reward_model(data, tiny_rm):
    summary = label(data=str(data), reward_model=str(tiny_rm), name="rm", batch_size=3,
                    progress=False)
    assert summary["responses labelled"] == 24
    rows = read_rows(data, "shard-00002")
    labels = read_shard_labels(data, "rm", "shard-00002")
    expected = RewardModelScorer(str(tiny_rm), batch_size=1).score(
        [(r["prompt"], cut_response(r["response"])[0]) for r in rows])
    for lab, value in zip(labels, expected):
        assert math.isclose(lab["reward"], value, rel_tol=1e-5, abs_tol=1e-5)


@pytest.mark.parametrize("key, value", [("scored_token", "last"),
                                        ("text_format", "continuation")])
def test_a_label_set_scored_another_way_is_not_resumed(data, tiny_rm, key, value):
    """A label set whose reward model scored another token (a release before the last-token
    padding) or another text (a release that put a second space before a space-led response)
    is not continued: its labels and new ones would not be alike. Such a release wrote
    neither key."""
    name = f"rm-old-{key}"
    label(data=str(data), reward_model=str(tiny_rm), name=name, batch_size=3, progress=False)
    info_path = labels_dir(data, name) / "info.json"
    info = json.loads(info_path.read_text())
    assert info["source"][key] == value
    label(data=str(data), reward_model=str(tiny_rm), name=name, progress=False)  # resumes
    del info["source"][key]
    info_path.write_text(json.dumps(info))
    with pytest.raises(DataError, match="was made differently"):
        label(data=str(data), reward_model=str(tiny_rm), name=name, progress=False)


def test_a_label_set_is_not_resumed_after_its_reward_model_folder_changed(data, tiny_rm,
                                                                         tmp_path):
    """Another checkpoint saved at the same path is another reward: a resumed set would mix
    its labels with the old model's. The folder's files (names, sizes, times) are in the
    set's info; unchanged, the set resumes."""
    import shutil

    from transformers import AutoModelForSequenceClassification

    folder = tmp_path / "rm"
    shutil.copytree(tiny_rm, folder)
    label(data=str(data), reward_model=str(folder), name="rm-replaced", progress=False)
    before = read_shard_labels(data, "rm-replaced", "shard-00000")
    label(data=str(data), reward_model=str(folder), name="rm-replaced", progress=False)
    model = AutoModelForSequenceClassification.from_pretrained(str(folder))
    with torch.no_grad():
        model.score.weight.mul_(-1)  # another checkpoint: every reward changes sign
    model.save_pretrained(str(folder))
    assert RewardModelScorer(str(folder)).score([("good a", "b")])[0] != \
        RewardModelScorer(str(tiny_rm)).score([("good a", "b")])[0]
    with pytest.raises(DataError, match="was made differently"):
        label(data=str(data), reward_model=str(folder), name="rm-replaced", progress=False)
    assert read_shard_labels(data, "rm-replaced", "shard-00000") == before  # kept as it was


def test_a_reward_model_with_no_folder_here_is_described_without_files(tmp_path):
    """A hub id, or a folder that only Ray workers hold, is described by its name alone
    (describe() runs on the driver; nothing is loaded for it)."""
    for name in ("org/reward-model", str(tmp_path / "on-the-workers")):
        described = RewardSource(reward_model=name).describe()
        assert described["reward_model"] == name and described["model_files"] is None


def test_label_cli_with_config_file(data, tmp_path, capsys):
    from vllm_recontrol.cli import main

    config = tmp_path / "label.json"
    config.write_text(json.dumps({"data": str(data), "reward_fn": "training_fakes:good_reward",
                                  "name": "from-config"}))
    assert main(["label", "--config", str(config), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| responses labelled" in out and "from-config" in out
    assert main(["label", "--data", str(data)]) == 1  # no source: one clear error line
    assert "error: label needs exactly one of" in capsys.readouterr().err


def test_a_label_run_that_stopped_before_its_first_shard_does_not_lock_its_set(tmp_path,
                                                                                capsys):
    """A run that failed before labelling anything (a reward model that did not load, here a
    function that raises) used to leave an info.json that refused the corrected rerun, and an
    empty set that made train ask which of two sets to use."""
    from vllm_recontrol.training.trainer import train

    data = fake_collect(tmp_path, count=12, shard_size=6)[0]

    def broken(prompt, response):
        raise OSError("cannot load the reward model")

    _module("recontrol_test_broken", broken=broken)
    with pytest.raises(RewardError, match="cannot load the reward model"):
        label(data=str(data), reward_fn="recontrol_test_broken:broken", name="typo",
              progress=False)
    assert (labels_dir(data, "typo") / "info.json").is_file()
    label(data=str(data), reward_fn="training_fakes:good_reward", progress=False)  # "reward"
    summary = train(data=str(data), out=str(tmp_path / "head"), epochs=1, widths=[4],
                    device="cpu", progress=False)  # the empty set "typo" is not a choice
    assert summary["metrics"]["epochs_run"] == 1
    label(data=str(data), reward_fn="training_fakes:good_reward", name="typo", progress=False)
    assert "label set" in capsys.readouterr().err
    assert len(read_shard_labels(data, "typo", "shard-00001")) == 6
    with pytest.raises(DataError, match="was made differently"):  # now it holds labels
        label(data=str(data), reward_fn="recontrol_test_broken:broken", name="typo",
              progress=False)


def test_reward_callables_are_named_so_that_two_different_ones_never_match():
    """describe() decides whether a label set resumes and whether eval reads a finished method
    back. Stable names: a module-level function, a partial of one with plain-data
    arguments, a callable given a __recontrol_name__. An object with __call__, a bound
    method, a lambda, a closure, a factory's functools.wraps wrapper, a cache not reachable
    by its name, or a partial holding a tensor gets no stable name: its description never
    equals another source's, also once the first callable is freed and Python reuses its
    address."""
    import functools
    import gc

    from vllm_recontrol.training.rewards import RewardSource, callable_spec, reward_fn_modules

    class Scorer:
        def __init__(self, scale: float) -> None:
            self.scale = scale

        def __call__(self, prompt: str, response: str) -> float:
            return self.scale * len(response)

        def score(self, prompt: str, response: str) -> float:
            return self(prompt, response)

    def describe(fn):
        return RewardSource(reward_fn=fn).describe()

    assert RewardSource(reward_fn=Scorer(1.0)).score([("p", "abc"), ("p", "")]) == [3.0, 0.0]
    assert describe(good_reward) == {"reward_fn": "training_fakes:good_reward"}
    scaled = functools.partial(good_reward, response="x")
    assert describe(scaled) == {
        "reward_fn": "functools.partial(training_fakes:good_reward, response='x')"}
    assert describe(functools.partial(good_reward, response="y")) != describe(scaled)
    assert reward_fn_modules(scaled) == ["training_fakes"]  # shipped to Ray actors
    long = callable_spec(functools.partial(good_reward, response="w" * 5000))
    assert long[1] and len(long[0]) < 300  # the arguments in a digest

    def closure(scale):
        return lambda prompt, response: scale * len(response)

    def wrapped(scale):  # a factory's wrapper takes good_reward's name, not its rewards
        return functools.wraps(good_reward)(lambda prompt, response: scale)

    unnamed = [lambda: Scorer(1.0), lambda: Scorer(1.0).score, lambda: closure(1),
               lambda: functools.partial(good_reward, response=torch.zeros(3)),
               lambda: wrapped(1.0), lambda: functools.lru_cache(good_reward)]
    for make in unnamed:
        first = describe(make())  # no reference kept: the next may reuse the address
        gc.collect()
        assert "unnamed" in first and describe(make()) != first
    named = Scorer(2.0)
    named.__recontrol_name__ = "length-x2"
    assert describe(named) == {"reward_fn": "named:length-x2"}
    assert describe(named.score) == {"reward_fn": "named:length-x2.score"}  # two methods:
    assert describe(named.__call__) != describe(named.score)  # two rewards
    Scorer.__recontrol_name__ = "every-scorer"  # a class's name does not name its instances
    assert "unnamed" in describe(Scorer(3.0))


def test_a_label_set_of_an_unnamed_reward_callable_is_not_resumed_by_another(data):
    """Label with an object reward: a second run with another object (which may compute
    something else) is refused with what to do, not resumed into a mix; named through
    __recontrol_name__ it resumes."""
    class Scorer:
        def __call__(self, prompt: str, response: str) -> float:
            return good_reward(prompt, response)

    label(data=str(data), reward_fn=Scorer(), name="unnamed-object", progress=False)
    with pytest.raises(DataError, match=r"has no name that tells it from another reward .*"
                                        r"__recontrol_name__"):
        label(data=str(data), reward_fn=Scorer(), name="unnamed-object", progress=False)
    named = Scorer()
    named.__recontrol_name__ = "good"
    label(data=str(data), reward_fn=named, name="named-object", progress=False)
    again = label(data=str(data), reward_fn=named, name="named-object", progress=False)
    assert again["shards labelled now"] == 0 and again["shards skipped (already labelled)"] == 3


def test_a_non_finite_zero_dimensional_tensor_is_not_taken_for_a_batch():
    """A per-pair function returning a NaN 0-d tensor is told its value is not finite, not
    that it must be marked as batched (a list is)."""
    import torch

    from vllm_recontrol.training.rewards import RewardSource

    with pytest.raises(RewardError, match="not a finite number") as caught:
        RewardSource(reward_fn=lambda p, r: torch.tensor(float("nan"))).score([("p", "r")])
    assert "batched_reward" not in str(caught.value)
    with pytest.raises(RewardError, match="must be marked with @vllm_recontrol.batched_reward"):
        RewardSource(reward_fn=lambda p, r: [1.0]).score([("p", "r")])
