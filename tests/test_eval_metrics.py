"""Evaluation helpers: the paper's diversity, the grid syntax, the report table."""

from __future__ import annotations

import gc
import json
import math
import random
import sys
import time
import types
from pathlib import Path

import pytest

from vllm_recontrol.evaluation.methods import MethodResult, parse_grid
from vllm_recontrol.evaluation.report import markdown_table
from vllm_recontrol.evaluation.metrics import Coherence, diversity, win_rate
from vllm_recontrol.training.common import DataError, RecontrolError, RewardError


def test_diversity_by_hand():
    # "a b a b": 2-grams ab, ba, ab -> 2 unique / (3 + 1); 3-grams aba, bab -> 2 / 3;
    # 4-grams abab -> 1 / 2.
    assert diversity("a b a b") == pytest.approx((2 / 4) * (2 / 3) * (1 / 2))


@pytest.fixture
def fresh_tokenizer():
    """word_tokenizer decides once per process; let a test decide again, then forget it."""
    from vllm_recontrol.evaluation.metrics import word_tokenizer

    word_tokenizer.cache_clear()
    yield word_tokenizer
    word_tokenizer.cache_clear()


def test_diversity_counts_words_as_the_papers_nltk_tokenization_does(monkeypatch,
                                                                     fresh_tokenizer):
    """Punctuation and contractions are tokens of their own (nltk's word rules, which the
    paper's evaluation ran); with the +1 in rep_n's denominator that moves the score. Here
    without nltk's punkt_tab data: the same word rules on sentences split after . ! ?."""
    nltk_tokenize = pytest.importorskip("nltk.tokenize")

    def no_data(text):
        raise LookupError("Resource punkt_tab not found.")

    monkeypatch.setattr(nltk_tokenize, "word_tokenize", no_data)
    tokenize, described = fresh_tokenizer()
    assert described == ("nltk's Treebank words on punkt's sentences without its English data "
                         "(no punkt_tab data: not exactly the paper's)")
    assert tokenize("I'm sorry, I don't know.") == ["I", "'m", "sorry", ",", "I", "do", "n't",
                                                    "know", "."]
    assert tokenize("Yes, I can help. Yes, I can help.") == ["Yes", ",", "I", "can", "help",
                                                             "."] * 2
    # 9 tokens: 8 distinct 2-grams of 8, 7 of 7, 6 of 6, each over (count + 1)
    assert diversity("I'm sorry, I don't know.") == pytest.approx(8 / 9 * 7 / 8 * 6 / 7)
    assert diversity("I'm sorry, I don't know.") != pytest.approx(
        4 / 5 * 3 / 4 * 2 / 3)  # what 5 whitespace words ("I'm", "sorry,", ...) gave


@pytest.mark.parametrize("text, expected", [
    ('Say "I am sorry." Then listen (that helps.) Good luck.',
     "Say `` I am sorry . '' Then listen ( that helps . ) Good luck ."),
    ("1. **Be honest.** Tell them.", "1 . * * Be honest . * * Tell them ."),
    ("He replied {fine.} We left.", "He replied { fine . } We left ."),
    ("It is a test.: Then more.", "It is a test . : Then more ."),
    ("Dr. Smith went home. He slept.", "Dr . Smith went home . He slept ."),  # no abbreviations
    ("word\x00other. Next.", "word\x00other . Next ."),
])
def test_without_punkt_data_sentences_end_where_punkt_ends_them(monkeypatch, fresh_tokenizer,
                                                                text, expected):
    """A period before a closing quote, bracket or Markdown's ** stayed glued to its word
    ('sorry." Then': "sorry." as one token), which moved diversity by as much as the paper's
    gap between methods. Expected: nltk's word_tokenize with its English data, written out
    by hand (only "Dr." differs there: the data knows it as an abbreviation)."""
    nltk_tokenize = pytest.importorskip("nltk.tokenize")

    def no_data(text):
        raise LookupError("Resource punkt_tab not found.")

    monkeypatch.setattr(nltk_tokenize, "word_tokenize", no_data)
    tokenize, _ = fresh_tokenizer()
    assert tokenize(text) == expected.split(" ")


def test_diversity_takes_nltks_word_tokenize_itself_when_its_data_is_there(monkeypatch,
                                                                          fresh_tokenizer):
    nltk_tokenize = pytest.importorskip("nltk.tokenize")

    def word_tokenize(text):  # stands in for nltk's, with its punkt_tab data present
        return text.split("|")

    monkeypatch.setattr(nltk_tokenize, "word_tokenize", word_tokenize)
    tokenize, described = fresh_tokenizer()
    assert tokenize is word_tokenize and described == "nltk word_tokenize (the paper's)"
    assert diversity("a|b|a|b") == pytest.approx((2 / 4) * (2 / 3) * (1 / 2))


def test_diversity_without_nltk_says_it_split_at_whitespace(monkeypatch, fresh_tokenizer):
    import sys

    monkeypatch.setitem(sys.modules, "nltk.tokenize", None)  # import fails
    tokenize, described = fresh_tokenizer()
    assert tokenize("a b, c") == ["a", "b,", "c"] and described.startswith("whitespace")


def test_repetition_lowers_diversity():
    assert diversity("the cat sees the dog and a bird") > diversity("the the the the the the")


def test_short_text_has_zero_diversity_not_an_error():
    assert diversity("") == 0.0 and diversity("one two") == 0.0


def test_win_rate_counts_wins_and_half_ties():
    assert win_rate([1.0, 0.5, 0.2, 0.0], [0.5, 0.5, 0.3, -1.0]) == pytest.approx(2.5 / 4)
    assert win_rate([0.3, 0.3], [0.3, 0.3]) == 0.5  # a method against itself
    with pytest.raises(ValueError, match="one reward per prompt"):
        win_rate([1.0], [1.0, 2.0])


def test_grid_syntax():
    assert parse_grid("0.5:10, 1:20") == [(0.5, 10, "default", None), (1.0, 20, "default", None)]
    assert parse_grid([[2, 3]]) == [(2.0, 3, "default", None)]
    assert parse_grid("1:30:mc, 2:30", heads=("default", "mc")) == [
        (1.0, 30, "mc", None), (2.0, 30, "default", None)]
    assert parse_grid([[1, 30, "mc"]], heads=("default", "mc"))[0].head == "mc"
    assert parse_grid("3:20:norm=0.5, 1:30:mc:norm=2, 1:30:norm=1:mc",
                      heads=("default", "mc")) == [
        (3.0, 20, "default", 0.5), (1.0, 30, "mc", 2.0), (1.0, 30, "mc", 1.0)]
    assert parse_grid([[3, 20, None, 0.5]]) == [(3.0, 20, "default", 0.5)]
    for bad in ["0.5", "x:3", "0.5:0", "-1:3", "", "1:2:mc:x", "1:2:norm=0", "1:2:norm=x",
                "1:2:norm=1:norm=2", "1:2:norm=inf", [[1, 2, None, -1]], [[1, 2, "mc", 1, 5]],
                "nan:10", "inf:5", "1e39:3", "1:2:norm=1e39", [[1, 2.5]], [[10 ** 400, 2]],
                "1:1000001"]:
        with pytest.raises(RecontrolError, match=r"alpha:steps\[:head\]\[:norm=R\]"):
            parse_grid(bad, heads=("default", "mc"))
    with pytest.raises(RecontrolError, match="names the value head 'td'; this evaluation has "
                                             r"\['default', 'mc'\]"):
        parse_grid("1:30:td", heads=("default", "mc"))
    for repeated in ("1:30, 1.0:30", "1:30:mc, 2:30, 1:30:mc", "1:30:norm=2, 1:30:norm=2.0"):
        with pytest.raises(RecontrolError, match="repeats an earlier point of the grid"):
            parse_grid(repeated, heads=("default", "mc"))
    assert len(parse_grid("1:30, 1:30:mc, 1:30:norm=2", heads=("default", "mc"))) == 3


def test_table_has_a_head_column_only_when_a_further_head_ran():
    def row(method, **kw):
        return MethodResult(method, reward=0.5, diversity=0.5, generated_tokens=10,
                            delivered_tokens=10, seconds=1.0, **kw)

    one = markdown_table([row("base"), row("re-control", alpha=1, steps=30)], Coherence.load(None))
    assert one.splitlines()[0].startswith("| method | alpha | steps |")
    two = markdown_table([row("base"), row("re-control", alpha=1, steps=30),
                          row("re-control", alpha=1, steps=30, head="mc")], Coherence.load(None))
    lines = two.splitlines()
    assert lines[0].startswith("| method | head | alpha | steps |")
    assert lines[2].startswith("| base | - | 0 | 0 |")
    assert lines[3].startswith("| re-control | default | 1 | 30 |")
    assert lines[4].startswith("| re-control | mc | 1 | 30 |")
    assert all(line.count("|") == lines[0].count("|") for line in lines[1:5])
    capped = markdown_table([row("base"), row("re-control", alpha=3, steps=20),
                             row("re-control", alpha=3, steps=20, max_norm=0.5)],
                            Coherence.load(None)).splitlines()
    assert capped[0].startswith("| method | alpha | steps | max_norm | N |")
    assert capped[3].startswith("| re-control | 3 | 20 | - | 1 |")
    assert capped[4].startswith("| re-control | 3 | 20 | 0.5 | 1 |")


def test_table_reports_unavailable_coherence_with_its_reason():
    results = [MethodResult("base", reward=0.4, diversity=0.5, generated_tokens=100,
                            delivered_tokens=100, seconds=1.0),
               MethodResult("best-of-4", n=4, reward=0.8, win_rate=0.75, diversity=0.6,
                            generated_tokens=400, delivered_tokens=100, seconds=2.0)]
    table = markdown_table(results, Coherence.load(None))
    assert "| best-of-4 | 0 | 0 | 4 | 0.8000 | 0.750 | 0.600 | n/a | 200.0 | 50.0 | 0.50 |" \
        in table
    assert "coherence: unavailable (no --embedding-model given)" in table
    assert math.isnan(MethodResult("x").tokens_per_s)


@pytest.fixture(scope="module")
def tiny_sentence_model(tmp_path_factory):
    """A random 1-layer BERT + mean pooling saved as a sentence-transformers folder."""
    pytest.importorskip("sentence_transformers")
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel

    from vllm_recontrol.toy import build_tokenizer

    root = tmp_path_factory.mktemp("st")
    tokenizer = build_tokenizer(root / "bert")
    # Plain text, as a SimCSE model sees it: sentence-transformers would otherwise wrap each
    # text in the toy tokenizer's chat template.
    (root / "bert" / "chat_template.jinja").unlink(missing_ok=True)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(root / "bert")
    word = models.Transformer(str(root / "bert"), max_seq_length=64)
    pooling = models.Pooling(word.get_word_embedding_dimension(), pooling_mode="mean")
    SentenceTransformer(modules=[word, pooling]).save(str(root / "st"))
    return root


def test_coherence_is_the_cosine_of_mean_pooled_embeddings(tiny_sentence_model):
    """Against a hand computation: BERT states, masked mean, cosine."""
    import torch
    from transformers import AutoTokenizer, BertModel

    prompts, responses = ["the good kan", "a bad ba bon"], ["the good kan", "zo ze zi"]
    coherence = Coherence.load(str(tiny_sentence_model / "st"))
    assert coherence.available, coherence.unavailable_reason
    got = coherence.scores(prompts, responses)

    tokenizer = AutoTokenizer.from_pretrained(tiny_sentence_model / "bert")
    model = BertModel.from_pretrained(tiny_sentence_model / "bert").eval()

    def embed(text):
        batch = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            states = model(**batch).last_hidden_state[0]
        mask = batch["attention_mask"][0, :, None].float()
        return (states * mask).sum(0) / mask.sum()

    want = [float(torch.nn.functional.cosine_similarity(embed(p), embed(r), dim=0))
            for p, r in zip(prompts, responses)]
    assert got == pytest.approx(want, abs=1e-5)
    assert got[0] == pytest.approx(1.0, abs=1e-5) and got[1] < 0.999
    # each method of an evaluation answers the same prompts: they are embedded once
    encoded, encode = [], coherence.model.encode
    coherence.model.encode = lambda texts, **kw: encoded.append(list(texts)) or encode(texts, **kw)
    others = ["zo ze zi", "a bad ba bon"]
    assert coherence.scores(prompts, others) == pytest.approx(
        [float(torch.nn.functional.cosine_similarity(embed(p), embed(r), dim=0))
         for p, r in zip(prompts, others)], abs=1e-5)
    assert encoded == [others]
    assert coherence.scores(others, prompts) == pytest.approx([
        float(torch.nn.functional.cosine_similarity(embed(p), embed(r), dim=0))
        for p, r in zip(others, prompts)], abs=1e-5)
    assert encoded == [others, others, prompts]  # new prompts: embedded


@pytest.mark.parametrize("name", ["sup-simcse-tiny", "unsup-simcse-tiny"])
def test_coherence_of_a_simcse_model_embeds_as_the_simcse_tool_does(tiny_sentence_model,
                                                                     tmp_path, name):
    """A plain transformers model (no sentence-transformers config, as the paper's
    princeton-nlp SimCSE models are): [CLS] through the pooler for a supervised model, the
    [CLS] state for an unsupervised one, inputs cut at 128 tokens; not mean pooling."""
    import shutil

    import torch
    from transformers import AutoTokenizer, BertModel

    folder = tmp_path / name
    shutil.copytree(tiny_sentence_model / "bert", folder)
    long = " ".join(["the good kan"] * 60)  # 180 words: past what is read (64 positions here)
    prompts, responses = ["the good kan", "a bad ba bon", long], ["the good kan", "zo ze zi",
                                                                  long + " zo"]
    coherence = Coherence.load(str(folder))
    assert coherence.available, coherence.unavailable_reason
    got = coherence.scores(prompts, responses)

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = BertModel.from_pretrained(folder).eval()

    def embed(text, how):
        batch = tokenizer(text, return_tensors="pt", truncation=True,
                          max_length=min(128, model.config.max_position_embeddings))
        with torch.no_grad():
            out = model(**batch)
        if how == "mean":
            mask = batch["attention_mask"][0, :, None].float()
            return (out.last_hidden_state[0] * mask).sum(0) / mask.sum()
        return out.last_hidden_state[0, 0] if how == "cls" else out.pooler_output[0]

    def cosines(how):
        return [float(torch.nn.functional.cosine_similarity(embed(p, how), embed(r, how), dim=0))
                for p, r in zip(prompts, responses)]

    want = cosines("cls" if name.startswith("unsup") else "pooler")
    assert got == pytest.approx(want, abs=1e-5)
    assert got != pytest.approx(cosines("mean"), abs=1e-3)
    assert got[2] == pytest.approx(1.0, abs=1e-6)  # the same first 64 tokens


def test_coherence_that_cannot_load_says_why(tmp_path):
    coherence = Coherence.load(str(tmp_path / "missing-model"))
    assert not coherence.available
    assert "missing-model" in coherence.unavailable_reason or "not installed" in \
        coherence.unavailable_reason



def test_eval_with_an_embedding_model_that_does_not_load_stops_before_any_engine(
        tmp_path, monkeypatch):
    import importlib

    from training_fakes import write_prompts
    from vllm_recontrol.evaluation import engines

    evaluate_module = importlib.import_module("vllm_recontrol.evaluation.evaluate")

    def no_engine(*args, **kwargs):
        raise AssertionError("an engine was started")

    monkeypatch.setattr(engines.EnginePool, "__init__", no_engine)
    prompts = write_prompts(tmp_path / "prompts.jsonl", 4)
    with pytest.raises(RecontrolError, match=r"--embedding-model: cannot load .*missing-model.*"
                                             r"leave it out to report coherence as unavailable"):
        evaluate_module.evaluate(model="org/no-model", value_head=str(tmp_path / "h"),
                                 prompts=str(prompts), reward_fn="training_fakes:good_reward",
                                 embedding_model=str(tmp_path / "missing-model"),
                                 out=str(tmp_path / "eval"))


def test_an_unavailable_reason_is_its_errors_first_line_cut_at_a_word():
    from vllm_recontrol.evaluation.metrics import _first_line

    url = "see https://huggingface.co/docs/transformers/installation#offline-mode"
    message = "\n" + "We couldn't connect " * 14 + url + "\nsecond line"
    cut = _first_line(message)
    assert cut.endswith(" ...") and "https://" not in cut and "second" not in cut
    assert _first_line("short\nmore") == "short"


@pytest.mark.parametrize("options,message", [
    ({"replicas": 2}, "replicas > 1 needs ray"),
    ({"replicas": 0, "ray": True}, "--replicas must be a positive integer"),
    ({"best_of": [4, 1]}, r"best_of values must be integers >= 2, got \[4, 1\]"),
])
def test_eval_refuses_bad_replicas_before_starting_an_engine(options, message):
    from vllm_recontrol.evaluation.evaluate import EvalOptions, Evaluator

    with pytest.raises(RecontrolError, match=message):
        Evaluator(EvalOptions(model="m", value_head="h", prompts="p", **options), [], None, None)


def test_engines_on_ray_actors_load_one_commit_of_a_hub_head(tmp_path, monkeypatch):
    """Each actor starts its own engine, which would resolve a hub head by itself: the
    driver pins it to one commit for all of them (a local head stays as given)."""
    import huggingface_hub

    from vllm_recontrol.evaluation.evaluate import EvalOptions, Evaluator
    from vllm_recontrol.value_head import ValueHead

    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "snapshots" / commit
    ValueHead(8, [4], seed=0).save(snapshot)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(snapshot))
    local = ValueHead(8, [4], seed=1).save(tmp_path / "local")
    options = dict(model="m", value_head="someone/head", prompts="p", replicas=2,
                   value_heads={"b": str(local)})
    settings = Evaluator(EvalOptions(ray=True, **options), [], None, None)._engine_settings
    assert settings.value_head == f"hf://someone/head@{commit}"
    assert settings.value_heads == {"b": str(local)}
    in_process = Evaluator(EvalOptions(**{**options, "replicas": 1}), [], None, None)
    assert in_process._engine_settings.value_head == "someone/head"  # its engine pins it


def test_engines_on_ray_actors_get_local_engine_paths_absolute(tmp_path, monkeypatch):
    """A relative tokenizer folder names another folder, or a hub id, in an actor that runs
    in another working directory; in this process it stays as given."""
    from vllm_recontrol.evaluation.evaluate import EvalOptions, Evaluator

    (tmp_path / "tok").mkdir()
    monkeypatch.chdir(tmp_path)
    options = dict(model="m", value_head="h", prompts="p", engine_args={"tokenizer": "tok"})
    on_ray = Evaluator(EvalOptions(ray=True, replicas=2, **options), [], None, None)
    assert on_ray._engine_settings.engine_args == {"tokenizer": str(tmp_path.resolve() / "tok")}
    here = Evaluator(EvalOptions(**options), [], None, None)
    assert here._engine_settings.engine_args == {"tokenizer": "tok"}


def test_reward_actors_need_ray_and_a_cluster_that_holds_every_actor(tmp_path):
    from types import SimpleNamespace

    from vllm_recontrol.evaluation.evaluate import evaluate
    from vllm_recontrol.training.ray_pool import _check_resources

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n')
    with pytest.raises(RecontrolError, match="needs ray .*the reward model on Ray actors"):
        evaluate(model="m", value_head="h", prompts=str(prompts), reward_replicas=2,
                 reward_fn="vllm_recontrol.toy_world:positive_share", out=str(tmp_path / "e"))
    cluster = SimpleNamespace(cluster_resources=lambda: {"CPU": 4.0, "GPU": 8.0})
    rewards = SimpleNamespace(replicas=2, ray_num_cpus=1.0, ray_num_gpus=1.0)
    _check_resources(cluster, rewards, {"CPU": 2.0, "GPU": 6.0})  # exactly full
    with pytest.raises(RecontrolError, match=r"2 replicas x 1.0 GPU per actor = 2.0 GPU \(\+ 7.0 "
                       r"GPU for this job's other actors\), but the Ray cluster has 8.0"):
        _check_resources(cluster, rewards, {"CPU": 2.0, "GPU": 7.0})


def test_ray_actors_are_counted_as_created_and_no_work_starts_no_cluster():
    """Fewer shards left than replicas: only that many actors are made, so only they must
    fit; nothing left: no Ray at all (a finished run started again)."""
    from types import SimpleNamespace

    from vllm_recontrol.training.ray_pool import _check_resources, ray_actors

    cluster = SimpleNamespace(cluster_resources=lambda: {"CPU": 8.0, "GPU": 2.0})
    four = SimpleNamespace(replicas=4, ray_num_cpus=1.0, ray_num_gpus=1.0, ray_address=None)
    _check_resources(cluster, four, {}, actors=2)  # 2 shards left on a 2-GPU cluster
    with pytest.raises(RecontrolError, match="4 replicas x 1.0 GPU"):
        _check_resources(cluster, four, {})
    ray = pytest.importorskip("ray")
    with ray_actors(four, object, 0) as actors:
        assert actors == [] and not ray.is_initialized()


def test_actors_without_gpus_on_a_gpu_cluster_are_warned_about(caplog):
    """Ray gives an actor that asks for no GPU none of them: on a GPU cluster that is
    almost always a forgotten --ray-num-gpus 1, said at the start."""
    from types import SimpleNamespace

    from vllm_recontrol.training.ray_pool import _check_resources

    no_gpus = SimpleNamespace(replicas=2, ray_num_cpus=1.0, ray_num_gpus=0.0)
    with caplog.at_level("WARNING"):
        _check_resources(SimpleNamespace(cluster_resources=lambda: {"CPU": 8.0}), no_gpus, {})
    assert "--ray-num-gpus" not in caplog.text  # a CPU cluster: nothing to say
    with caplog.at_level("WARNING"):
        _check_resources(SimpleNamespace(cluster_resources=lambda: {"CPU": 8.0, "GPU": 4.0}),
                         no_gpus, {})
    assert "has 4 GPUs but --ray-num-gpus is 0" in caplog.text
    caplog.clear()
    gpus = SimpleNamespace(cluster_resources=lambda: {"CPU": 8.0, "GPU": 4.0})
    with caplog.at_level("WARNING"):  # label with a reward function: no GPU needed
        _check_resources(gpus, SimpleNamespace(**vars(no_gpus), reward_fn="m:f"), {})
    assert "GPUs but" not in caplog.text
    with caplog.at_level("WARNING"):  # eval's reward actors have their own flag
        _check_resources(gpus, SimpleNamespace(**vars(no_gpus),
                                               gpu_flag="--reward-num-gpus"), {})
    assert "pass --reward-num-gpus 1" in caplog.text


@pytest.mark.parametrize("value_heads, message", [
    (["heads/mc"], "value_heads must map names to head folders"),
    ({"mc": 3}, "value_heads must map names to head folders"),
    # the engine would refuse it too, naming a key of its own config the user never set
    ({"default": "heads/mc"}, "value_heads names a head 'default', the name of --value-head"),
])
def test_eval_refuses_malformed_value_heads_before_starting_an_engine(value_heads, message):
    from vllm_recontrol.evaluation.evaluate import EvalOptions, Evaluator

    options = EvalOptions(model="m", value_head="h", prompts="p", value_heads=value_heads)
    with pytest.raises(RecontrolError, match=message):
        Evaluator(options, [], None, None)


def test_eval_takes_the_reward_model_as_label_does(monkeypatch):
    """The reward-model flags reach the judge (dtype, output index, input length, batch)."""
    import importlib

    from vllm_recontrol.evaluation.evaluate import EvalOptions, reward_source
    from vllm_recontrol.training.common import build_options

    evaluate_module = importlib.import_module("vllm_recontrol.evaluation.evaluate")
    seen = {}
    monkeypatch.setattr(evaluate_module, "evaluate", lambda **options: seen.update(options))
    assert evaluate_module.main(["--model", "m", "--value-head", "h", "--prompts", "p",
                                 "--reward-model", "rm", "--rm-dtype", "bfloat16",
                                 "--reward-index", "1", "--rm-max-length", "64",
                                 "--reward-batch-size", "4", "--trust-remote-code",
                                 "--rm-engine", "vllm", "--rm-engine-args",
                                 '{"gpu_memory_utilization": 0.3}']) == 0
    source = reward_source(build_options(EvalOptions, seen, "eval"))
    assert source.describe() == {"reward_model": "rm", "reward_index": 1, "max_length": 64,
                                 "dtype": "bfloat16", "scored_token": "last",
                                 "text_format": "continuation", "model_files": None}
    assert source._model_args[3] == 4 and source._model_args[6] is True  # batch, remote code
    assert source._model_args[7:] == ("vllm", {"gpu_memory_utilization": 0.3})  # engine


def test_reward_model_out_of_memory_names_the_remedies(monkeypatch):
    import torch

    from vllm_recontrol.training import rewards

    class OutOfMemoryScorer:
        def __init__(self, *args):
            pass

        def score(self, pairs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(rewards, "RewardModelScorer", OutOfMemoryScorer)
    source = rewards.RewardSource(reward_model="big-rm", device="cuda:0", batch_size=16)
    with pytest.raises(RecontrolError, match=r"big-rm ran out of memory on cuda:0 \(float32, "
                       r"batches of 16\).*bfloat16.*gpu_memory_utilization.*Tried to allocate"):
        source.score([("p", "r")])


def test_judge_scores_a_method_in_one_call_and_keeps_each_prompts_best():
    """A reward model batches what it is given: every sample of a method goes in one call;
    Best-of-N keeps each prompt's highest-scoring sample (cut at a next turn first)."""
    from vllm_recontrol.evaluation.evaluate import MethodResult, judge

    calls = []

    def score(pairs):
        calls.append(list(pairs))
        return [float(len(response)) for _, response in pairs]

    samples = [[("a", 1), ("abc\n\nHuman: more", 9), ("ab", 2)], [("xyzw", 4), ("x", 1), ("", 0)]]
    result = judge(MethodResult("best-of-3", n=3), ["p0", "p1"], samples, score,
                   Coherence(None, None, "off"))
    assert len(calls) == 1 and len(calls[0]) == 6 and calls[0][1] == ("p0", "abc")
    assert result.responses == ["abc", "xyzw"] and result.rewards == [3.0, 4.0]
    assert result.reward == 3.5 and result.generated_tokens == 17
    assert result.delivered_tokens == 9 + 4 and result.coherence is None


def test_an_answer_identical_to_bases_ties_whatever_its_batch_neighbours():
    """A reward model's padded batches make a pair's score depend in its last bits on the
    other pairs of its call: identical answers then won or lost by float noise. Through the
    evaluation's score cache each distinct pair is scored once, so they tie."""
    from vllm_recontrol.evaluation.evaluate import MethodResult, ScoreCache, judge

    calls = []

    def batch_dependent(pairs):  # as padding does: the batch's longest answer leaks in
        calls.append(list(pairs))
        longest = max(len(r) for _, r in pairs)
        return [len(r) + 1e-7 * longest for _, r in pairs]

    prompts, off = ["p0", "p1", "p2"], Coherence(None, None, "off")
    base_samples = [[("same", 4)], [("short", 5)], [("same again", 10)]]
    control_samples = [[("same", 4)], [("a much longer answer", 20)], [("same again", 10)]]
    raw = [judge(MethodResult(m), prompts, s, batch_dependent, off)
           for m, s in (("base", base_samples), ("re-control", control_samples))]
    assert raw[1].rewards[0] != raw[0].rewards[0]  # the noise the cache removes
    cached = ScoreCache(batch_dependent)
    calls.clear()
    base, control = [judge(MethodResult(m), prompts, s, cached, off)
                     for m, s in (("base", base_samples), ("re-control", control_samples))]
    assert control.rewards[0] == base.rewards[0] and control.rewards[2] == base.rewards[2]
    assert win_rate(control.rewards, base.rewards) == (0.5 + 1.0 + 0.5) / 3
    assert calls == [[("p0", "same"), ("p1", "short"), ("p2", "same again")],
                     [("p1", "a much longer answer")]]  # each distinct pair scored once
    assert cached([("p0", "same"), ("p0", "same")]) == [base.rewards[0]] * 2 and len(calls) == 2


def test_plot_labels_tell_grid_points_of_the_same_alpha_and_steps_apart(tmp_path):
    pytest.importorskip("matplotlib")
    from vllm_recontrol.evaluation.plots import _suffix, save_plots

    rows = [MethodResult("base", reward=0.4, diversity=0.5, seconds=1.0, delivered_tokens=9),
            MethodResult("re-control", alpha=3, steps=20, reward=0.4, diversity=0.3,
                         seconds=1.0, delivered_tokens=9),
            MethodResult("re-control", alpha=3, steps=20, head="mc", max_norm=8.0,
                         reward=1.0, diversity=0.5, seconds=1.0, delivered_tokens=9)]
    assert [_suffix(r, " ") for r in rows[1:]] == ["", " mc |u|<=8"]
    assert [p.name for p in save_plots(rows, tmp_path)] == ["grid.png",
                                                              "reward_vs_throughput.png"]


def test_bootstrap_interval_matches_the_normal_approximation():
    """Percentile bootstrap of a mean over 400 prompts against mean +- 1.96 sd / sqrt(n),
    and against a plain Python loop over the same index draws; degenerate and paired cases;
    the seed fixes it."""
    import numpy as np

    from vllm_recontrol.evaluation.metrics import bootstrap_interval, win_outcomes

    values = [float(i % 2) for i in range(400)]  # mean 0.5, sd 0.5
    lo, hi = bootstrap_interval(values)
    half = 1.96 * 0.5 / 400 ** 0.5
    assert lo == pytest.approx(0.5 - half, abs=0.01) and hi == pytest.approx(0.5 + half, abs=0.01)
    assert bootstrap_interval(values) == (lo, hi)
    assert bootstrap_interval(values, seed=1) != (lo, hi)
    for count in (37, 9000):  # 9000 prompts: resamples drawn in blocks of 466, then 134
        noisy = [random.gauss(0.0, 1.0) for _ in range(count)]
        rng = np.random.default_rng(5)
        block = (1 << 22) // count
        draws = np.concatenate([rng.integers(0, count, size=(min(block, 600 - start), count))
                                for start in range(0, 600, block)])
        loop = sorted(math.fsum(noisy[i] for i in row) / count for row in draws.tolist())
        assert bootstrap_interval(noisy, resamples=600, seed=5) == pytest.approx(
            (loop[int(0.025 * 599)], loop[int(0.975 * 599)]), rel=1e-9)
    assert bootstrap_interval([0.7] * 5) == (0.7, 0.7)
    same = [0.1, 0.9, 0.4]
    assert bootstrap_interval(win_outcomes(same, same)) == (0.5, 0.5)
    assert all(math.isnan(v) for v in bootstrap_interval([]))
    # one prompt resamples to itself: no interval, rather than a zero-width one
    assert all(math.isnan(v) for v in bootstrap_interval([3.7]))


def test_table_lists_the_intervals_under_it():
    from vllm_recontrol.evaluation.methods import add_intervals

    base = MethodResult("base", rewards=[0.0, 1.0, 0.5, 0.5], reward=0.5, diversity=0.5,
                        generated_tokens=4, delivered_tokens=4, seconds=1.0)
    better = MethodResult("re-control", alpha=1, steps=30, max_norm=8.0, reward=1.0,
                          rewards=[1.0] * 4, diversity=0.5, generated_tokens=4,
                          delivered_tokens=4, seconds=1.0)
    for r in (base, better):
        add_intervals(r, base, seed=0)
    assert base.win_rate_ci95 == (0.5, 0.5) and better.reward_ci95 == (1.0, 1.0)
    assert 0.5 <= better.win_rate_ci95[0] <= better.win_rate_ci95[1] <= 1.0
    table = markdown_table([base, better], Coherence.load(None))
    assert "mean reward; win rate vs. base; mean reward gain over base (paired)" in table
    assert "- re-control 1/30 norm 8: [1.0000, 1.0000]; [" in table
    assert f"- base: [{base.reward_ci95[0]:.4f}, {base.reward_ci95[1]:.4f}]; [0.500, 0.500]; " \
           f"[+0.0000, +0.0000]" in table
    glo, ghi = better.gain_ci95
    assert f"; [{glo:+.4f}, {ghi:+.4f}]" in table and 0.0 <= glo <= ghi <= 1.0


def test_the_paired_gain_interval_tells_a_steady_gain_from_noise():
    """Prompts of very different difficulty: a method that adds 0.5 to every prompt's
    reward has a reward interval overlapping base's, but its paired gain interval is
    exactly [0.5, 0.5]; the gain interval is the bootstrap of the per-prompt differences,
    resampled at the same prompts as the win rate (checked against a loop over the same
    draws)."""
    import numpy as np

    from vllm_recontrol.evaluation.methods import add_intervals

    hardness = [float(i) for i in range(20)]
    base = MethodResult("base", rewards=hardness)
    steady = MethodResult("re-control", alpha=1, steps=10, rewards=[r + 0.5 for r in hardness])
    for r in (base, steady):
        add_intervals(r, base, seed=3)
    assert steady.reward_ci95[0] < base.reward_ci95[1]  # the rewards' intervals overlap
    assert steady.gain_ci95 == (0.5, 0.5) and base.gain_ci95 == (0.0, 0.0)
    noisy = MethodResult("re-control", alpha=2, steps=10,
                         rewards=[r + (1.0 if i % 3 else -1.5) for i, r in enumerate(hardness)])
    add_intervals(noisy, base, seed=3)
    diffs = np.array([a - b for a, b in zip(noisy.rewards, base.rewards)])
    rng = np.random.default_rng(3)
    draws = rng.integers(0, 20, size=(1000, 20))
    means = np.sort(diffs[draws].mean(axis=1))
    assert noisy.gain_ci95 == pytest.approx((means[int(0.025 * 999)], means[int(0.975 * 999)]))
    assert noisy.gain_ci95[0] < 0 < noisy.gain_ci95[1]


def test_eval_json_is_strict_json():
    """A judge without one valid verdict has win rate NaN: eval.json writes it null."""
    from vllm_recontrol.evaluation.report import finite_or_null

    report = {"win_rate": float("nan"), "rows": [(1.0, float("inf")), {"x": -float("inf")}],
              "n": 3, "name": "base"}
    assert finite_or_null(report) == {"win_rate": None, "rows": [[1.0, None], {"x": None}],
                                      "n": 3, "name": "base"}
    json.loads(json.dumps(finite_or_null(report), allow_nan=False))


def test_best_of_n_sample_streams_never_overlap_between_prompts():
    """vLLM seeds a request's n samples seed + j: with seed + i per prompt, prompts i and
    i + 1 shared n - 1 streams. Seeds are seed + n i, so all are distinct (n = 1: seed + i)."""
    from types import SimpleNamespace

    from vllm_recontrol.evaluation.engines import PROMPT_SET, EvalEngine, Method, PromptOrigin

    asked = []
    engine = object.__new__(EvalEngine)
    engine.settings = SimpleNamespace(seed=7, bon_temperature=1.0, temperature=0.0,
                                      system_prompt=None, max_tokens=4)
    engine.prompts = [f"p{i}" for i in range(6)]
    engine.origins = [PromptOrigin(PROMPT_SET, i) for i in range(6)]
    engine._input = lambda prompt, system: prompt
    engine.llm = SimpleNamespace(generate=lambda inputs, params, use_tqdm: asked.extend(params)
                                 or [])
    engine.generate(Method(n=4), 0, 6)
    children = [p.seed + j for p in asked for j in range(p.n)]
    assert len(set(children)) == 24 and asked[1].seed == 11
    asked.clear()
    engine.generate(Method(n=1), 2, 4)
    assert [p.seed for p in asked] == [9, 10]  # single samples keep seed + i


def test_responses_file_has_every_methods_answer_to_every_prompt(tmp_path):
    """responses.jsonl: one strict-JSON line per (method, prompt), methods in order, with
    the reward eval.json keeps for that prompt."""
    from vllm_recontrol.evaluation.report import MethodResult, write_responses

    base = MethodResult("base", responses=["a", "b\nc"], rewards=[0.25, 1.0])
    steered = MethodResult("re-control", alpha=1.0, steps=30, max_norm=8.0,
                           responses=["ü", ""], rewards=[0.5, -2.0])
    path = tmp_path / "responses.jsonl"
    write_responses(path, ["p0", "p1"], [base, steered])
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    assert [(r["method"], r["prompt_index"], r["prompt"], r["response"], r["reward"])
            for r in rows] == [("base", 0, "p0", "a", 0.25), ("base", 1, "p1", "b\nc", 1.0),
                               ("re-control", 0, "p0", "ü", 0.5),
                               ("re-control", 1, "p1", "", -2.0)]
    assert rows[0]["max_norm"] is None and rows[2]["max_norm"] == 8.0
    assert (rows[2]["alpha"], rows[2]["steps"], rows[2]["head"]) == (1.0, 30, "default")


@pytest.mark.parametrize("options,message", [
    ({"max_tokens": 0}, r"--temperature 0.0, --max-tokens 0, --seed 0\): .*max_tokens"),
    ({"temperature": -1.0}, r"--temperature -1.0, .*temperature"),
    ({"bon_temperature": 5.0}, r"--bon-temperature 5.0, .*temperature"),
    # vLLM's engine core seeds numpy with it, and failed there with a traceback
    ({"seed": 2 ** 32}, r"--seed must be an integer in \[0, 2\*\*32\) .*got 4294967296"),
    ({"seed": -3}, r"--seed must be an integer in \[0, 2\*\*32\)"),
    ({"engine_args": {"seed": 2 ** 32}}, r"--engine-args seed must be an integer in \[0, "),
    ({"rm_engine_args": {"seed": -1}, "rm_engine": "vllm", "reward_fn": None,
      "reward_model": "rm"}, r"--rm-engine-args seed must be an integer in \[0, "),
])
def test_eval_refuses_bad_sampling_options_before_starting_an_engine(tmp_path, options, message):
    """vLLM would raise these only at the first request, after the engine's start."""
    from vllm_recontrol.evaluation.evaluate import evaluate

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n')
    with pytest.raises(RecontrolError, match=message):
        evaluate(**{"model": "m", "value_head": "h", "prompts": str(prompts),
                    "reward_fn": "vllm_recontrol.toy_world:positive_share",
                    "out": str(tmp_path / "e"), **options})


def recorded_engine_starts(monkeypatch) -> list[dict]:
    """``vllm.LLM`` replaced by a stand-in that records each start's keyword arguments."""
    import vllm

    started: list[dict] = []

    class RecordingLLM:
        def __init__(self, **kwargs):
            started.append(kwargs)

        def get_tokenizer(self):
            return None

    monkeypatch.setattr(vllm, "LLM", RecordingLLM)
    return started


@pytest.mark.parametrize("engine_args, expected", [({}, False),
                                                   ({"enable_prefix_caching": True}, True)])
def test_eval_engines_start_without_prefix_caching_unless_asked(monkeypatch, engine_args,
                                                                 expected):
    """Methods run one after another on the same prompts: with vLLM's prefix cache, every
    method after base would skip the prefill base paid for, and its tokens/s would not be
    comparable with base's."""
    from vllm_recontrol.evaluation.engines import EngineSettings, EvalEngine

    started = recorded_engine_starts(monkeypatch)
    EvalEngine(EngineSettings(model="m", value_head="h", value_heads={}, max_steps=30,
                              engine_args=engine_args, seed=0, max_tokens=8, temperature=0.0,
                              bon_temperature=1.0, system_prompt=None, chat_template=False),
               ["p"])
    assert started[0]["enable_prefix_caching"] is expected
    assert started[0]["model_impl"] == "recontrol"


def test_every_grid_step_count_is_warmed_up_at_engine_start(monkeypatch):
    """On a GPU a step count (and the projected ascent of a radius) that warm-up did not
    capture is compiled and captured in its first batch: inside that method's timed run,
    lowering its tokens/s. Every grid point's are warmed up at engine start instead."""
    from vllm_recontrol.evaluation.engines import EvalEngine
    from vllm_recontrol.evaluation.evaluate import EvalOptions, Evaluator

    started = recorded_engine_starts(monkeypatch)
    for grid, steps, projected in (("0.5:30,1:5,2:30:norm=4", [5, 30], True),
                                   ("1:10", [10], False)):
        settings = Evaluator(EvalOptions(model="m", value_head="h", prompts="p", grid=grid),
                             [], None, None)._engine_settings
        EvalEngine(settings, ["p"])
        section = started[-1]["additional_config"]["recontrol"]
        assert section["warmup_steps"] == steps and section["max_steps"] == max(steps)
        assert section.get("warmup_projected", False) is projected


class WordLLM:
    """A stand-in ``vllm.LLM``: one token per word, ``max_model_len`` 8, refusing longer
    prompts at ``generate`` as vLLM does; records whether it was shut down."""

    def __init__(self, **kwargs):
        from types import SimpleNamespace

        self.model_config = SimpleNamespace(max_model_len=8)
        self.stopped = []
        self.llm_engine = SimpleNamespace(
            engine_core=SimpleNamespace(shutdown=lambda: self.stopped.append(True)))
        self.generated = []

    def get_tokenizer(self):
        return lambda text: {"input_ids": text.split()}

    def generate(self, inputs, params, use_tqdm=False):
        from vllm.exceptions import VLLMValidationError

        if any(len(x.split()) >= 8 for x in inputs):
            raise VLLMValidationError("This model's maximum context length is 8 tokens")
        self.generated.extend(inputs)
        return []


def eval_pool(monkeypatch, prompts, system_prompt=None):
    """An ``EnginePool`` of one ``EvalEngine`` on a ``WordLLM``."""
    from types import SimpleNamespace

    import vllm

    from vllm_recontrol.evaluation.engines import EnginePool, EngineSettings

    monkeypatch.setattr(vllm, "LLM", WordLLM)
    settings = EngineSettings(model="m", value_head="h", value_heads={}, max_steps=30,
                              engine_args={}, seed=0, max_tokens=8, temperature=0.0,
                              bon_temperature=1.0, system_prompt=system_prompt,
                              chat_template=False)
    return EnginePool(SimpleNamespace(ray=False, progress=False, quiet=True), settings, prompts)


@pytest.mark.parametrize("system_prompt, prompts, message", [
    (None, ["a b", "one two three four five six seven eight"],
     r"prompt 1 of the prompt set \(counted from 0\) has 8 tokens, and the engine's "
     r"max_model_len is 8, .*raise max_model_len in --engine-args$"),
    # fits alone (5 words), not after the prompting rows' system prompt (3 words + 5)
    ("be kind now", ["a", "b", "one two three four five"],
     r"prompt 2 .* has 8 tokens with the system prompt of the prompting rows.*"
     r"--system-prompt ''"),
])
def test_eval_refuses_a_prompt_without_room_for_a_response_before_any_method_runs(
        monkeypatch, system_prompt, prompts, message):
    """vLLM refuses such a prompt only when its method's batch arrives (the prompting rows
    come after base, the grid and Best-of-N), with a traceback that names no prompt; the
    engine that was started for nothing is shut down."""
    engines = []
    monkeypatch.setattr(WordLLM, "get_tokenizer", lambda self: engines.append(self)
                        or (lambda text: {"input_ids": text.split()}))
    with pytest.raises(DataError, match=message):
        eval_pool(monkeypatch, prompts, system_prompt)
    assert engines and engines[0].generated == [] and engines[0].stopped == [True]


def test_a_prompt_vllm_refuses_at_generation_is_named_by_its_index(monkeypatch):
    """What the up-front check does not foresee still ends in one line naming the prompt
    (its global index: an engine may hold a range of the prompts)."""
    from vllm_recontrol.evaluation.engines import Method

    pool = eval_pool(monkeypatch, ["a", "b", "c", "d"])
    pool.local.prompts[2] = "one two three four five six seven eight nine"  # after the check
    with pytest.raises(DataError, match=r"^prompt 2 of the prompt set \(counted from 0\): "
                                        r"vLLM refused a request .* has 9 tokens"):
        pool.local.generate(Method(), 1, 4)
    pool.local.generate(Method(), 0, 2)
    assert pool.local.llm.generated == ["a", "b"]


def test_the_first_timed_method_follows_a_full_size_untimed_batch(monkeypatch):
    """An engine's first batch of full size pays first-use costs; base, always first, would
    carry them in its time (the denominator of every ratio to base). So every prompt runs
    once, untimed, with short responses before the first method; before each method, one
    prompt runs untimed (its own path), then the timed full run."""
    from vllm_recontrol.evaluation.engines import FIRST_BATCH_WARMUP_TOKENS, Method

    pool = eval_pool(monkeypatch, ["a", "b", "c"])
    calls = []
    real_generate = WordLLM.generate

    def recording(self, inputs, params, use_tqdm=False):
        calls.append((len(inputs), params[0].max_tokens))
        return real_generate(self, inputs, params, use_tqdm)

    monkeypatch.setattr(WordLLM, "generate", recording)
    pool.run(Method())
    assert calls == [(3, FIRST_BATCH_WARMUP_TOKENS), (1, 8), (3, 8)]
    calls.clear()
    pool.run(Method(alpha=1.0, steps=5))
    assert calls == [(1, 8), (3, 8)]


@pytest.mark.parametrize("best_of, expected", [(4, [4]), (4.0, [4]), ([2, 8.0], [2, 8]),
                                               ([], [])])
def test_best_of_takes_whole_numbers_as_a_config_file_writes_them(best_of, expected):
    from types import SimpleNamespace

    from vllm_recontrol.evaluation.evaluate import Evaluator

    assert Evaluator.best_of(SimpleNamespace(opts=SimpleNamespace(best_of=best_of))) == expected


@pytest.mark.parametrize("best_of, message", [
    (None, "best_of must be an integer >= 2 or a list of them, got None"),
    (2.5, r"best_of values must be integers >= 2, got \[2.5\]"),
    ([4, True], "best_of values must be integers >= 2"),
    ("4", "best_of must be an integer >= 2 or a list"),
    ([4, 8, 4.0], r"best_of lists 4 more than once \(each N is one row of the table\)"),
])
def test_best_of_refuses_what_is_not_a_count_with_a_message(best_of, message):
    """From a config file these reached a loop and ended in a raw TypeError."""
    from types import SimpleNamespace

    from vllm_recontrol.evaluation.evaluate import Evaluator

    with pytest.raises(RecontrolError, match=message):
        Evaluator.best_of(SimpleNamespace(opts=SimpleNamespace(best_of=best_of)))


def test_a_grid_that_is_no_string_or_list_is_refused_with_a_message():
    with pytest.raises(RecontrolError, match="the grid must be a string .* got 5"):
        parse_grid(5)


def test_grid_points_that_print_alike_keep_their_own_judge_verdicts():
    """The judge's results are looked up by method key: two alphas equal to 6 digits
    shared one entry, so one row showed the other's verdicts."""
    a, b = parse_grid("0.1234561:10,0.1234564:10")
    rows = [MethodResult("re-control", alpha=p.alpha, steps=p.steps) for p in (a, b)]
    assert rows[0].key != rows[1].key


@pytest.mark.parametrize("setting, message", [
    ({"reward_model": "MISSING"}, "cannot load reward model"),
    # transformers blamed the tokenizer in five lines on sentencepiece
    ({"reward_model": "EMPTY"}, r"cannot load reward model '.*empty-rm': the folder has no "
                                r"config.json \(a model folder is one saved with save_pretr"),
    ({"reward_batch_size": 0}, "batch_size must be a positive integer, got 0"),
    ({"reward_index": 3}, r"--reward-index 3 is out of range: reward model .* has 1 output"),
    ({"device": "gpu7"}, "reward model device 'gpu7' is not a torch device"),
])
def test_a_bad_reward_model_setting_fails_before_any_engine_starts(tmp_path, monkeypatch,
                                                                    setting, message):
    """The reward model loads on first use, after the engine started and base generated (the
    paper's base run took 0.6 h): its settings, tokenizer and config are checked first."""
    import importlib

    from transformers import LlamaConfig

    from vllm_recontrol.toy import build_tokenizer

    evaluate_module = importlib.import_module("vllm_recontrol.evaluation.evaluate")

    def no_engine(*args, **kwargs):
        raise AssertionError("an engine was started")

    monkeypatch.setattr(evaluate_module, "EnginePool", no_engine)
    rm = tmp_path / "rm"  # a config and a tokenizer: all the checks read
    build_tokenizer(rm)
    LlamaConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                num_labels=1).save_pretrained(rm)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n')
    options = dict(model="m", value_head="h", prompts=str(prompts), reward_model=str(rm),
                   out=str(tmp_path / "e"))
    if setting.get("reward_model") == "MISSING":
        setting = {"reward_model": str(tmp_path / "no-such-rm")}
    if setting.get("reward_model") == "EMPTY":
        (tmp_path / "empty-rm").mkdir()
        setting = {"reward_model": str(tmp_path / "empty-rm")}
    with pytest.raises(RecontrolError, match=message):
        evaluate_module.evaluate(**{**options, **setting})


def test_two_vllm_engines_that_cannot_share_the_gpu_are_refused_before_either_starts(
        tmp_path, monkeypatch):
    """--rm-engine vllm beside the generation engine on one GPU: vLLM refuses an engine whose
    gpu_memory_utilization share is not free (kv_cache_memory_bytes or not), whichever starts
    second; both default to vLLM's 0.92. Shares that fit, Ray actors, no GPU, or a rerun
    that only rescores kept samples (no generation engine) pass."""
    import importlib

    import torch
    from transformers import LlamaConfig

    from vllm_recontrol.toy import build_tokenizer
    from vllm_recontrol.value_head import ValueHead

    evaluate_module = importlib.import_module("vllm_recontrol.evaluation.evaluate")
    started = []

    class FakePool:  # records a start; samples depend on the method alone
        def __init__(self, opts, settings, prompts) -> None:
            started.append(opts.engine_args)
            self.count = len(prompts)

        def run(self, method, part=None):
            return [[(f"answer {i} {method.alpha} {method.n} {j}", 2) for j in range(method.n)]
                    for i in range(self.count)], 1.0

        def close(self, failing: bool = False) -> None:
            pass

    monkeypatch.setattr(evaluate_module, "EnginePool", FakePool)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    rm = tmp_path / "rm"  # a config and a tokenizer: what the reward model's checks read
    build_tokenizer(rm)
    LlamaConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                num_labels=1).save_pretrained(rm)
    head = tmp_path / "head"
    ValueHead(8, [4], seed=0).save(head)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n{"prompt": "bye"}\n')
    options = dict(model="m", value_head=str(head), prompts=str(prompts), reward_model=str(rm),
                   rm_engine="vllm", grid="1:2", best_of=[2], system_prompt="", quiet=True,
                   out=str(tmp_path / "out"))
    with pytest.raises(RecontrolError, match=r"add up to 1\.84 of it \(0\.92 \(--engine-args, "
                       r"vLLM's default\), 0\.92 \(--rm-engine-args, vLLM's default\)\).*"
                       r"at most 0\.95"):
        evaluate_module.evaluate(**options)
    with pytest.raises(RecontrolError, match=r"add up to 1\.22 .*0\.3 \(--rm-engine-args\)"):
        evaluate_module.evaluate(**options, rm_engine_args={"gpu_memory_utilization": 0.3})
    with pytest.raises(RecontrolError, match=r"add up to 1\.84"):  # vLLM asks 0.92 free anyway
        evaluate_module.evaluate(**options, rm_engine_args={"kv_cache_memory_bytes": 1 << 30})
    assert started == []
    # samples kept by a run with a reward function; a rerun that only rescores them with the
    # vLLM reward model starts no generation engine, so nothing is refused
    evaluate_module.evaluate(**{**options, "reward_model": None, "rm_engine": "hf",
                                "reward_fn": "training_fakes:good_reward"})
    assert len(started) == 1
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.setattr(evaluate_module, "reward_scoring",
                        lambda *args: lambda pairs: [float(len(r)) for _, r in pairs])
    report = evaluate_module.evaluate(**options)
    assert len(started) == 1 and report["results"][0]["rewards"] == [
        float(len(r)) for r in report["results"][0]["examples"]]
    check = evaluate_module.check_shared_gpu
    fits = evaluate_module.EvalOptions(
        model="m", value_head="h", prompts="p", engine_args={"gpu_memory_utilization": 0.6},
        reward_model="rm", rm_engine="vllm", rm_engine_args={"gpu_memory_utilization": 0.3})
    check(fits)  # 0.9: fits
    with pytest.raises(RecontrolError, match="add up to 1.84"):  # vLLM asks 0.92 anyway
        check(evaluate_module.EvalOptions(**{**vars(fits), "rm_engine_args": {},
                                             "engine_args": {"kv_cache_memory_bytes": 1 << 30}}))
    for passes in ({"ray": True}, {"ray": True, "reward_replicas": 2}, {"rm_engine": "hf"}):
        check(evaluate_module.EvalOptions(**{**vars(fits), "engine_args": {},
                                             "rm_engine_args": {}, **passes}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check(evaluate_module.EvalOptions(**{**vars(fits), "engine_args": {}, "rm_engine_args": {}}))


def test_responses_are_cut_at_the_markers_labelling_used():
    """eval cuts each sample at --cut-at's markers before scoring, as label did for the
    training labels (a Vicuna-style "USER:" turn; the default markers miss it: case)."""
    import importlib

    from vllm_recontrol.evaluation.metrics import Coherence

    evaluation = importlib.import_module("vllm_recontrol.evaluation.evaluate")
    samples = [[("fine thanks USER: and you?", 3)], [("ok Human: more", 3)]]
    scored = []

    def score(pairs):
        scored.extend(pairs)
        return [float(len(r)) for _, r in pairs]

    none = Coherence(None, None, "none")
    cut = evaluation.judge(evaluation.MethodResult("base"), ["a", "b"], samples, score, none,
                           ["USER:"])
    assert cut.responses == ["fine thanks", "ok Human: more"]
    assert scored == [("a", "fine thanks"), ("b", "ok Human: more")]
    default = evaluation.judge(evaluation.MethodResult("base"), ["a", "b"], samples, score,
                               none)
    assert default.responses == ["fine thanks USER: and you?", "ok"]
    seen = {}
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(evaluation, "evaluate", lambda **options: seen.update(options))
        assert evaluation.main(["--model", "m", "--value-head", "h", "--prompts", "p",
                                "--cut-at", "USER:", "###"]) == 0
    assert seen["cut_at"] == ["USER:", "###"]


def test_a_rerun_reads_back_the_methods_a_previous_run_finished(tmp_path, monkeypatch):
    """Each finished method is kept under out/methods with a digest of what decides it: a
    rerun with the same options generates nothing (no engine started) and reports the same
    numbers; a run that failed part-way keeps the methods before the failure; a changed
    option, or new weights in the head of a controlled method, run again what they change;
    --no-resume runs everything."""
    import importlib

    from vllm_recontrol.value_head import ValueHead

    evaluation = importlib.import_module("vllm_recontrol.evaluation.evaluate")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(4)))
    head = tmp_path / "head"
    ValueHead(8, [4], seed=0).save(head)
    ran, started, fail_on = [], [], []

    class FakePool:  # what the engines return: samples depend on the method alone
        def __init__(self, opts, settings, prompts) -> None:
            started.append(opts.max_tokens)
            self.count = len(prompts)

        def run(self, method, part=None):
            ran.append(method)
            if fail_on and len(ran) == fail_on[0]:
                raise RuntimeError("simulated failure")
            good = " good" * int(method.alpha * 2 + method.n)
            return [[(f"answer {i}{good} {j}", 3) for j in range(method.n)]
                    for i in range(self.count)], 1.0

        def close(self, failing: bool = False) -> None:
            pass

    monkeypatch.setattr(evaluation, "EnginePool", FakePool)

    def run(out="out", **extra):
        ran.clear()
        options = dict(model="org/model", value_head=str(head), prompts=str(prompts),
                       grid="0.5:2", best_of=[2], system_prompt="", quiet=True,
                       out=str(tmp_path / out),
                       reward_fn="vllm_recontrol.toy_world:positive_share")
        report = evaluation.evaluate(**{**options, **extra})
        return [(r["method"], r["rewards"]) for r in report["results"]], len(ran)

    first, runs = run()
    assert runs == 3 and len(list((tmp_path / "out" / "methods").glob("*.json"))) == 3
    started.clear()
    again, runs = run()
    assert (again, runs, started) == (first, 0, [])  # read back; no engine started
    table = (tmp_path / "out" / "eval.md").read_text()
    assert "| base * |" in table and "read back from a previous run" in table
    assert run(max_tokens=7)[1] == 3  # changes every method
    ValueHead(8, [4], seed=1).save(head)  # new weights: only the controlled method
    assert [m.alpha for m in (run()[1] and ran)] == [0.5]
    for kept in (tmp_path / "out" / "methods").glob("*.json"):  # stale content...
        saved = json.loads(kept.read_text())
        saved["result"]["rewards"] = [9.0] * 4
        kept.write_text(json.dumps(saved))
    assert run(resume=False)[1] == 3  # ...ignored, and replaced by this run's
    assert run() == (first, 0)
    model = tmp_path / "model"  # a local model saved again at the same path: all again
    (model / "sub").mkdir(parents=True)
    (model / "sub" / "weights").write_bytes(b"1")
    assert run(model=str(model))[1] == 3 and run(model=str(model))[1] == 0
    (model / "sub" / "weights").write_bytes(b"22")
    assert run(model=str(model))[1] == 3
    fail_on.append(2)  # a fresh folder, the grid's method fails: base is kept
    with pytest.raises(RuntimeError, match="simulated failure"):
        run("fresh")
    fail_on.clear()
    assert [(m.alpha, m.n) for m in (run("fresh")[1] and ran)] == [(0.5, 1), (0.0, 2)]
    for kept in (tmp_path / "fresh" / "methods").glob("*.json"):  # files of another release
        saved = json.loads(kept.read_text())
        saved["result"]["unknown_field"] = 1
        kept.write_text(json.dumps(saved))
    assert run("fresh") == (first, 0)  # scored again from the kept samples, no crash
    for kept in [*(tmp_path / "fresh" / "methods").rglob("*.json")]:
        kept.write_text(kept.read_text()[:-9])  # damaged results and samples: generated again
    assert run("fresh") == (first, 3)


def test_a_new_reward_rescores_the_kept_samples_without_generating_again(tmp_path,
                                                                        monkeypatch):
    """Samples are kept apart from their scores: a rerun with another reward function, other
    --cut-at markers, or after the reward failed part-way, generates nothing and scores the
    very samples (Best-of-N's discarded ones too) with what it is given now; a changed
    generation option generates again."""
    import importlib

    from vllm_recontrol.value_head import ValueHead

    evaluation = importlib.import_module("vllm_recontrol.evaluation.evaluate")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(3)))
    head = tmp_path / "head"
    ValueHead(8, [4], seed=0).save(head)
    calls = []

    class FakePool:  # fresh random text on every call: a regeneration is told apart
        def __init__(self, opts, settings, prompts) -> None:
            self.count = len(prompts)

        def run(self, method, part=None):
            calls.append(method)
            failing.fail.extend(failing.armed)  # the reward fails once generation is done
            draw = lambda: " ".join(random.choice(["a", "bb", "ccc", "USER:"])  # noqa: E731
                                    for _ in range(6))
            return [[(draw(), 6) for _ in range(method.n)] for _ in range(self.count)], 2.0

        def close(self, failing: bool = False) -> None:
            pass

    monkeypatch.setattr(evaluation, "EnginePool", FakePool)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    failing = types.ModuleType("recontrol_test_flaky_reward")
    failing.fail, failing.armed = [], []

    def length(prompt: str, response: str) -> float:
        if failing.fail:
            raise RuntimeError("reward model out of memory")
        return float(len(response))

    failing.length = length
    monkeypatch.setitem(sys.modules, "recontrol_test_flaky_reward", failing)

    def run(reward_fn="training_fakes:good_reward", **extra):
        calls.clear()
        options = dict(model="org/model", value_head=str(head), prompts=str(prompts),
                       grid="0.5:2", best_of=[3], system_prompt="", quiet=True,
                       out=str(tmp_path / "out"), reward_fn=reward_fn, cut_at=["USER:"],
                       overlap_scoring=False)  # base's failure stops before the grid
        return evaluation.evaluate(**{**options, **extra})["results"]

    def kept_samples():
        folder = tmp_path / "out" / "methods" / "samples"
        return {json.dumps(json.loads(f.read_text())["result"]["samples"])
                for f in folder.glob("*.json")}

    first = run()
    assert len(calls) == 3 and len(kept_samples()) == 3
    samples = kept_samples()
    by_length = run("recontrol_test_flaky_reward:length")
    assert calls == [] and kept_samples() == samples  # scored again, not generated
    for old, new in zip(first, by_length):
        assert len(new["examples"]) == 3 and new["rewards"] == \
            [float(len(r)) for r in new["examples"]]  # "examples": the first 5 responses
        if old["n"] == 1:
            assert new["examples"] == old["examples"]
    best_of = next(json.loads(text) for text in samples if len(json.loads(text)[0]) == 3)
    bon = next(r for r in by_length if r["n"] == 3)
    assert bon["examples"] == [max((t.split("USER:")[0].rstrip() for t, _ in c), key=len)
                                for c in best_of]  # the longest of the three kept samples
    uncut = run("recontrol_test_flaky_reward:length", cut_at=[])
    assert calls == [] and any(u["rewards"] != c["rewards"] for u, c in zip(uncut, by_length))
    failing.armed.append(1)  # generation ends, the reward fails: the samples are kept...
    with pytest.raises(RewardError, match="out of memory"):
        run("recontrol_test_flaky_reward:length", max_tokens=9)
    assert len(calls) == 1
    failing.fail.clear(), failing.armed.clear()
    again = run("recontrol_test_flaky_reward:length", max_tokens=9)
    assert [m.n for m in calls] == [1, 3]  # ...base was not generated again
    last = run("recontrol_test_flaky_reward:length", max_tokens=9)
    assert calls == [] and [(r["examples"], r["rewards"]) for r in last] == \
        [(r["examples"], r["rewards"]) for r in again]

    def scaled(k):  # closures: no name tells two apart, so nothing scored is read back
        return lambda prompt, response: k * float(len(response))

    plus = run(scaled(1.0), max_tokens=9)
    gc.collect()  # the first closure freed: the next may reuse its address
    minus = run(scaled(-1.0), max_tokens=9)
    assert calls == [] and [r["rewards"] for r in minus if r["n"] == 1] == \
        [[-x for x in r["rewards"]] for r in plus if r["n"] == 1]


def test_background_scoring_runs_jobs_in_order_and_stops_at_a_failure():
    """The scoring thread: first in, first out; busy while a job waits; drain waits for all;
    a failed job's error is raised at the next submit; close(wait=False) cancels the
    queued jobs; disabled, a job runs at once in the caller's thread."""
    import threading

    from vllm_recontrol.evaluation.overlap import BackgroundScoring

    scoring, order, gate = BackgroundScoring(), [], threading.Event()
    first = scoring.submit(lambda: gate.wait(5) and order.append(threading.current_thread().name))
    later = [scoring.submit(lambda i=i: order.append(i) or i) for i in range(3)]
    assert scoring.busy() and order == []
    gate.set()
    scoring.drain()
    assert not scoring.busy() and order == ["recontrol-scoring", 0, 1, 2]
    assert first.result() is None and [f.result() for f in later] == [0, 1, 2]
    failed = scoring.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failed.result()
    with pytest.raises(ZeroDivisionError):
        scoring.submit(lambda: order.append("after the failure"))
    scoring.close()
    assert "after the failure" not in order

    stopping, gate, started = BackgroundScoring(), threading.Event(), threading.Event()
    running = stopping.submit(lambda: started.set() or gate.wait(5))
    queued = stopping.submit(lambda: order.append("never"))
    assert started.wait(5)
    stopping.close(wait=False, grace_s=0.1)  # the running job outlives the grace: abandoned
    assert stopping.abandoned and queued.cancelled() and not running.done()
    gate.set()
    assert running.result(timeout=5) is True and "never" not in order

    ending, gate, started = BackgroundScoring(), threading.Event(), threading.Event()
    quick = ending.submit(lambda: started.set() or gate.wait(5))
    assert started.wait(5)  # running, not queued (close would cancel a queued job)
    threading.Timer(0.1, gate.set).start()
    ending.close(wait=False, grace_s=5)  # ends within the grace: not abandoned
    assert quick.result(timeout=5) is True and not ending.abandoned

    light = BackgroundScoring()  # light jobs (a read-back's bookkeeping) are not "busy"
    held = light.submit(lambda: gate.wait(5), weighs=False)
    assert not light.busy()
    light.drain()
    assert held.done()
    light.close()

    inline = BackgroundScoring(enabled=False)
    assert inline.submit(threading.current_thread).result() is threading.current_thread()
    with pytest.raises(ZeroDivisionError):
        inline.submit(lambda: 1 / 0)


def test_a_method_is_scored_while_the_next_generates_with_the_scores_of_one_at_a_time(
        tmp_path, monkeypatch):
    """Scoring overlaps generation: base's scoring is still running when the grid's
    generation starts (the reward waits for it; one at a time it would time out); the report
    equals that of --no-overlap-scoring; a scoring failure stops generation at the next
    method; an engine core in this process turns the overlap off."""
    import importlib
    import threading

    evaluation = importlib.import_module("vllm_recontrol.evaluation.evaluate")
    # as vLLM runs by default: an engine core in its own process (the variable set turns
    # the overlap off, as the last case checks)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(3)))
    head = tmp_path / "head"
    from vllm_recontrol.value_head import ValueHead

    ValueHead(8, [4], seed=0).save(head)
    generating, calls = threading.Event(), []

    class FakePool:  # samples depend on the method alone
        def __init__(self, opts, settings, prompts) -> None:
            self.count = len(prompts)

        def run(self, method, part=None):
            calls.append(method)
            if len(calls) > 1:
                generating.set()
                if module.engine_fails:
                    raise RuntimeError("engine died")
            deadline = time.monotonic() + 5
            while module.fail and len(calls) > 1 and time.monotonic() < deadline and \
                    scorers[-1]._failed is None:  # base's scoring fails meanwhile
                time.sleep(0.01)
            words = " good" * int(method.alpha * 2 + method.n)
            return [[(f"answer {i}{words} {j} {method.steps}", 3) for j in range(method.n)]
                    for i in range(self.count)], 1.0

        def close(self, failing: bool = False) -> None:
            closed.append(failing)  # failing: Ray actors killed, not waited for

    monkeypatch.setattr(evaluation, "EnginePool", FakePool)
    scorers, closed = [], []

    class Scoring(evaluation.BackgroundScoring):
        def __init__(self, *args) -> None:
            super().__init__(*args)
            scorers.append(self)

    monkeypatch.setattr(evaluation, "BackgroundScoring", Scoring)
    module = types.ModuleType("recontrol_test_waiting_reward")
    seen, module.fail, module.engine_fails = [], [], False

    def waits(prompt: str, response: str) -> float:
        if module.fail:
            raise RuntimeError("the reward model is gone")
        if not seen:  # base's first pair: wait for the next method to start generating
            seen.append(generating.wait(timeout=5))
        return float(response.count("good")) + 0.1 * len(prompt)

    module.waits = waits
    monkeypatch.setitem(sys.modules, "recontrol_test_waiting_reward", module)

    def run(out, **extra):
        calls.clear(), seen.clear(), generating.clear()
        options = dict(model="org/model", value_head=str(head), prompts=str(prompts),
                       grid="0.5:2,1:3,2:4", best_of=[2], control_best_of=True,
                       system_prompt="be good", quiet=True, out=str(tmp_path / out),
                       reward_fn="recontrol_test_waiting_reward:waits", progress=False)
        report = evaluation.evaluate(**{**options, **extra})
        return [{k: v for k, v in r.items() if k != "seconds"} for r in report["results"]]

    from vllm_recontrol.training.rewards import RewardSource

    loads = []  # a reward model loads in the main thread, before the first scoring job
    monkeypatch.setattr(RewardSource, "load", lambda self: loads.append(
        (threading.current_thread().name, len(calls))))
    overlapped = run("a", overlap_scoring=True)
    assert seen == [True] and len(calls) == 8  # base was scored while the grid generated
    assert loads == [("MainThread", 1)]
    assert overlapped[1]["overlapped"] and not overlapped[0]["overlapped"]
    table = (tmp_path / "a" / "eval.md").read_text()
    assert "| re-control + |" in table and "| base |" in table and "--overlap-scoring" in table
    module.other = lambda prompt, response: -waits(prompt, response)
    rescored = run("a", reward_fn="recontrol_test_waiting_reward:other")
    # base, the grid and Best-of-N rescored from their samples, their marks kept with the
    # samples (as their timing is); the combinations follow the grid's new best point
    assert len(calls) == 2 and [r["overlapped"] for r in rescored[:5]] == \
        [r["overlapped"] for r in overlapped[:5]] and rescored[1]["overlapped"]
    in_turn = run("b")  # the default: one at a time
    assert seen == [False] and not any(r["overlapped"] for r in in_turn)
    assert [{**r, "overlapped": False} for r in overlapped] == in_turn  # the same report
    assert [r["method"] for r in in_turn] == [
        "base", "re-control", "re-control", "re-control", "best-of-2",
        "re-control + best-of-2", "prompting", "re-control + prompting"]
    # the engine dies while base is scored: the scoring call gets the grace, then is
    # abandoned, and what it finishes afterwards is not kept
    release = threading.Event()
    module.slow = lambda prompt, response: release.wait(10) and 1.0
    monkeypatch.setattr(evaluation, "SCORING_GRACE_S", 0.2)
    module.engine_fails = True
    closed.clear()
    with pytest.raises(RuntimeError, match="engine died"):
        run("d", overlap_scoring=True, reward_fn="recontrol_test_waiting_reward:slow")
    assert closed == [True]
    module.engine_fails = False
    release.set()
    time.sleep(0.5)  # the abandoned call ends meanwhile
    assert not list((tmp_path / "d" / "methods").glob("*.json"))  # no finished method
    assert len(list((tmp_path / "d" / "methods" / "samples").glob("*.json"))) == 1
    module.fail.append(1)
    with pytest.raises(RewardError, match="the reward model is gone"):
        run("c", overlap_scoring=True)
    assert len(calls) in (1, 2)  # stopped at the next method, not after all eight
    opts = evaluation.EvalOptions(model="m", value_head="h", prompts="p", in_process=True,
                                  overlap_scoring=True)
    assert not evaluation.Evaluator(opts, ["q"], None, None).overlap
    opts.ray = True  # the engines are in the actors
    assert evaluation.Evaluator(opts, ["q"], None, None).overlap


def test_the_resume_digest_covers_versions_environment_and_reward_engine(monkeypatch):
    """What changes a method's samples or scores without an eval option changing: the
    packages' versions, the ascent backend/precision variables, the reward engine's args."""
    import torch

    from vllm_recontrol.evaluation import resume

    options = {"model": "org/model", "max_tokens": 8, "rm_engine_args": {}, "out": "a",
               "engine_args": {}}
    reward = {"reward_fn": "m:f"}
    facts = resume.run_facts(options, ["q"], reward)
    assert facts["generation"]["versions"]["torch"] == torch.__version__
    assert resume.run_facts({**options, "out": "b"}, ["q"], reward) == facts  # where: no
    assert resume.run_facts({**options, "rm_engine_args": {"dtype": "bfloat16"}}, ["q"],
                            reward) != facts
    for scoring in ({**options, "cut_at": ["###"]}, {**options, "embedding_model": "e"}):
        changed = resume.run_facts(scoring, ["q"], reward)  # the same samples, rescored
        assert changed["generation"] == facts["generation"] and changed != facts
    changed = resume.run_facts(options, ["q"], {"reward_fn": "m:g"})
    assert changed["generation"] == facts["generation"] and changed != facts
    for how in ({"engine_args": {"gpu_memory_utilization": 0.5, "max_num_seqs": 8}},
                {"reference_column": "chosen"},  # how to run the engine; the judge's
                # where the same prompt texts come from (their digest is in the facts)
                {"prompts": "/abs/p.jsonl"}, {"prompts": "./p.jsonl", "max_prompts": 100},
                {"prompt_format": "hh", "prompt_column": "text", "split": "test",
                 "data_dir": "harmless-base"}):
        assert resume.run_facts({**options, **how}, ["q"], reward) == facts
    assert resume.run_facts(options, ["q", "r"], reward)["generation"] != facts["generation"]
    for what in ({"engine_args": {"dtype": "float32"}}, {"engine_args": {"max_model_len": 64}}):
        assert resume.run_facts({**options, **what}, ["q"], reward)["generation"] != \
            facts["generation"]  # changes the samples (max_model_len cuts a response short)
    monkeypatch.setenv("VLLM_RECONTROL_BACKEND", "torch")
    assert resume.run_facts(options, ["q"], reward)["generation"] != facts["generation"]


def test_reward_actors_are_killed_not_asked_to_close_when_the_run_fails():
    """On an error (or Ctrl-C) the pool kills its actors at once: asking them to close would
    wait behind a scoring call still running on them; on success they free their models."""
    import contextlib

    from vllm_recontrol.evaluation.scoring import RewardPool

    from training_fakes import closable_actors

    closes, stopped = [], []

    def pool():
        made = RewardPool.__new__(RewardPool)
        made.actors, made._stack = closable_actors(closes), contextlib.ExitStack()
        made._stack.callback(lambda: stopped.append(1))
        return made

    import ray

    real_get, ray.get = ray.get, lambda refs: refs
    try:
        with pytest.raises(KeyboardInterrupt), pool():
            raise KeyboardInterrupt
        assert (closes, stopped) == ([], [1])
        with pool():
            pass
        assert (closes, stopped) == ([1, 1], [1, 1])
    finally:
        ray.get = real_get


def test_a_reward_actors_error_names_the_row_the_driver_would(monkeypatch):
    """Each reward actor scores a contiguous share: an error named the row within the share
    (row 8 for the batch's row 20 in a reviewer's run), not the row one process names."""
    import contextlib
    from types import SimpleNamespace

    import ray

    from vllm_recontrol.evaluation.scoring import RewardPool, RewardWorker
    from vllm_recontrol.training.rewards import RewardError

    module = types.ModuleType("recontrol_test_row_reward")

    def picky(prompt, response):
        if prompt == "q5":
            raise ValueError("boom")
        return 1.0

    module.picky = picky
    monkeypatch.setitem(sys.modules, module.__name__, module)
    arguments = {"reward_fn": f"{module.__name__}:picky"}
    pairs = [(f"q{i}", "r") for i in range(7)]
    with pytest.raises(RewardError, match=r"ValueError: boom on row 5, prompt 'q5'"):
        RewardWorker(arguments).score(pairs)  # one process, as the driver scores
    pool = RewardPool.__new__(RewardPool)
    workers = [RewardWorker(arguments) for _ in range(2)]  # shares 0-3 and 4-6
    pool.actors = [SimpleNamespace(score=SimpleNamespace(remote=worker.score))
                   for worker in workers]
    pool._stack = contextlib.ExitStack()
    monkeypatch.setattr(ray, "get", lambda refs: refs)
    with pytest.raises(RewardError, match=r"ValueError: boom on row 5, prompt 'q5'"):
        pool.score(pairs)
    assert pool.score(pairs[:5]) == [1.0] * 5


def _eval_with_fake_engines(tmp_path, monkeypatch, reward_fn, out, **extra):
    """``evaluate`` on 3 prompts (base, one grid point, Best-of-3) with engines whose samples
    depend on the method alone; returns each method's (method, n, examples, rewards)."""
    import importlib

    from vllm_recontrol.value_head import ValueHead

    evaluation = importlib.import_module("vllm_recontrol.evaluation.evaluate")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(3)))
    head = tmp_path / "head"
    if not head.exists():
        ValueHead(8, [4], seed=0).save(head)

    class FakePool:
        def __init__(self, opts, settings, prompts) -> None:
            self.count = len(prompts)

        def run(self, method, part=None):
            return [[(f"answer {i} alpha {method.alpha} n {method.n}" + " good" * (i + j), 4)
                     for j in range(method.n)] for i in range(self.count)], 1.0

        def close(self, failing: bool = False) -> None:
            pass

    monkeypatch.setattr(evaluation, "EnginePool", FakePool)
    report = evaluation.evaluate(model="org/model", value_head=str(head), prompts=str(prompts),
                                 grid="0.5:2", best_of=[3], system_prompt="", quiet=True,
                                 out=str(tmp_path / out), reward_fn=reward_fn, **extra)
    return [(r["method"], r["n"], r["examples"], r["rewards"]) for r in report["results"]]


def _goodness(prompt: str, response: str) -> float:
    return response.count("good") + len(prompt) / 10


def test_eval_scores_with_a_batched_reward_fn_as_with_its_per_pair_form(tmp_path, monkeypatch):
    """A ``@batched_reward`` function named by module:function judges eval's methods in
    calls of at most --reward-batch-size distinct pairs (each method's in one go, split),
    and gives every method the rewards the same reward written per pair gives."""
    from vllm_recontrol import batched_reward

    calls = []

    @batched_reward
    def goodness(prompts, responses):
        calls.append(len(prompts))
        return [_goodness(p, r) for p, r in zip(prompts, responses)]

    module = types.ModuleType("recontrol_test_eval_batched")
    module.goodness, module.per_pair = goodness, _goodness
    monkeypatch.setitem(sys.modules, module.__name__, module)
    per_pair = _eval_with_fake_engines(tmp_path, monkeypatch, f"{module.__name__}:per_pair",
                                       "per-pair")
    batched = _eval_with_fake_engines(tmp_path, monkeypatch, f"{module.__name__}:goodness",
                                      "batched", reward_batch_size=2)
    assert calls == [2, 1, 2, 1, 2, 2, 2, 2, 1]  # base 3, the grid point 3, Best-of-3 9 pairs
    assert batched == per_pair
    assert [m for m, *_ in batched] == ["base", "re-control", "best-of-3"]
    for method, n, examples, rewards in per_pair:  # the oracle, on the kept answers
        assert rewards == [_goodness(f"q{i}", answer) for i, answer in enumerate(examples)]
        assert n == 1 or all(a.endswith(" good" * (i + 2)) for i, a in enumerate(examples))


def test_eval_refuses_a_bad_batch_for_a_batched_reward_fn_before_any_engine(tmp_path,
                                                                            monkeypatch):
    from vllm_recontrol import batched_reward

    module = types.ModuleType("recontrol_test_eval_batch_zero")
    module.score = batched_reward(lambda prompts, responses: [0.0] * len(prompts))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    with pytest.raises(RewardError, match=r"eval: the batch size of batched reward function "
                                          r"recontrol_test_eval_batch_zero:score must be a "
                                          r"positive integer, got 0"):
        _eval_with_fake_engines(tmp_path, monkeypatch, "recontrol_test_eval_batch_zero:score",
                                "out", reward_batch_size=0)
    assert not (tmp_path / "out" / "methods").exists()  # stopped before generating anything


def test_a_batched_reward_fn_that_fails_in_eval_names_the_chunks_rows(tmp_path, monkeypatch):
    from vllm_recontrol import batched_reward

    module = types.ModuleType("recontrol_test_eval_batched_bad")
    module.short = batched_reward(batch_size=2)(lambda prompts, responses: [1.0])
    monkeypatch.setitem(sys.modules, module.__name__, module)
    with pytest.raises(RewardError, match=r"batched reward function "
                                          r"recontrol_test_eval_batched_bad:short returned 1 "
                                          r"rewards for the batch of 2 pairs from row 0, prompt "
                                          r"'q0', response 'answer 0 alpha 0.0 n 1' to row 1, "
                                          r"prompt 'q1'.*one per pair"):
        _eval_with_fake_engines(tmp_path, monkeypatch, f"{module.__name__}:short", "out")


def test_eval_reward_actors_rebuild_a_batched_reward_fn(monkeypatch):
    """What ``--reward-replicas`` hands each Ray actor: eval's reward source arguments,
    pickled by cloudpickle (a function of the driver's script by value), from which a
    ``RewardWorker`` builds its own source: the mark and the chunking travel with it."""
    import cloudpickle

    from vllm_recontrol import batched_reward
    from vllm_recontrol.evaluation.evaluate import EvalOptions, reward_source_arguments
    from vllm_recontrol.evaluation.scoring import RewardWorker

    module = types.ModuleType("recontrol_test_eval_actor_reward")
    sizes = []

    @batched_reward(batch_size=3)
    def goodness(prompts, responses):
        sizes.append(len(prompts))
        return [_goodness(p, r) for p, r in zip(prompts, responses)]

    goodness.__module__ = module.__name__
    module.goodness = goodness
    monkeypatch.setitem(sys.modules, module.__name__, module)
    pairs = [(f"q{i}", "good " * i) for i in range(7)]
    blobs = []
    for reward_fn in (goodness, f"{module.__name__}:goodness"):
        options = EvalOptions(model="m", value_head="h", prompts="p", reward_fn=reward_fn)
        cloudpickle.register_pickle_by_value(module)
        try:
            blobs.append(cloudpickle.dumps(reward_source_arguments(options)))
        finally:
            cloudpickle.unregister_pickle_by_value(module)
    assert cloudpickle.loads(blobs[0])["reward_fn"] is not goodness  # a copy, as Ray ships it
    for blob in blobs:
        worker = RewardWorker(cloudpickle.loads(blob))
        assert worker.score(pairs) == [_goodness(p, r) for p, r in pairs]
    assert sizes == [3, 3, 1]  # the by-name source calls this process's function


def test_eval_engine_args_can_add_recontrol_engine_keys_but_not_eval_s_own(monkeypatch):
    """--engine-args additional_config["recontrol"] adds engine keys (another backend,
    fewer warm-up step counts); the keys eval sets itself, or another model_impl, are
    refused before any engine starts, naming the option that sets them. (They ended eval
    with a bare TypeError: two values for additional_config.)"""
    from vllm_recontrol.evaluation.engines import EvalEngine
    from vllm_recontrol.evaluation.evaluate import EvalOptions, Evaluator
    from vllm_recontrol.training.common import DataError

    started = recorded_engine_starts(monkeypatch)

    def evaluator(engine_args):
        return Evaluator(EvalOptions(model="m", value_head="h", prompts="p",
                                     grid="0.5:30,1:5", engine_args=engine_args), [], None, None)

    extra = {"additional_config": {"recontrol": {"backend": "torch", "warmup_steps": [30]},
                                   "other_plugin": {"x": 1}}, "model_impl": "recontrol"}
    EvalEngine(evaluator(extra)._engine_settings, ["p"])
    kwargs = started[-1]
    assert kwargs["model_impl"] == "recontrol" and kwargs["additional_config"]["other_plugin"] == {"x": 1}
    section = kwargs["additional_config"]["recontrol"]
    assert section["backend"] == "torch" and section["warmup_steps"] == [30]  # the user's
    assert section["value_head"] == "h" and section["max_steps"] == 30
    assert section["default_on"] is False
    for bad, message in (
            ({"additional_config": {"recontrol": {"steps": 4, "value_head": "x"}}},
             r'additional_config\["recontrol"\]: eval sets steps from --grid; '
             r"value_head from --value-head"),
            ({"additional_config": {"recontrol": {"max_norm": 0.01}}},
             r"eval sets max_norm from --grid \(a point's norm=R\)"),
            ({"additional_config": {"recontrol": "fast"}}, "must be an object"),
            ({"additional_config": ["recontrol"]}, "must be an object"),
            ({"model_impl": "transformers"}, "leave model_impl out")):
        with pytest.raises(DataError, match=message):
            evaluator(bad)
