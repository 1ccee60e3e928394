"""`vllm-recontrol inspect`: the engine's checks on value heads, without an engine."""

from __future__ import annotations

import json
import shutil

import pytest

from training_fakes import fake_collect, good_reward
from vllm_recontrol import ValueHead
from vllm_recontrol.cli import main as cli
from vllm_recontrol.package_versions import package_versions
from vllm_recontrol.training import label, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A head made by `train` on a fake collection of an 8-wide model (its config.json)."""
    root = tmp_path_factory.mktemp("inspect")
    data = fake_collect(root, count=24, shard_size=12)[0]
    label(data=str(data), reward_fn=good_reward, progress=False)
    train(data=str(data), out=str(root / "head"), target="mc", epochs=2, batch_size=16,
          widths=[8], device="cpu", progress=False)
    return {"head": root / "head", "model": root / "fake-model", "root": root}


def test_a_trained_head_is_usable_and_reports_its_training(trained, capsys):
    """The fixture's head (2 epochs, 24 prompts, 2 held out) loads, and its weak metrics
    are said: worse than a constant, V(s_0) anti-correlated on 2 held-out prompts."""
    assert cli(["inspect", str(trained["head"]), "--model", str(trained["model"])]) == 0
    out = capsys.readouterr().out
    assert f"value head {trained['head']}: usable with {trained['model']}" in out
    for row in ("| hidden_size ", "| widths ", "| target ", "| pearson_s0 ", "| epochs_run ",
                "| metrics_prompts "):
        assert row in out
    assert "| prompt_format " in out and "| chat_template " in out
    metadata = ValueHead.load(trained["head"]).metadata
    # how the prompts were written, and the versions that collected and trained, recorded
    assert (metadata["data"]["prompt_format"], metadata["data"]["chat_template"]) == (
        "auto", False)
    assert metadata["data"]["collected_with"] == metadata["trained_with"] == package_versions()
    metrics = metadata["metrics"]
    assert metrics["prompts"] == 2 and metrics["mse"] >= metrics["trivial_mse"]
    assert "warning: the head predicts the reward no better than a constant" in out
    assert "warning: the held-out metrics rest on 2 prompt(s)" in out
    assert ("warning: V(s_0) does not rise with the reward" in out) == (
        metrics["pearson_s0"] <= 0)


@pytest.mark.parametrize("metrics,expected", [
    ({"mse": 0.1, "trivial_mse": 0.2, "pearson_s0": 0.6, "prompts": 50}, []),
    ({"mse": 0.2, "trivial_mse": 0.2, "pearson_s0": 0.6, "prompts": 50}, ["no better than"]),
    ({"mse": 0.1, "trivial_mse": 0.2, "pearson_s0": 0.0, "prompts": 50}, ["does not rise"]),
    ({"mse": 0.1, "trivial_mse": 0.2, "pearson_s0": 0.6, "prompts": 19}, ["rest on 19"]),
    ({"mse": 0.1, "trivial_mse": 0.2, "pearson_s0": 0.6}, []),  # heads trained before prompts
    ({"mse": "x", "trivial_mse": None, "pearson_s0": float("nan"), "prompts": True}, []),
    ({"split": "train (no held-out split)", "mse": 1.0, "trivial_mse": 0.5},
     ["(train (no held-out split) MSE"]),
])
def test_quality_warnings_name_each_weakness(metrics, expected):
    from vllm_recontrol.training.head_quality import quality_warnings

    warnings = quality_warnings(metrics)
    assert len(warnings) == len(expected), warnings
    for warning, words in zip(warnings, expected):
        assert words in warning


def test_json_reports_and_errors(trained, tmp_path, capsys):
    wide = ValueHead(64, [4], seed=0).save(tmp_path / "wide")
    status = cli(["inspect", str(trained["head"]), str(wide), "--model", str(trained["model"]),
                  "--json"])
    assert status == 1  # one of the two would be refused
    first, second = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert first["hidden_size"] == 8 and first["target"] == "mc"
    assert any("rest on 2 prompt(s)" in w for w in first["warnings"])  # the fixture's is weak
    assert first["base_model"] == str(trained["model"])
    assert "hidden_size 64 but the model's states are 8 wide" in second["error"]


def test_a_head_that_cannot_be_looked_at_is_an_error_and_the_next_one_is_inspected(
        trained, tmp_path, capsys):
    """An OSError looking at a head's files (a folder the user may not search; here a path
    past PATH_MAX) stopped `inspect` with a traceback before the next head."""
    folder = tmp_path
    while len(str(folder)) < 4080 - 200:
        folder = folder / ("d" * 200)
    folder = folder / ("h" * (4085 - len(str(folder)) - 1))
    folder.mkdir(parents=True)
    assert cli(["inspect", str(folder), str(trained["head"])]) == 1
    out = capsys.readouterr().out
    assert "config.json cannot be looked at (File name too long)" in out
    assert out.count("error:") == 1 and str(trained["head"]) in out


def test_a_head_of_another_model_is_a_warning(trained, tmp_path, capsys):
    other = tmp_path / "other-model"
    shutil.copytree(trained["model"], other)  # same width, another name
    assert cli(["inspect", str(trained["head"]), "--model", str(other)]) == 0
    assert "warning: it was trained on the states of" in capsys.readouterr().out


def test_damaged_heads_and_unreadable_models_are_errors(trained, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(trained["head"], damaged)
    (damaged / "model.safetensors").write_bytes(b"\0" * 40)
    assert cli(["inspect", str(damaged)]) == 1
    assert "model.safetensors" in capsys.readouterr().out
    assert cli(["inspect", str(trained["head"]), "--model", str(tmp_path / "nothing")]) == 1
    assert "cannot read the configuration of model" in capsys.readouterr().out
    bare = ValueHead(8, [4], seed=0).save(tmp_path / "bare")
    assert cli(["inspect", str(bare)]) == 0
    out = capsys.readouterr().out
    assert "warning: no base_model recorded" in out and "warning: no training metrics" in out


def test_free_form_metadata_and_a_mistyped_model_config(trained, tmp_path, capsys):
    """metadata is free-form: parts of another shape are skipped, not a traceback; a model
    config.json with a field of the wrong type is an error naming the model."""
    odd = ValueHead(8, [4], seed=0, metadata={"metrics": "abc", "data": [1, 2]}).save(
        tmp_path / "odd")
    assert cli(["inspect", str(odd)]) == 0
    assert "warning: no training metrics" in capsys.readouterr().out
    model = tmp_path / "mistyped-model"
    shutil.copytree(trained["model"], model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "hidden_size": "big"}))
    assert cli(["inspect", str(odd), "--model", str(model)]) == 1
    assert f"cannot read the configuration of model '{model}'" in capsys.readouterr().out


def _with_metadata(tmp_path, name, metadata_json):
    """A head saved, then its config.json's metadata replaced by hand-written JSON."""
    folder = ValueHead(8, [4], seed=0, base_model="m").save(tmp_path / name)
    text = (folder / "config.json").read_text()
    config = json.loads(text)
    config["metadata"] = "@METADATA@"
    (folder / "config.json").write_text(json.dumps(config).replace('"@METADATA@"', metadata_json))
    return folder


@pytest.mark.parametrize("metrics", [
    '{"split": ["heldout"], "mse": 2.0, "trivial_mse": 1.0}',
    '{"split": {"name": "heldout"}, "pearson_s0": -0.5}',
    '{"pearson_s0": 1' + "0" * 400 + ', "mse": -1' + "0" * 400 + ', "trivial_mse": 1}',
    '{"mse": "high", "trivial_mse": [1], "pearson_s0": null, "prompts": "many"}',
])
def test_metrics_of_odd_types_are_skipped_not_a_traceback(tmp_path, capsys, metrics):
    """Hand-written metadata may hold anything JSON does: a list or object as the split was
    an unhashable TypeError, a 401-digit pearson_s0 an OverflowError."""
    folder = _with_metadata(tmp_path, "odd", '{"metrics": %s}' % metrics)
    assert cli(["inspect", str(folder)]) == 0
    assert "Traceback" not in capsys.readouterr().out
    assert cli(["inspect", "--json", str(folder)]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == str(folder)


def test_an_odd_split_is_not_named_as_held_out(tmp_path):
    from vllm_recontrol.inspect_head import inspect_head

    folder = _with_metadata(tmp_path, "odd", '{"metrics": {"split": [1], "pearson_s0": -0.5}}')
    warnings = inspect_head(folder)["warnings"]
    assert any("(recorded Pearson r = -0.5)" in w for w in warnings), warnings


def test_a_config_integer_past_pythons_digit_limit_is_a_head_error(tmp_path, capsys):
    """json.loads refuses integers of more than 4300 digits with a plain ValueError."""
    folder = _with_metadata(tmp_path, "huge", '{"metrics": {"prompts": 1' + "0" * 5000 + "}}")
    assert cli(["inspect", str(folder)]) == 1
    assert "is not valid JSON" in capsys.readouterr().out
