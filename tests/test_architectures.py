"""Architectures built another way than Llama: a multimodal-style wrapper (the language model
built under a view of the engine's config, as vLLM builds LLaVA, Gemma 3, Qwen2.5-VL...) is
edited as the plain model is; a logits layer RE-Control cannot edit (a subclass of vLLM's,
as vLLM 0.32's Inkling has) refuses the engine instead of serving every request unedited."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine_helpers import greedy, llama_control, token_ids

# Run in a child process: the architectures are registered in this process's model registry,
# which only an in-process engine (no engine-core process) sees.
_RUN = r"""
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
sys.path.insert(0, sys.argv[1])
from torch import nn
from vllm import ModelRegistry, SamplingParams
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.utils import init_vllm_registered_model
from engine_helpers import start_llm, stop_llm, token_ids


class WrappedLlama(nn.Module):
    # the multimodal pattern: the language model built by init_vllm_registered_model, under
    # vllm_config.with_hf_config(...), a copy of the engine's config with its own instance_id
    def __init__(self, *, vllm_config, prefix=""):
        super().__init__()
        self.language_model = init_vllm_registered_model(
            vllm_config=vllm_config, hf_config=vllm_config.model_config.hf_config,
            prefix="", architectures=["LlamaForCausalLM"])
        self.make_empty_intermediate_tensors = \
            self.language_model.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids):
        return self.language_model.embed_input_ids(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None,
                **kwargs):
        return self.language_model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states):
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights):
        return {"language_model." + n for n in self.language_model.load_weights(weights)}


class SubclassedLogitsProcessor(LogitsProcessor):  # as InklingLogitsProcessor is
    pass


class SubclassedLayerLlama(LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix=""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.logits_processor = SubclassedLogitsProcessor(self.config.vocab_size)


ModelRegistry.register_model("WrappedLlama", WrappedLlama)
ModelRegistry.register_model("SubclassedLayerLlama", SubclassedLayerLlama)
model, control, requests = sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
llm = start_llm(model, control, distributed_executor_backend="uni",
                hf_overrides={"architectures": ["WrappedLlama"]})
outputs = llm.generate([p for p, _ in requests],
                       [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True,
                                       extra_args=extra) for _, extra in requests],
                       use_tqdm=False)
print("RESULT " + json.dumps(token_ids(outputs)), flush=True)
stop_llm(llm)
try:
    start_llm(model, control, distributed_executor_backend="uni",
              hf_overrides={"architectures": ["SubclassedLayerLlama"]})
    print("REFUSED nothing", flush=True)
except Exception as exc:
    print("REFUSED " + json.dumps(f"{type(exc).__name__}: {exc}"), flush=True)
"""

REQUESTS = [("the good kan", {"recontrol": 0}),
            ("the good kan", {"recontrol_alpha": 50.0, "recontrol_steps": 20}),
            ("a bad day", {"recontrol_alpha": 2.0, "recontrol_steps": 6})]


@pytest.fixture(scope="module")
def child_run(llama_dir, head_dir):
    proc = subprocess.run([sys.executable, "-c", _RUN, str(Path(__file__).parent),
                           str(llama_dir), json.dumps(llama_control(head_dir)),
                           json.dumps(REQUESTS)],
                          capture_output=True, text=True, timeout=500)
    lines = {line.split(" ", 1)[0]: json.loads(line.split(" ", 1)[1])
             for line in proc.stdout.splitlines() if line.startswith(("RESULT ", "REFUSED "))}
    assert proc.returncode == 0 and len(lines) == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    return lines


def test_a_language_model_built_under_a_config_view_is_edited_as_the_plain_model(
        child_run, llama_engine):
    plain = token_ids(llama_engine.generate([p for p, _ in REQUESTS],
                                            [greedy(8, **extra) for _, extra in REQUESTS],
                                            use_tqdm=False))
    assert child_run["RESULT"] == plain
    assert plain[1] != plain[0]  # the control changed the tokens: the test can tell


def test_a_logits_layer_recontrol_cannot_edit_refuses_the_engine(child_run):
    refused = child_run["REFUSED"]
    assert "cannot be edited by RE-Control" in refused, refused
    assert "SubclassedLogitsProcessor" in refused


def build_tiny_opt(directory: Path) -> Path:
    """A random OPT whose decoder (64 wide) projects its output to 32 before ``lm_head``
    (``word_embed_proj_dim``, as opt-350m does: 1024 to 512)."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    from vllm_recontrol.toy import build_tokenizer

    tokenizer = build_tokenizer(directory)
    config = OPTConfig(vocab_size=len(tokenizer), hidden_size=64, word_embed_proj_dim=32,
                       num_hidden_layers=2, ffn_dim=128, num_attention_heads=2,
                       max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       do_layer_norm_before=False, init_std=0.1)
    torch.manual_seed(0)
    OPTForCausalLM(config).save_pretrained(directory)
    return directory


def test_a_projected_decoder_is_edited_at_the_width_lm_head_reads(tmp_path):
    """OPT hands lm_head states projected to word_embed_proj_dim: a head of that width is
    the right one (it was refused, and one of the decoder's width started and then killed
    the engine at its first controlled request); its tokens equal the oracle's, whose states
    are the projected ones too; collect and inspect read that width from the config."""
    import torch

    from engine_helpers import start_llm, stop_llm
    from oracle import assert_engine_matches_oracle
    from vllm_recontrol import ValueHead, ValueHeadError
    from vllm_recontrol.training.common import model_state_width

    model = build_tiny_opt(tmp_path / "opt")
    assert model_state_width(str(model)) == 32
    head = ValueHead(32, [16], seed=0)
    with torch.no_grad():
        for layer in head.layers:
            layer.weight.mul_(3.0)
    head.save(tmp_path / "head32")
    ValueHead(64, [16], seed=0).save(tmp_path / "head64")
    with pytest.raises(ValueHeadError, match="hidden_size 64 but the model's states are 32 wide"):
        start_llm(model, llama_control(tmp_path / "head64"))
    llm = start_llm(model, llama_control(tmp_path / "head32"))
    try:
        assert_engine_matches_oracle(llm, model, tmp_path / "head32",
                                     ["the good kan", "a bad ba bon", "zo ze zi zu"])
    finally:
        stop_llm(llm)


def test_an_architecture_vllm_serves_through_its_transformers_backend_is_edited(tmp_path,
                                                                                head_dir):
    """GPT-NeoX (Pythia's architecture) is one vLLM's registry maps to its Transformers
    backend: built that way under --model-impl recontrol, its logits layer is vLLM's, so
    RE-Control edits it; tokens against the oracle."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from engine_helpers import start_llm, stop_llm
    from oracle import assert_engine_matches_oracle
    from vllm_recontrol.toy import build_tokenizer

    model = tmp_path / "neox"
    tokenizer = build_tokenizer(model)
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=128,
                           max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, initializer_range=0.1)
    torch.manual_seed(0)
    GPTNeoXForCausalLM(config).save_pretrained(model)
    llm = start_llm(model, llama_control(head_dir))
    try:
        assert_engine_matches_oracle(llm, model, head_dir,
                                     ["the good kan", "a bad ba bon", "zo ze zi zu"])
    finally:
        stop_llm(llm)


# What vLLM 0.32's compute_logits methods do to the states before the logits layer, read by
# hand in its source: MiMo and Step-3.5 apply the final norm there, and the multi-token
# predictors (draft models) their shared head's norm. Every other one hands them on as given.
CHANGED_IN_COMPUTE_LOGITS = {
    ("mimo.py", "MiMoForCausalLM"), ("step3p5.py", "Step3p5ForCausalLM"),
    ("step3p5_mtp.py", "Step3p5AMultiTokenPredictor"),
    ("deepseek_mtp.py", "DeepSeekMultiTokenPredictor"),
    ("glm4_moe_mtp.py", "Glm4MoeMultiTokenPredictor"),
    ("glm4_moe_lite_mtp.py", "Glm4MoeLiteMultiTokenPredictor"),
    ("bailing_moe_mtp.py", "BailingMoeV25MultiTokenPredictor"),
    ("bailing_moe_v3_mtp.py", "BailingMoeV3MultiTokenPredictor"),
    ("hy_v3_mtp.py", "HYV3MultiTokenPredictor")}


def test_the_models_that_change_states_in_compute_logits_are_found_in_vllms_source():
    """The source check finds exactly the classes read by hand among every compute_logits
    of vLLM's models (an upgrade that adds one fails here first)."""
    import ast

    import vllm.model_executor.models as models

    from vllm_recontrol._vllm_adapter import changes_argument_before_logits

    found, seen = set(), 0
    for path in sorted(Path(models.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef):
                continue
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "compute_logits":
                    seen += 1
                    if changes_argument_before_logits(item):
                        found.add((path.name, node.name))
    assert seen > 100 and found == CHANGED_IN_COMPUTE_LOGITS


def _tiny_mimo(tmp_path) -> Path:
    """A tiny Qwen2 labelled MiMo (MiMo is Qwen2 with multi-token-prediction layers; vLLM's
    class normalises in compute_logits instead of forward)."""
    from vllm_recontrol.toy import build_tiny_model

    model = build_tiny_model(tmp_path / "tiny-mimo", "qwen2", seed=3)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["MiMoForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))
    return model


def test_collect_refuses_a_model_whose_pooled_states_are_not_the_edited_ones(tmp_path,
                                                                             monkeypatch):
    """On MiMo the pooling runner returns the states before the final norm, while the edit
    acts after it (checked by a reviewer against Hugging Face: 5.56 apart): collect refuses
    once the generator has started (vLLM has resolved the model's class), before anything
    is generated; a Llama goes on."""
    from types import SimpleNamespace

    from vllm.engine.arg_utils import EngineArgs

    from engine_helpers import ENGINE_KWARGS
    from vllm_recontrol._vllm_adapter import states_changed_in_compute_logits
    from vllm_recontrol.toy import build_tiny_model
    from vllm_recontrol.training import engines
    from vllm_recontrol.training.common import DataError
    from vllm_recontrol.training.engines import GenerationRequest, VllmEngines

    def offline_engine(model):
        config = EngineArgs(model=str(model), **ENGINE_KWARGS).create_engine_config()
        return SimpleNamespace(model_config=config.model_config)

    mimo = _tiny_mimo(tmp_path)
    llama = build_tiny_model(tmp_path / "tiny-llama", "llama", seed=3)
    assert states_changed_in_compute_logits(offline_engine(mimo)) == "MiMoForCausalLM"
    assert states_changed_in_compute_logits(offline_engine(llama)) is None
    stopped = []
    monkeypatch.setattr(engines, "start_offline_engine",
                        lambda what, model, **kwargs: offline_engine(model))
    monkeypatch.setattr(engines, "shutdown_llm", stopped.append)
    with pytest.raises(DataError, match=r"collect cannot read the states of MiMoForCausalLM "
                                        r"\(model .*tiny-mimo\): vLLM's MiMoForCausalLM "
                                        r"changes the final states \(its final norm\) inside "
                                        r"compute_logits"):
        VllmEngines(str(mimo), {"max_tokens": 4}).generate(
            [GenerationRequest(prompt="the good", seed=1)])
    assert len(stopped) == 1  # the generator is shut down, nothing generated
    generator = VllmEngines(str(llama), {"max_tokens": 4})._generator_llm()
    assert generator.model_config.architectures == ["LlamaForCausalLM"]
