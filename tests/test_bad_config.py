"""Bad engine configuration fails in the front-end, before any engine process starts."""

from __future__ import annotations


import pytest
from vllm.engine.arg_utils import EngineArgs

from engine_helpers import ENGINE_KWARGS, start_llm
from vllm_recontrol import ConfigError, ValueHead, ValueHeadError


def engine_config(model_dir, additional_config):
    args = EngineArgs(model=str(model_dir), model_impl="recontrol",
                      additional_config=additional_config, **ENGINE_KWARGS)
    return args.create_engine_config()


@pytest.fixture
def corrupt_head(tmp_path, head_dir):
    path = tmp_path / "corrupt"
    path.mkdir()
    (path / "config.json").write_text((head_dir / "config.json").read_text())
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    return path


@pytest.fixture
def narrow_head(tmp_path):
    return ValueHead(32, [16], seed=0).save(tmp_path / "narrow")


def test_missing_recontrol_section(llama_dir):
    with pytest.raises(ConfigError, match="needs additional_config"):
        engine_config(llama_dir, {})


def test_a_misspelled_section_is_named(llama_dir):
    with pytest.raises(ConfigError, match=r"it has \['recontorl'\]; did you mean 'recontrol'"):
        engine_config(llama_dir, {"recontorl": {"value_head": "x"}})


@pytest.mark.parametrize("model_impl", ["auto", "vllm"])
def test_a_recontrol_section_without_the_model_impl_is_refused(llama_dir, head_dir, model_impl):
    """Stock vLLM would run, ignoring the section and every request's recontrol_* keys: a
    user who wrote the section meant control, so the missing flag is named instead."""
    args = EngineArgs(model=str(llama_dir), model_impl=model_impl,
                      additional_config={"recontrol": {"value_head": str(head_dir)}},
                      **ENGINE_KWARGS)
    with pytest.raises(ConfigError, match=f"model_impl is '{model_impl}'.*--model-impl recontrol"):
        args.create_engine_config()
    other = EngineArgs(model=str(llama_dir), model_impl=model_impl,
                       additional_config={"something_else": 1}, **ENGINE_KWARGS)
    assert not other.create_engine_config().model_config.logits_processors  # untouched


def test_no_value_head(llama_dir):
    with pytest.raises(ConfigError, match=r'\["value_head"\] is required'):
        engine_config(llama_dir, {"recontrol": {"alpha": 0.5}})


def test_missing_path(llama_dir, tmp_path):
    with pytest.raises(ValueHeadError, match="does not exist"):
        engine_config(llama_dir, {"recontrol": {"value_head": str(tmp_path / "nope")}})


def test_dimension_mismatch_names_both_sizes(llama_dir, narrow_head):
    with pytest.raises(ValueHeadError, match="hidden_size 32 but the model's states are 64 wide"):
        engine_config(llama_dir, {"recontrol": {"value_head": str(narrow_head)}})


def test_corrupt_safetensors_names_the_file(llama_dir, corrupt_head):
    with pytest.raises(ValueHeadError, match="model.safetensors cannot be read as safetensors"):
        engine_config(llama_dir, {"recontrol": {"value_head": str(corrupt_head)}})


@pytest.mark.parametrize("key, value, message", [
    ("alpha", "strong", "alpha.* must be a number"),
    ("alpha", -0.5, "alpha.* must be a finite number >= 0"),
    ("steps", 1.5, "steps.* must be an integer"),
    ("steps", 500, "exceeds max_steps"),
    ("max_norm", 0, "max_norm.* must be a finite number > 0"),
    ("default_on", "maybe", "default_on.* must be 0 or 1"),
    ("backend", "cuda-magic", "backend.* must be one of"),
    ("alhpa", 0.5, "unknown key"),
])
def test_bad_engine_values(llama_dir, head_dir, key, value, message):
    with pytest.raises(ConfigError, match=message):
        engine_config(llama_dir, {"recontrol": {"value_head": str(head_dir), key: value}})


@pytest.mark.parametrize("widths, keys, message", [
    ([48, 32], {"precision": "bf16"}, r'\["precision"\]: precision .bf16. needs the triton'),
    ([], {"ascent_form": "gram"}, r'\["ascent_form"\]: the Gram ascent form needs a value '
                                  "head with a hidden layer"),
    ([8, 8, 8, 8], {"backend": "triton"}, r'\["backend"\]: the triton backend was requested '
                                          r"but cannot run here: .*4 hidden layer"),
])
def test_an_ascent_the_head_cannot_run_is_refused_in_the_front_end(llama_dir, tmp_path,
                                                                  widths, keys, message):
    """Backend, precision and form against each head: the worker refused them, deep in a
    226-line start-up failure; on a CPU platform the front-end now says it in one line."""
    head = ValueHead(64, widths, seed=0).save(tmp_path / "head")
    with pytest.raises(ConfigError, match=message):
        engine_config(llama_dir, {"recontrol": {"value_head": str(head), **keys}})


def test_an_ascent_only_a_further_head_cannot_run_names_that_head(llama_dir, head_dir,
                                                                   tmp_path):
    """Only the form depends on the head; engine-wide refusals (the precision here) name
    no head."""
    linear = ValueHead(64, [], seed=0).save(tmp_path / "linear")
    with pytest.raises(ConfigError, match=r'^additional_config\["recontrol"\]\["ascent_form"\]: '
                                          r"the Gram ascent form needs a value head with a "
                                          r"hidden layer \(value head 'plain'\)$"):
        engine_config(llama_dir, {"recontrol": {"value_head": str(head_dir),
                                                "ascent_form": "gram",
                                                "value_heads": {"plain": str(linear)}}})
    with pytest.raises(ConfigError, match=r'^additional_config\["recontrol"\]\["precision"\]'
                                          r"(?!.*value head)"):
        engine_config(llama_dir, {"recontrol": {"value_head": str(head_dir), "precision": "bf16",
                                                "value_heads": {"plain": str(linear)}}})


def test_a_bad_further_head_is_named(llama_dir, head_dir, narrow_head, tmp_path):
    for path, message in [(narrow_head, "states are 64 wide"), (tmp_path / "nope", "does not exist")]:
        with pytest.raises(ValueHeadError,
                           match=r'\["value_heads"\]\["safe"\]: .*' + message):
            engine_config(llama_dir, {"recontrol": {"value_head": str(head_dir),
                                                    "value_heads": {"safe": str(path)}}})


def test_valid_config_with_further_heads_names_them_in_the_tracker(llama_dir, head_dir,
                                                                   head1_dir):
    config = engine_config(llama_dir, {"recontrol": {"value_head": str(head_dir),
                                                     "value_heads": {"one": str(head1_dir)}}})
    (tracker,) = config.model_config.logits_processors
    assert tracker == ("vllm_recontrol._vllm_adapter:RecontrolRowTracker_max200_heads_"
                       + "default,one".encode().hex())


def test_llm_constructor_reports_the_same_error(llama_dir, narrow_head):
    """What a Python user sees: the error comes out of LLM(...) itself, not from a child."""
    with pytest.raises(ValueHeadError, match="states are 64 wide"):
        start_llm(llama_dir, {"value_head": str(narrow_head)})


def test_valid_config_installs_the_row_tracker(llama_dir, head_dir):
    config = engine_config(llama_dir, {"recontrol": {"value_head": str(head_dir),
                                                     "max_steps": 77}})
    assert config.model_config.logits_processors == [
        "vllm_recontrol._vllm_adapter:RecontrolRowTracker_max77"]
    assert not config.use_v2_model_runner


def test_plain_engine_is_untouched(llama_dir):
    args = EngineArgs(model=str(llama_dir), **ENGINE_KWARGS)
    assert not args.create_engine_config().model_config.logits_processors


def test_the_v1_runner_is_chosen_per_engine_not_for_the_process(llama_dir, head_dir,
                                                                monkeypatch):
    """Where vLLM would pick its V2 runner (here forced by the variable, as on a GPU by
    default) a RE-Control engine still gets V1, and a plain engine created after it in the
    same process still gets vLLM's own choice: nothing is written to the environment."""
    import os

    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    plain = EngineArgs(model=str(llama_dir), **ENGINE_KWARGS).create_engine_config()
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")  # (this CPU build cannot run V2)
    config = engine_config(llama_dir, {"recontrol": {"value_head": str(head_dir)}})
    assert not config.use_v2_model_runner
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "1"
    assert plain.use_v2_model_runner  # vLLM reads its choice when asked: still its own


def test_a_head_trained_on_another_model_is_a_warning(llama_dir, tmp_path, caplog):
    """Same width, other model: the hidden-size check cannot tell; the recorded base_model
    can. Starting is still allowed (paths and names of one model differ)."""
    from vllm_recontrol._vllm_adapter import logger

    foreign = ValueHead(64, [16], seed=0, base_model="meta-llama/Llama-2-7b-hf").save(
        tmp_path / "foreign")
    own = ValueHead(64, [16], seed=0, base_model=f"/elsewhere/{llama_dir.name}").save(
        tmp_path / "own")
    caplog.set_level("WARNING", logger=logger.name)
    engine_config(llama_dir, {"recontrol": {"value_head": str(own),
                                            "value_heads": {"foreign": str(foreign)}}})
    warnings = [r.getMessage() for r in caplog.records if "trained on the states" in r.getMessage()]
    assert len(warnings) == 1 and "value head 'foreign'" in warnings[0]
    assert "'meta-llama/Llama-2-7b-hf'" in warnings[0] and str(llama_dir) in warnings[0]


def test_serve_says_a_refused_configuration_in_one_line(llama_dir, tmp_path):
    """`vllm-recontrol serve` with a head that is not there: our message on stderr, exit
    status 1, no Python traceback around it (vLLM's own log lines stay)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    command = [str(Path(sys.executable).parent / "vllm-recontrol"), "serve", str(llama_dir),
               "--model-impl", "recontrol", "--additional-config",
               json.dumps({"recontrol": {"value_head": str(tmp_path / "nope")}})]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1] == (
        f"vllm-recontrol serve: error: value head folder {tmp_path / 'nope'} does not exist")
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("plugins, argv, refused", [
    ("lora_filesystem_resolver", ["serve", "m", "--model-impl", "recontrol"], True),
    ("", ["serve", "m", "--model-impl=recontrol"], True),
    ("recontrol ,other", ["serve", "m", "--model_impl", "recontrol"], True),  # vLLM: exact
    ("other,recontrol", ["serve", "m", "--model-impl", "recontrol"], False),
    (None, ["serve", "m", "--model-impl", "recontrol"], False),  # unset: every plugin
    ("lora_filesystem_resolver", ["serve", "m"], False),  # a stock engine: not ours to say
])
def test_serve_refuses_a_plugin_list_that_leaves_recontrol_out(monkeypatch, capsys, plugins,
                                                              argv, refused):
    """vLLM takes an unknown --model-impl for its own: without the plugin the server would
    answer every request unedited (and invalid values with 200), without a word."""
    from vllm_recontrol import _vllm_adapter

    if plugins is None:
        monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    else:
        monkeypatch.setenv("VLLM_PLUGINS", plugins)
    ran = []
    monkeypatch.setattr("vllm.entrypoints.cli.main.main", lambda: ran.append(True))
    status = _vllm_adapter.run_vllm_cli(argv)
    if refused:
        assert status == 1 and not ran
        assert capsys.readouterr().err.strip() == (
            f"vllm-recontrol serve: error: VLLM_PLUGINS={plugins!r} does not list "
            "'recontrol', so vLLM would not load vllm-recontrol and would serve --model-impl "
            "recontrol unedited; add 'recontrol' to it (comma-separated) or unset it")
    else:
        assert ran


def test_a_worker_without_the_plugin_refuses_to_build_the_engine(monkeypatch):
    """The front-end ran the hooks (it added the row tracker) but a worker did not load the
    plugin: it would build vLLM's own logits layer and edit nothing."""
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.plugins import load_general_plugins

    from vllm_recontrol import _vllm_adapter

    load_general_plugins()  # as every vLLM process does (VLLM_PLUGINS unset: ours loads)
    _vllm_adapter._require_plugin_in_worker()
    monkeypatch.delitem(op_registry_oot, "LogitsProcessor")
    with pytest.raises(ConfigError, match="plugin did not load in this engine's worker "
                                          "process.*VLLM_PLUGINS .* must include 'recontrol'"):
        _vllm_adapter._require_plugin_in_worker()


def test_an_architecture_only_auto_would_serve_is_refused_naming_the_switch(tmp_path,
                                                                           head_dir):
    """BioGpt has no vLLM implementation: auto falls back to the Transformers backend,
    --model-impl recontrol cannot; vLLM's refusal listed hundreds of names and called the
    model unsupported, not saying the switch was why. A misspelt architecture, which auto
    refuses too, keeps vLLM's message."""
    import json

    from transformers import BioGptConfig, BioGptForCausalLM

    from vllm_recontrol.toy import build_tokenizer

    model = tmp_path / "biogpt"
    tokenizer = build_tokenizer(model)
    BioGptForCausalLM(BioGptConfig(vocab_size=len(tokenizer), hidden_size=64,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=128)).save_pretrained(model)
    with pytest.raises(ConfigError, match=r"^--model-impl recontrol: vLLM has no "
                                          r"implementation of \['BioGptForCausalLM'\]; with "
                                          r"--model-impl auto it would fall back") as caught:
        engine_config(model, {"recontrol": {"value_head": str(head_dir)}})
    assert len(str(caught.value)) < 400
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config,
                                                   "architectures": ["BioGptForCausalLMTypo"]}))
    with pytest.raises(ValueError, match="are not supported for now") as caught:  # vLLM's own
        engine_config(model, {"recontrol": {"value_head": str(head_dir)}})
    assert not isinstance(caught.value, ConfigError)  # auto would refuse it too


def test_sleep_mode_is_refused(llama_dir, head_dir, monkeypatch):
    """Sleep level 2 discards the value heads' weights with the model's and vLLM reloads
    only the model's on wake-up: refused in the front-end, naming why. (vLLM itself refuses
    sleep mode on a CPU platform first, so the platform is told it has it here.)"""
    from vllm.platforms import current_platform

    monkeypatch.setattr(current_platform, "is_sleep_mode_available", lambda: True)
    args = EngineArgs(model=str(llama_dir), model_impl="recontrol", enable_sleep_mode=True,
                      additional_config={"recontrol": {"value_head": str(head_dir)}},
                      **ENGINE_KWARGS)
    with pytest.raises(ConfigError, match="does not support sleep mode.*discards the value "
                                          "heads' weights.*without --enable-sleep-mode"):
        args.create_engine_config()
    plain = EngineArgs(model=str(llama_dir), enable_sleep_mode=True, **ENGINE_KWARGS)
    assert plain.create_engine_config().model_config.enable_sleep_mode  # stock: vLLM's call
