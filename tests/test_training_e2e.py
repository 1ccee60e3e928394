"""End to end on the toy world: collect (vLLM, sampled) -> label -> train -> controlled generation.

vLLM runs in child processes through the real CLI (`vllm-recontrol collect --in-process`):
an in-process engine starts in about 2 s instead of about 30 s, and keeping it out of the
pytest process keeps vLLM's cached environment out of the other tests' engines.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fake_judge import fake_judge
from vllm_recontrol import ValueHead, toy_world
from vllm_recontrol.training import label, train
from vllm_recontrol.training.common import read_jsonl
from vllm_recontrol.training.rewards import RewardSource

TRAIN_PROMPTS, EVAL_PROMPTS = 600, 64
ENGINE_ARGS = {"dtype": "float32", "enforce_eager": True, "max_model_len": 128,
               "kv_cache_memory_bytes": 64 << 20}
COLLECT_FLAGS = ["--max-new-tokens", "16", "--temperature", "1.0", "--shard-size", "100",
                 "--seed", "0", "--in-process", "--no-progress",
                 "--engine-args", json.dumps(ENGINE_ARGS)]
# The demo's recipe (vllm_recontrol.demo): TD(0.9) targets. The toy world depends on the
# machine's float rounding; on one machine the MC head of this world steered at no alpha,
# and of seven worlds tried the TD head steered in six (README, "Demo"). Bellman heads
# converge slowly and need a larger alpha. Control setting: alpha 1.0, 30 steps.
TRAIN_OPTIONS = dict(target="td-lambda", td_lambda=0.9, lr=1e-3, batch_size=64, epochs=60,
                     widths=[64], device="cpu")
ALPHA, STEPS = 1.0, 30


def run_cli(*args: str, timeout: int = 400) -> str:
    proc = subprocess.run([sys.executable, "-m", "vllm_recontrol.cli", *args],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("toy-world")
    paths = toy_world.build_world(root, TRAIN_PROMPTS, EVAL_PROMPTS)
    model, prompts = paths["model"], paths["train_prompts"]
    data = root / "data"
    out = run_cli("collect", "--model", str(model), "--prompts", str(prompts), "--out",
                  str(data), *COLLECT_FLAGS)
    assert re.search(r"^\| responses +\| 600 +\|$", out, re.MULTILINE), out[-2000:]
    return {"root": root, "model": model, "prompts": prompts, "data": data}


@pytest.fixture(scope="module")
def trained(world) -> dict:
    summary = label(data=str(world["data"]), reward_fn="vllm_recontrol.toy_world:positive_share",
                    progress=False)
    # Sampled collection gives both moods; greedy collection would give the value head nothing.
    assert 0.3 < summary["mean reward"] < 0.7 and summary["std reward"] > 0.3, summary
    head = world["root"] / "head"
    result = train(data=str(world["data"]), out=str(head), labels="reward", progress=False,
                   **TRAIN_OPTIONS)
    return {"head": head, "metrics": result["metrics"]}


def test_value_head_beats_the_trivial_predictor(trained):
    m = trained["metrics"]
    print("held-out metrics:", json.dumps(m))
    assert m["split"] == "heldout" and m["responses"] == TRAIN_PROMPTS // 10
    assert m["pearson_s0"] > 0.2 > m["trivial_pearson_s0"]
    assert m["mse_s0"] < m["trivial_mse_s0"] and m["mse"] < 0.7 * m["trivial_mse"]
    head = ValueHead.load(trained["head"], expected_hidden_size=64)
    assert head.metadata["target"] == "td-lambda" and head.base_model.endswith("toy-lm")


def test_control_raises_reward_on_held_out_prompts(world, trained):
    script = (
        "import json, sys\n"
        "from vllm_recontrol import toy_world as tw\n"
        f"res = tw.controlled_rewards({str(world['model'])!r}, {str(trained['head'])!r}, "
        f"[json.loads(l)['prompt'] for l in open({str(world['root'] / 'eval.jsonl')!r})], "
        f"settings=[(0.0, 0), ({ALPHA}, {STEPS})], "
        "max_new_tokens=16, in_process=True)\n"
        "print('RESULT ' + json.dumps(res))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    base, controlled = json.loads(line[len("RESULT "):])
    print(f"greedy mean reward on {EVAL_PROMPTS} held-out prompts: uncontrolled "
          f"{base['mean_reward']:.3f}, RE-Control (alpha {ALPHA}, {STEPS} steps) "
          f"{controlled['mean_reward']:.3f}")
    assert controlled["mean_reward"] > base["mean_reward"] + 0.2
    assert sum(t.strip() != "" for t in controlled["texts"]) == EVAL_PROMPTS


def test_collect_stops_at_a_stop_string_and_keeps_states_to_it(world, tmp_path):
    """`collect --stop`: vLLM ends a response where a stop string appears (as label cuts at
    a next turn), so the stored states end there too: the response text leaves the string
    out, its token ids and states keep the tokens that wrote it."""
    data = tmp_path / "data"
    out = run_cli("collect", "--model", str(world["model"]), "--prompts", str(world["prompts"]),
                  "--out", str(data), *COLLECT_FLAGS, "--max-prompts", "40",
                  "--stop", "happy", "--stop", "sad")
    assert "responses ended by EOS or a stop string" in out
    rows = read_jsonl(data / "shard-00000.jsonl")
    assert len(rows) == 40
    stopped = [r for r in rows if r["finish_reason"] == "stop" and not r["response"].endswith(".")]
    assert len(stopped) >= 3, [r["response"] for r in rows]  # ended by a stop word, not EOS
    for row in rows:
        assert "happy" not in row["response"] and "sad" not in row["response"]
        assert row["num_states"] == len(row["response_token_ids"])
    labelled = label(data=str(data), reward_fn="vllm_recontrol.toy_world:positive_share",
                     progress=False)
    assert labelled["responses labelled"] == 40


def test_ray_replicas_write_the_same_files_as_one_engine(world):
    """2 vLLM engines in 2 Ray actors on a local CPU cluster: byte-identical shards."""
    pytest.importorskip("ray")
    data = world["root"] / "data-ray"
    run_cli("collect", "--model", str(world["model"]), "--prompts", str(world["prompts"]),
            "--out", str(data), *COLLECT_FLAGS, "--ray", "--replicas", "2",
            "--ray-num-cpus", "1")
    single = sorted(p.name for p in world["data"].glob("shard-*"))
    assert sorted(p.name for p in data.glob("shard-*")) == single and len(single) == 12
    for name in ["manifest.json", *single]:
        assert (data / name).read_bytes() == (world["data"] / name).read_bytes(), name


def test_ray_replicas_label_the_same_as_one_process(world, trained, tmp_path):
    """`label --ray --replicas 2`: two actors, each with its own reward source (a function in
    a module of the driver's working folder, which the actors import too), write the label
    files of the single-process run byte for byte."""
    import shutil

    pytest.importorskip("ray")
    data = tmp_path / "data"
    shutil.copytree(world["data"], data, ignore=shutil.ignore_patterns("labels"))
    (tmp_path / "my_rewards.py").write_text(
        "from vllm_recontrol.toy_world import positive_share as reward\n")
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_recontrol.cli", "label", "--data", str(data),
         "--reward-fn", "my_rewards:reward", "--ray", "--replicas", "2", "--ray-num-cpus", "1",
         "--no-progress"], capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single = sorted((world["data"] / "labels" / "reward").glob("shard-*.jsonl"))
    assert len(single) == 6
    for path in single:
        assert (data / "labels" / "reward" / path.name).read_bytes() == path.read_bytes()
    assert re.search(r"\| shards labelled now +\| 6 +\|", proc.stdout), proc.stdout


def test_ray_actors_get_a_reward_package_they_cannot_import_themselves(world, trained,
                                                                       tmp_path):
    """A reward function from a package only the driver can import (a folder on the driver's
    sys.path, not the working folder Ray shares with local workers; on a cluster of several
    machines, any folder of the driver's machine) reaches the actors through Ray's
    ``py_modules``: the labels equal the single-process run's."""
    import shutil

    pytest.importorskip("ray")
    data = tmp_path / "data"
    shutil.copytree(world["data"], data, ignore=shutil.ignore_patterns("labels"))
    package = tmp_path / "driver-only" / "team_rewards"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "scoring.py").write_text(
        "from vllm_recontrol.toy_world import positive_share\n\n"
        "def reward(prompt, response):\n"
        "    return positive_share(prompt, response)\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = (
        "import sys\n"
        f"sys.path.insert(0, {str(package.parent)!r})\n"
        "from vllm_recontrol.training import label\n"
        f"label(data={str(data)!r}, reward_fn='team_rewards.scoring:reward', ray=True, "
        "replicas=2, ray_num_cpus=1, progress=False)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=400, cwd=elsewhere)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single = sorted((world["data"] / "labels" / "reward").glob("shard-*.jsonl"))
    assert len(single) == 6
    for path in single:
        assert (data / "labels" / "reward" / path.name).read_bytes() == path.read_bytes()


def share_judge(prompt: str, first: str, second: str) -> str:
    """An LLM judge stand-in that scores each answer as the reward function does (x 10), in
    the order it was shown them."""
    scores = (10 * toy_world.positive_share(prompt, answer) for answer in (first, second))
    return " ".join(f"{score:.6f}" for score in scores) + "\nreasons"


@pytest.fixture(scope="module")
def judge_url():
    with fake_judge(share_judge, model="share-judge") as server:
        yield server["url"]


def run_eval(world, trained, judge_url: str, out: Path, *extra: str) -> dict:
    """`vllm-recontrol eval` on 24 held-out prompts with every method, two value heads
    ("neg": the trained head with its output negated, i.e. steering to the other mood) and
    an LLM judge."""
    import torch

    neg_dir = world["root"] / "head-neg"
    if not neg_dir.exists():
        neg = ValueHead.load(trained["head"])
        with torch.no_grad():
            neg.layers[-1].weight.neg_()
            neg.layers[-1].bias.neg_()
        neg.save(neg_dir)
    engine = {**ENGINE_ARGS, "distributed_executor_backend": "uni"}
    run_cli("eval", "--model", str(world["model"]), "--value-head", str(trained["head"]),
            "--prompts", str(world["root"] / "eval.jsonl"),
            "--value-heads", json.dumps({"neg": str(neg_dir)}),
            "--reward-fn", "vllm_recontrol.toy_world:positive_share",
            "--grid", f"{ALPHA}:{STEPS},{ALPHA}:{STEPS}:neg",
            "--best-of", "3", "--control-best-of", "--system-prompt", "good",
            "--max-tokens", "16", "--max-prompts", "24", "--in-process",
            "--engine-args", json.dumps(engine), "--out", str(out),
            "--judge-url", judge_url, "--judge-model", "share-judge", *extra)
    return json.loads((out / "eval.json").read_text())


@pytest.fixture(scope="module")
def eval_report(world, trained, judge_url) -> dict:
    return run_eval(world, trained, judge_url, world["root"] / "eval")


def test_eval_command_compares_every_method(world, eval_report):
    """`vllm-recontrol eval` on held-out prompts: table, JSON and plots; control beats base.
    The negated head in the same engine lowers the reward: the grid's head choice reaches
    the rows."""
    out = world["root"] / "eval"
    report = eval_report
    methods = [(r["method"], r["head"]) for r in report["results"]]
    assert methods == [("base", "default"), ("re-control", "default"), ("re-control", "neg"),
                       ("best-of-3", "default"), ("re-control + best-of-3", "default"),
                       ("prompting", "default"), ("re-control + prompting", "default")]
    base, control, negated = report["results"][:3]
    print(f"eval rewards: base {base['reward']:.3f}, re-control {control['reward']:.3f}, "
          f"re-control with the negated head {negated['reward']:.3f}")
    assert control["reward"] > base["reward"] + 0.2
    assert negated["reward"] < base["reward"] - 0.1
    assert base["win_rate"] == 0.5 and control["win_rate"] > 0.5 > negated["win_rate"]
    # 95 % bootstrap intervals: base against itself is all ties; the control's gain is not
    # resampling noise
    assert base["win_rate_ci95"] == [0.5, 0.5]
    assert control["reward_ci95"][0] <= control["reward"] <= control["reward_ci95"][1]
    assert control["win_rate_ci95"][0] > 0.5 and negated["win_rate_ci95"][1] < 0.5
    assert control["gain_ci95"][0] > 0 > negated["gain_ci95"][1]  # paired with base's
    assert base["gain_ci95"] == [0.0, 0.0]
    assert len(control["rewards"]) == 24  # per prompt, for the user's own statistics
    bon, control_bon = report["results"][3:5]
    assert bon["generated_tokens"] > bon["delivered_tokens"]  # N samples paid, one delivered
    assert control_bon["generated_tokens"] > control_bon["delivered_tokens"]
    assert (control_bon["alpha"], control_bon["steps"], control_bon["n"]) == (ALPHA, STEPS, 3)
    assert control_bon["reward"] > bon["reward"]  # steered samples to choose from
    assert report["coherence"]["available"] is False and report["coherence"]["reason"]
    # The judge scores as the reward does, so its win rate against base is the reward's,
    # for every method: answers reach it cut as the reward saw them, and its scores are
    # mapped back through the order it was shown them.
    assert base["judge"] is None
    for row in report["results"][1:]:
        assert row["judge"]["invalid"] == 0 and len(row["judge"]["verdicts"]) == 24
        assert row["judge"]["win_rate"] == pytest.approx(row["win_rate"]), row["method"]
        assert row["judge"]["agrees_with_reward"] == 1.0, row["method"]
    table = (out / "eval.md").read_text()
    assert "| judge win vs. base |" in table
    assert "| re-control | default | 1 | 30 |" in table and "| re-control | neg | 1 | 30 |" in table
    assert (out / "grid.png").stat().st_size > 0 and (out / "reward_vs_throughput.png").is_file()
    # every returned response with its reward, methods in the table's order
    rows = read_responses(out)
    prompts = [json.loads(line)["prompt"]
               for line in (world["root"] / "eval.jsonl").read_text().splitlines()][:24]
    assert len(rows) == 7 * 24
    for i, method in enumerate(report["results"]):
        mine = rows[24 * i:24 * (i + 1)]
        assert {(r["method"], r["head"], r["alpha"], r["steps"], r["n"]) for r in mine} == \
            {(method["method"], method["head"], method["alpha"], method["steps"], method["n"])}
        assert [r["prompt_index"] for r in mine] == list(range(24))
        assert [r["prompt"] for r in mine] == prompts
        assert [r["reward"] for r in mine] == method["rewards"]
        assert [r["response"] for r in mine][:5] == method["examples"]


def test_eval_on_ray_replicas_gives_the_single_engines_results(world, trained, eval_report,
                                                               judge_url, tmp_path):
    """`eval --ray --replicas 2 --reward-replicas 2`: two engines in Ray actors, 12 prompts
    each, with the single engine's per-prompt seeds, and the reward on two more actors, each
    scoring half of every method's responses: every method's responses and rewards are the
    single engine's (greedy, Best-of-N sampling, control with either head, prompting)."""
    pytest.importorskip("ray")
    report = run_eval(world, trained, judge_url, tmp_path / "eval-ray", "--ray",
                      "--replicas", "2", "--ray-num-cpus", "1",
                      "--reward-replicas", "2", "--reward-num-cpus", "0")
    assert report["options"]["replicas"] == 2 and report["num_prompts"] == 24
    assert report["options"]["reward_replicas"] == 2
    assert len(report["results"]) == len(eval_report["results"]) == 7
    for ray_row, one_row in zip(report["results"], eval_report["results"]):
        for key in ("method", "head", "alpha", "steps", "n", "rewards", "generated_tokens",
                    "delivered_tokens", "examples"):
            assert ray_row[key] == one_row[key], (one_row["method"], key)
    assert read_responses(tmp_path / "eval-ray") == read_responses(world["root"] / "eval")


def test_eval_tuned_on_held_out_prompts_runs_the_chosen_point_as_the_whole_run_did(
        world, trained, eval_report, tmp_path):
    """`eval --tune-holdout 8`: the grid (the trained head and its negation) runs on 8 of
    the 24 prompts, the trained head is chosen there, and base, that point and Best-of-3
    run on the other 16 in the same engine. Every row, on either side (Best-of-N's sampled
    ones too), is the untuned run's row for that prompt: a held-out prompt keeps its seed."""
    from vllm_recontrol.evaluation.selection import hold_out

    out = tmp_path / "tuned"
    engine = {**ENGINE_ARGS, "distributed_executor_backend": "uni"}
    run_cli("eval", "--model", str(world["model"]), "--value-head", str(trained["head"]),
            "--prompts", str(world["root"] / "eval.jsonl"),
            "--value-heads", json.dumps({"neg": str(world["root"] / "head-neg")}),
            "--reward-fn", "vllm_recontrol.toy_world:positive_share",
            "--grid", f"{ALPHA}:{STEPS},{ALPHA}:{STEPS}:neg", "--best-of", "3",
            "--system-prompt", "", "--max-tokens", "16", "--max-prompts", "24",
            "--tune-holdout", "8", "--in-process", "--no-progress",
            "--engine-args", json.dumps(engine), "--out", str(out))
    report = json.loads((out / "eval.json").read_text())
    kept, tuning = hold_out(24, 8, seed=0)
    assert report["selection"]["chosen"]["head"] == "default"
    assert report["prompt_numbers"] == kept
    assert [(r["method"], r["head"]) for r in report["results"]] == [
        ("base", "default"), ("re-control", "default"), ("best-of-3", "default")]
    whole = {(r["method"], r["head"], r["prompt_index"]): r
             for r in read_responses(world["root"] / "eval")}
    for folder, numbers, rows in ((out, kept, 3), (out / "tune", tuning, 3)):
        mine = read_responses(folder)
        assert len(mine) == rows * len(numbers)
        assert {r["prompt_index"] for r in mine} == set(numbers)
        for r in mine:
            theirs = whole[(r["method"], r["head"], r["prompt_index"])]
            assert (r["prompt"], r["response"], r["reward"]) == \
                (theirs["prompt"], theirs["response"], theirs["reward"]), r["method"]


@pytest.fixture(scope="module")
def tiny_rm(world) -> Path:
    """A random 1-layer Llama sequence classifier with the toy LM's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    rm = world["root"] / "rm"
    tokenizer = AutoTokenizer.from_pretrained(world["model"])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         num_labels=1, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(str(rm))
    tokenizer.save_pretrained(str(rm))
    return rm


def test_vllm_reward_model_labels_match_transformers(world, tiny_rm):
    """``label --rm-engine vllm`` (pooling runner, classify, activation off) gives the scores
    transformers gives for the same token ids."""
    rm = tiny_rm
    engine = {"enforce_eager": True, "kv_cache_memory_bytes": 64 << 20}
    out = run_cli("label", "--data", str(world["data"]), "--reward-model", str(rm),
                  "--rm-engine", "vllm", "--in-process", "--engine-args", json.dumps(engine),
                  "--name", "rm-vllm", "--no-progress")
    assert "shards labelled now" in out
    label(data=str(world["data"]), reward_model=str(rm), name="rm-hf", batch_size=32,
          progress=False)
    rewards = {}
    for name in ("rm-vllm", "rm-hf"):
        rows = []
        for path in sorted((world["data"] / "labels" / name).glob("shard-*.jsonl")):
            rows += [json.loads(line) for line in path.read_text().splitlines()]
        rewards[name] = {row["response_id"]: row["reward"] for row in rows}
    assert len(rewards["rm-hf"]) == 600 and rewards["rm-vllm"].keys() == rewards["rm-hf"].keys()
    assert len({round(r, 5) for r in rewards["rm-hf"].values()}) > 100  # really scored
    worst = max(abs(rewards["rm-vllm"][k] - v) for k, v in rewards["rm-hf"].items())
    assert worst < 1e-4, worst


def test_eval_scores_with_a_vllm_reward_model_as_with_transformers(world, trained, tiny_rm,
                                                                   tmp_path):
    """``eval --rm-engine vllm``: the reward model in vLLM's pooling runner beside the
    generation engine gives each prompt the reward transformers gives the same responses
    (every returned response, read back from responses.jsonl, rescored here)."""
    engine = {**ENGINE_ARGS, "distributed_executor_backend": "uni"}
    out = tmp_path / "vllm"
    run_cli("eval", "--model", str(world["model"]), "--value-head", str(trained["head"]),
            "--prompts", str(world["root"] / "eval.jsonl"), "--reward-model", str(tiny_rm),
            "--rm-engine", "vllm", "--rm-engine-args",
            json.dumps({"enforce_eager": True, "kv_cache_memory_bytes": 32 << 20}),
            "--grid", f"{ALPHA}:{STEPS}", "--best-of", "--system-prompt", "",
            "--max-tokens", "16", "--max-prompts", "12", "--in-process",
            "--engine-args", json.dumps(engine), "--out", str(out))
    report = json.loads((out / "eval.json").read_text())["results"]
    rows = read_responses(out)
    assert [r["method"] for r in report] == ["base", "re-control"]  # "--best-of": none
    assert len(rows) == 2 * 12
    transformers_rewards = RewardSource(reward_model=str(tiny_rm), command="eval").score(
        [(row["prompt"], row["response"]) for row in rows])
    for i, method in enumerate(report):
        mine = rows[12 * i:12 * (i + 1)]
        assert [row["reward"] for row in mine] == method["rewards"]
        assert len({round(r, 5) for r in method["rewards"]}) > 3  # really scored
        worst = max(abs(a - b) for a, b in zip(method["rewards"],
                                               transformers_rewards[12 * i:12 * (i + 1)]))
        assert worst < 1e-4, (method["method"], worst)


def read_responses(out: Path) -> list[dict]:
    """eval's responses.jsonl, one dict per (method, prompt)."""
    return read_jsonl(out / "responses.jsonl")
