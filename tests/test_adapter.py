"""The vLLM adapter: idempotent registration, zero-cost pass-through, version gate."""

from __future__ import annotations

import re

import pytest
import vllm
from vllm.config import set_current_vllm_config
from vllm.engine.arg_utils import EngineArgs
from vllm.model_executor.custom_op import op_registry_oot
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.sampling_params import SamplingParams

from engine_helpers import ENGINE_KWARGS
from vllm_recontrol import ConfigError, VersionError, _vllm_adapter
from vllm_recontrol.plugin import register


def config_for(model_dir, recontrol=None):
    extra = {} if recontrol is None else dict(model_impl="recontrol",
                                              additional_config={"recontrol": recontrol})
    return EngineArgs(model=str(model_dir), **ENGINE_KWARGS, **extra).create_engine_config()


def test_register_is_idempotent():
    register()
    _vllm_adapter.install()
    _vllm_adapter.install()
    assert op_registry_oot["LogitsProcessor"].__name__ == "RecontrolLogitsProcessor"
    wrapped = EngineArgs.create_engine_config
    assert wrapped._recontrol_wrapped
    assert not getattr(wrapped.__wrapped__, "_recontrol_wrapped", False)  # wrapped once
    assert _vllm_adapter._install_errors == []


def test_layer_is_vllms_own_class_without_recontrol(llama_dir):
    with set_current_vllm_config(config_for(llama_dir)):
        layer = LogitsProcessor(100)
    assert type(layer) is LogitsProcessor


def test_layer_edits_in_a_recontrol_engine(llama_dir, head_dir):
    with set_current_vllm_config(config_for(llama_dir, {"value_head": str(head_dir)})):
        layer = LogitsProcessor(100)
    assert type(layer).__name__ == "RecontrolLogitsProcessor"
    assert layer._recontrol.heads["default"].widths == [48, 32]
    assert not any("value" in name or "head" in name for name, _ in layer.named_parameters())


def test_layer_refuses_to_run_silently_without_the_row_tracker(llama_dir, head_dir):
    """If the front-end hook did not run, no request could be tracked: fail, never ignore."""
    config = config_for(llama_dir, {"value_head": str(head_dir)})
    config.model_config.logits_processors = []
    with set_current_vllm_config(config), pytest.raises(ConfigError, match="hook did not run"):
        LogitsProcessor(100)


def test_tracker_class_carries_max_steps_and_validates():
    tracker = _vllm_adapter.RecontrolRowTracker_max12
    assert tracker.max_steps == 12 and tracker.__name__ == "RecontrolRowTracker_max12"
    tracker.validate_params(SamplingParams(extra_args={"recontrol_steps": 12}))
    with pytest.raises(ValueError, match="exceeds this engine's max_steps = 12"):
        tracker.validate_params(SamplingParams(extra_args={"recontrol_steps": 13}))


def test_tracker_class_carries_the_head_names():
    name = _vllm_adapter._tracker_name(12, ("default", "kind-2", "safe"))
    tracker = getattr(_vllm_adapter, name)
    assert tracker.__name__ == name and name.isidentifier()
    assert tracker.max_steps == 12 and tracker.heads == ("default", "kind-2", "safe")
    tracker.validate_params(SamplingParams(extra_args={"recontrol_head": "kind-2"}))
    with pytest.raises(ValueError, match="'unsafe' is not one of this engine's value heads"):
        tracker.validate_params(SamplingParams(extra_args={"recontrol_head": "unsafe"}))
    with pytest.raises(ValueError, match="is not one of"):  # one head: only "default"
        _vllm_adapter.RecontrolRowTracker_max12.validate_params(
            SamplingParams(extra_args={"recontrol_head": "safe"}))


def test_untested_vllm_version_is_refused_clearly(llama_dir, head_dir, monkeypatch):
    monkeypatch.setattr(vllm, "__version__", "0.40.1")
    monkeypatch.delenv(_vllm_adapter.ALLOW_UNTESTED_ENV, raising=False)
    with pytest.raises(VersionError, match=r"tested with vLLM 0\.32\.0, but vLLM 0\.40\.1"):
        config_for(llama_dir, {"value_head": str(head_dir)})
    config_for(llama_dir)  # engines without RE-Control are not affected
    monkeypatch.setenv(_vllm_adapter.ALLOW_UNTESTED_ENV, "1")
    config_for(llama_dir, {"value_head": str(head_dir)})


def test_cpu_build_version_suffix_is_accepted(monkeypatch):
    monkeypatch.setattr(vllm, "__version__", "0.32.0+cpu")
    _vllm_adapter.check_vllm_version()


@pytest.mark.parametrize("version", ["0.32.1", "0.32.0rc1", "0.32.0.dev5+gabc", "0.32.1+cpu"])
def test_only_the_tested_release_is_accepted(monkeypatch, version):
    """A patch release, a release candidate or a development build may change the private
    methods this module patches: refused (the override still lets one be tried)."""
    monkeypatch.setattr(vllm, "__version__", version)
    monkeypatch.delenv(_vllm_adapter.ALLOW_UNTESTED_ENV, raising=False)
    with pytest.raises(VersionError, match=f"tested with vLLM 0.32.0, but vLLM {re.escape(version)} "):
        _vllm_adapter.check_vllm_version()
    monkeypatch.setenv(_vllm_adapter.ALLOW_UNTESTED_ENV, "1")
    _vllm_adapter.check_vllm_version()


def test_version_flag_names_both_versions_and_whether_vllm_is_tested(monkeypatch, capsys):
    from vllm_recontrol import __version__
    from vllm_recontrol.cli import main

    monkeypatch.setattr(vllm, "__version__", "0.32.0+cpu")
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"vllm-recontrol {__version__} | vLLM 0.32.0+cpu (tested)\n"
    for untested in ("0.33.0", "0.32.1"):
        monkeypatch.setattr(vllm, "__version__", untested)
        main(["--version"])
        assert f"vLLM {untested} (untested: this release was tested with 0.32.0)" in \
            capsys.readouterr().out


@pytest.mark.parametrize("value, seconds", [(None, 10.0), ("2.5", 2.5), ("0", 10.0),
                                            ("-3", 10.0)])
def test_edit_statistics_keep_vllms_stats_interval(monkeypatch, value, seconds):
    """The controller's statistics line follows VLLM_LOG_STATS_INTERVAL as vLLM reads it:
    a zero or negative value is vLLM's default of 10 s (the plugin used to parse it itself
    and log at every sampling call with 0)."""
    import vllm.envs as envs

    from vllm_recontrol._vllm_adapter import stats_log_interval

    envs.disable_envs_cache()  # an engine started earlier in this process may have cached it
    if value is None:
        monkeypatch.delenv("VLLM_LOG_STATS_INTERVAL", raising=False)
    else:
        monkeypatch.setenv("VLLM_LOG_STATS_INTERVAL", value)
    assert stats_log_interval() == seconds


def test_batch_invariant_follows_vllm_unless_the_key_says(monkeypatch):
    from vllm_recontrol._vllm_adapter import resolve_batch_invariant
    from vllm_recontrol.config import EngineSettings

    auto = EngineSettings(value_head="h")
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "1")
    assert resolve_batch_invariant(auto) is True
    assert resolve_batch_invariant(EngineSettings(value_head="h", batch_invariant=False)) is False
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "0")
    assert resolve_batch_invariant(auto) is False
    assert resolve_batch_invariant(EngineSettings(value_head="h", batch_invariant=True)) is True


def test_output_token_ids_are_not_asked_for_the_tracker_alone():
    """vLLM's batch fetches output token ids for any custom logits processor (under async
    scheduling a host wait per step); the tracker reads none, so a batch whose only custom
    processor is the tracker does not ask for them. Any other custom processor keeps them."""
    from types import SimpleNamespace

    from vllm.v1.sample.logits_processor.builtin import MinTokensLogitsProcessor

    tracker = _vllm_adapter._tracker_class(50)
    builtin = MinTokensLogitsProcessor.__new__(MinTokensLogitsProcessor)

    class UserProcessor:
        pass

    def batch(*kinds):
        return SimpleNamespace(all=[k.__new__(k) if isinstance(k, type) else k for k in kinds])

    only = _vllm_adapter.tracker_is_the_only_custom_processor
    assert only(batch(tracker, builtin)) and only(batch(tracker))
    assert not only(batch(builtin))  # no tracker: not ours to change
    assert not only(batch(tracker, UserProcessor, builtin))



@pytest.mark.parametrize("request_kind, fields, method, named", [
    ("completion", {"Recontrol": 0}, "to_sampling_params", "Recontrol must be inside"),
    ("completion", {" recontrol_alpha": 2.0}, "to_sampling_params", "must be inside vllm_xargs"),
    ("completion", {"recontol_alpha": 2.0}, "to_sampling_params", "recontol_alpha must be"),
    ("chat", {"re-control-steps": 3}, "to_sampling_params", "re-control-steps must be"),
    ("responses", {"recontrol_alpha": 2.0}, "to_sampling_params", "recontrol_alpha must be"),
    ("completion", {"use_beam_search": True, "vllm_xargs": {"Recontrol": 0}},
     "to_beam_search_params", "Recontrol cannot be used with use_beam_search"),
    ("completion", {"use_beam_search": True, "vllm_xargs": {"recontol_alpha": 1.0}},
     "to_beam_search_params", "recontol_alpha cannot be used with use_beam_search"),
])
def test_openai_requests_that_would_lose_their_control_are_refused(request_kind, fields, method,
                                                                    named):
    """Keys that vLLM would drop without a word (top level of the body, beam search's
    vllm_xargs; also the Responses API, and ours in any case, spaced or misspelt) are
    refused as the admission check refuses them; other fields pass."""
    from vllm.exceptions import VLLMValidationError

    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest

    _vllm_adapter._guard_openai_requests()
    make = {"completion": lambda **f: CompletionRequest(model="m", prompt="p", max_tokens=2, **f),
            "chat": lambda **f: ChatCompletionRequest(
                model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2, **f),
            "responses": lambda **f: ResponsesRequest(model="m", input="hi", **f)}[request_kind]
    with pytest.raises(VLLMValidationError, match=named):
        getattr(make(**fields), method)(16, {})
    assert getattr(make(some_other_field=1), "to_sampling_params")(16, {}) is not None


def test_request_values_are_checked_in_the_front_end_against_every_fronted_engine(
        monkeypatch):
    """vllm_xargs values are checked when the request is parsed, before a streamed reply
    starts, against the loosest limits of the RE-Control engines this process fronts (most
    steps, every head), so the front-end never refuses what one of them admits; with none
    fronted here, the engine decides."""
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.exceptions import VLLMValidationError

    from vllm_recontrol.config import EngineSettings

    def settings(max_steps: int, heads: dict) -> EngineSettings:
        return EngineSettings.from_additional_config({"recontrol": {
            "value_head": "h", "steps": 4, "max_steps": max_steps, "value_heads": heads}})

    def sampling(**xargs):
        return CompletionRequest(model="m", prompt="p", max_tokens=2,
                                 vllm_xargs=xargs).to_sampling_params(16, {})

    monkeypatch.setattr(_vllm_adapter, "_fronted_limits", None)
    _vllm_adapter._guard_openai_requests()
    assert sampling(recontrol_alpha="strong").extra_args  # no engine fronted: passes here
    _vllm_adapter._guard_openai_requests(settings(20, {"a": {"path": "ha"}}))
    _vllm_adapter._guard_openai_requests(settings(50, {"b": {"path": "hb"}}))
    for bad, named in (({"recontrol_alpha": "strong"}, "recontrol_alpha must be a number"),
                       ({"recontrol_steps": 51}, "max_steps"),
                       ({"recontrol_head": "c"}, "recontrol_head"),
                       ({"recontrol_stpes": 3}, "recontrol_stpes")):
        with pytest.raises(VLLMValidationError, match=named):
            sampling(**bad)
    for good in ({"recontrol_steps": 50, "recontrol_head": "a"}, {"recontrol_head": "b"},
                 {"recontrol_head": "default"}, {"recontrol": 0}):
        assert sampling(**good).extra_args == good


def test_every_guarded_endpoint_exists_in_the_installed_vllm():
    """Each endpoint guard names a class and an async method of the installed vLLM, read
    from its source (the Cohere module imports an SDK this machine lacks): a renamed one
    would leave its endpoint unguarded without a word."""
    import ast
    import importlib.util

    guarded = [row[:3] for row in _vllm_adapter.OTHER_ENDPOINTS]
    for module, class_name, method in [*guarded, _vllm_adapter.TOKEN_GENERATE]:
        tree = ast.parse(open(importlib.util.find_spec(module).origin).read())
        classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
        assert class_name in classes, (module, class_name)
        methods = {node.name for node in classes[class_name].body
                   if isinstance(node, ast.AsyncFunctionDef)}
        assert method in methods, (module, class_name, method)


def test_an_endpoint_that_reads_with_the_engine_s_control_refuses_request_keys():
    """/v1/systemone (vLLM's structured decisions, served for Qwen3 models) builds its own
    sampling parameters without vllm_xargs, so keys anywhere in its body are refused; a
    body without them reaches vLLM's handler (here: a stand-in server without a model)."""
    import asyncio
    from types import SimpleNamespace

    from vllm.entrypoints.generate.structured_decisions.serving import (
        ServingStructuredDecisions)

    class Raw:  # the HTTP request, as FastAPI hands it on
        def __init__(self, body: dict) -> None:
            self.body = body

        async def json(self) -> dict:
            return self.body

    _vllm_adapter._guard_other_endpoints()
    decide = ServingStructuredDecisions.create_decision
    assert decide._recontrol_wrapped
    serving = SimpleNamespace(create_error_response=lambda message, param: (message, param))
    for body, key in (({"vllm_xargs": {"recontrol": 0}}, "vllm_xargs.recontrol"),
                      ({"vllm_xargs": {"recontrol_alpha": 2.0}}, "vllm_xargs.recontrol_alpha"),
                      ({"Recontrol_Steps": 3}, "Recontrol_Steps")):
        message, param = asyncio.run(decide(serving, SimpleNamespace(), Raw(body)))
        assert param == key and "/v1/systemone builds its own sampling parameters" in message
    with pytest.raises(AttributeError, match="_check_model"):
        asyncio.run(decide(serving, SimpleNamespace(), Raw({"vllm_xargs": {"other": 1}})))


def test_the_token_generate_endpoint_refuses_keys_it_would_drop_and_bad_values(monkeypatch):
    """/inference/v1/generate (``vllm serve --enable-scale-out``) passes only
    sampling_params.extra_args on: keys at the top level, in a top-level vllm_xargs or
    directly in sampling_params were ignored with 200 (an off switch there left the request
    controlled), and a bad extra_args value reached a stream as 200 and an error event. Both
    are 400s naming the key now; a good body reaches vLLM's handler (here: a stand-in server
    without a model)."""
    import asyncio
    from types import SimpleNamespace

    from vllm.entrypoints.scale_out.token_in_token_out.serving import ServingTokens

    from vllm_recontrol.config import EngineSettings

    class Raw:  # the HTTP request, as FastAPI hands it on
        def __init__(self, body: dict) -> None:
            self.body = body

        async def json(self) -> dict:
            return self.body

    monkeypatch.setattr(_vllm_adapter, "_fronted_limits", None)
    _vllm_adapter._guard_openai_requests(EngineSettings.from_additional_config({"recontrol": {
        "value_head": "h", "steps": 4, "max_steps": 20, "value_heads": {"b": {"path": "hb"}}}}))
    serve = ServingTokens.serve_tokens
    assert serve._recontrol_wrapped
    serving = SimpleNamespace(create_error_response=lambda message, param: (message, param))

    def call(body: dict):
        extra = (body.get("sampling_params") or {}).get("extra_args")
        request = SimpleNamespace(sampling_params=SimpleNamespace(extra_args=extra))
        return asyncio.run(serve(serving, request, Raw(body)))

    for body, key in (({"recontrol_alpha": 2.0}, "recontrol_alpha"),
                      ({"vllm_xargs": {"recontrol_steps": 3}}, "vllm_xargs.recontrol_steps"),
                      ({"sampling_params": {"recontrol": 0}}, "sampling_params.recontrol"),
                      ({"sampling_params": {"Recontrol_Alpha": 1}},
                       "sampling_params.Recontrol_Alpha"),
                      # containers this endpoint has not, where habit puts them
                      ({"sampling_params": {"vllm_xargs": {"recontrol": 0}}},
                       "sampling_params.vllm_xargs.recontrol"),
                      ({"sampling_params": {"extra_body": {"recontrol_alpha": 2.0}}},
                       "sampling_params.extra_body.recontrol_alpha"),
                      ({"extra_args": {"recontrol": 0}}, "extra_args.recontrol"),
                      ({"extra_body": {"recontrol_steps": 3}}, "extra_body.recontrol_steps")):
        message, param = call(body)
        assert param == key, (body, param)
        assert f"{key} would be ignored here: /inference/v1/generate passes only " \
               "sampling_params.extra_args on" in message
    for extra, named in (({"recontrol_steps": 21}, "max_steps"),
                         ({"recontrol_head": "c"}, "recontrol_head"),
                         ({"recontrol_alpha": "strong"}, "recontrol_alpha must be a number")):
        message, param = call({"sampling_params": {"extra_args": extra}})
        assert param == "sampling_params.extra_args" and named in message, message
    for good in ({"recontrol_steps": 20, "recontrol_head": "b"}, {"recontrol": 0}, None,
                 {"other_plugin": 1}):
        with pytest.raises(AttributeError, match="_check_model"):
            call({"sampling_params": {"extra_args": good}, "vllm_xargs": {"other": 1}})


def test_another_plugins_logits_layer_is_an_install_error_not_a_silent_engine(monkeypatch):
    """vLLM builds one replacement per layer name: with another plugin's in place, ours
    cannot be, and a RE-Control engine would edit nothing, so it must refuse to start."""
    class TheirLogitsProcessor(LogitsProcessor):
        pass

    monkeypatch.setitem(op_registry_oot, "LogitsProcessor", TheirLogitsProcessor)
    monkeypatch.setattr(_vllm_adapter, "_install_errors", [])
    _vllm_adapter.install()
    assert len(_vllm_adapter._install_errors) == 1
    assert "another plugin replaced vLLM's LogitsProcessor" in _vllm_adapter._install_errors[0]
    assert "TheirLogitsProcessor" in _vllm_adapter._install_errors[0]


def test_rows_are_dropped_with_the_engine_that_owned_them():
    import gc

    from vllm_recontrol.controller import _ROWS_BY_ENGINE, rows_for_engine

    class Owner:
        pass

    owner = Owner()
    rows = rows_for_engine("engine-under-test", owner=owner)
    assert rows_for_engine("engine-under-test", owner=owner) is rows
    del owner
    gc.collect()
    assert "engine-under-test" not in _ROWS_BY_ENGINE


def test_only_the_last_pipeline_stage_must_hold_an_editing_logits_layer(llama_dir, head_dir,
                                                                        monkeypatch):
    """Under pipeline parallelism the other stages build no logits layer (vLLM's Llama
    builds it on the last stage only): they are not refused; the last stage is."""
    import torch

    vllm_config = config_for(llama_dir, {"value_head": str(head_dir)})
    stage_without_logits = torch.nn.Sequential(torch.nn.Linear(2, 2))
    monkeypatch.setattr(_vllm_adapter, "_is_last_pipeline_stage", lambda: False)
    _vllm_adapter.require_edit_bound(stage_without_logits, vllm_config)
    monkeypatch.setattr(_vllm_adapter, "_is_last_pipeline_stage", lambda: True)
    with pytest.raises(ConfigError, match=r"logits layers found: none"):
        _vllm_adapter.require_edit_bound(stage_without_logits, vllm_config)


def test_hub_heads_are_pinned_to_the_commit_the_front_end_checked(llama_dir, head_dir,
                                                                  tmp_path, monkeypatch):
    """Every worker (each tensor-parallel rank) loads its heads by itself: a head named by
    its hub id alone is pinned in the engine's configuration to the commit the front-end
    resolved and checked, so a push meanwhile cannot give the ranks different heads."""
    import json

    import huggingface_hub

    from vllm_recontrol.value_head import ValueHead

    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "models--someone--head" / "snapshots" / commit
    hidden = json.loads((llama_dir / "config.json").read_text())["hidden_size"]
    ValueHead(hidden, [4], seed=0).save(snapshot)
    asked = []

    def fake_download(repo, revision=None, allow_patterns=None):
        asked.append((repo, revision))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    vllm_config = config_for(llama_dir, {
        "value_head": "someone/head",
        "value_heads": {"local": str(head_dir), "b": {"path": "hf://someone/head@main",
                                                      "alpha": 2.0}}})
    section = vllm_config.additional_config["recontrol"]
    assert section["value_head"] == f"hf://someone/head@{commit}"
    assert section["value_heads"] == {"local": str(head_dir),
                                      "b": {"path": f"hf://someone/head@{commit}", "alpha": 2.0}}
    assert ("someone/head", None) in asked and ("someone/head", "main") in asked
    assert ("someone/head", commit) in asked  # the front-end checked the pinned head itself


def test_a_local_head_saved_again_while_the_engine_starts_is_refused(llama_dir, head_dir,
                                                                    tmp_path):
    """Each worker (every tensor-parallel rank) loads its heads by itself: a head folder
    saved again between the front-end's check and a worker's load (`train --out` into the
    served head) would give the ranks different heads. The worker compares the weights it
    loaded with those the front-end checked; the same weights saved again pass."""
    import shutil

    from vllm_recontrol.value_head import ValueHead

    served = tmp_path / "served-head"
    shutil.copytree(head_dir, served)
    vllm_config = config_for(llama_dir, {"value_head": str(served)})
    checked = vllm_config.additional_config[_vllm_adapter.CHECKED_HEADS_KEY]
    assert checked == {"default": ValueHead.load(head_dir).loaded_weights_id}
    ValueHead.load(head_dir).save(served)  # the same weights saved again
    with set_current_vllm_config(vllm_config):
        LogitsProcessor(100)
    hidden = ValueHead.load(head_dir).hidden_size
    ValueHead(hidden, [48, 32], seed=99).save(served)  # another head, same shape
    with set_current_vllm_config(vllm_config), pytest.raises(
            ConfigError, match=r"value head 'default' \(.*served-head\) changed on disk after "
                               r"the engine's front-end checked it \(weights [0-9a-f]{12} then, "
                               r"[0-9a-f]{12} now\).*Start the engine again"):
        LogitsProcessor(100)


def test_a_further_hub_head_that_cannot_be_pinned_is_named_by_its_key(llama_dir, head_dir):
    with pytest.raises(ValueError, match=r'\["value_heads"\]\["b"\]: value head hf://\./x: '
                                         r"not a Hugging Face Hub repository"):
        config_for(llama_dir, {"value_head": str(head_dir), "value_heads": {"b": "hf://./x"}})
