"""Prompt loading, the shard layout, and resumable collection (with fake engines, no vLLM)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from training_fakes import EOS, FakeEngines, fake_collect, fake_states, write_prompts
from vllm_recontrol.errors import RecontrolError
from vllm_recontrol.evaluation.evaluate import evaluate
from vllm_recontrol.training import collector
from vllm_recontrol.training.collector import collect, derive_seed, position_chunks
from vllm_recontrol.training.common import DataError
from vllm_recontrol.training.prompts import (extract_hh_prompt, hh_to_messages, load_prompts,
                                             load_references, render_chat_prompt)
from vllm_recontrol.training.shards import (load_states, read_manifest, read_rows,
                                            read_shard_index, shard_status)

DIALOGUE = ("\n\nHuman: What is a cat?\n\nAssistant: A small animal.\n\nHuman: And a dog?"
            "\n\nAssistant: A loyal animal.")


# ----------------------------------------------------------------------------- prompts
def test_hh_prompt_is_dialogue_up_to_last_assistant():
    assert extract_hh_prompt(DIALOGUE) == ("\n\nHuman: What is a cat?\n\nAssistant: A small "
                                           "animal.\n\nHuman: And a dog?\n\nAssistant:")
    with pytest.raises(ValueError):
        extract_hh_prompt("\n\nHuman: no answer turn")


def test_hh_prompt_to_chat_messages():
    prompt = extract_hh_prompt(DIALOGUE)
    assert hh_to_messages(prompt) == [
        {"role": "user", "content": "What is a cat?"},
        {"role": "assistant", "content": "A small animal."},
        {"role": "user", "content": "And a dog?"}]
    assert hh_to_messages("just a question") is None


def test_chat_template_rendering(tmp_path):
    from vllm_recontrol.toy import build_tokenizer

    tokenizer = build_tokenizer(tmp_path / "tok", ["the", "good", "user:", "assistant:"])
    ids = render_chat_prompt(tokenizer, "the good")
    assert tokenizer.decode(ids) == "user: the good assistant:"


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_local_jsonl_hh_rows_are_extracted(tmp_path):
    path = _jsonl(tmp_path / "hh.jsonl", [{"chosen": DIALOGUE, "rejected": DIALOGUE + " no"}] * 3)
    prompts = load_prompts(str(path))
    assert prompts == [extract_hh_prompt(DIALOGUE)] * 3
    assert load_prompts(str(path), prompt_column="chosen", prompt_format="plain") == [DIALOGUE] * 3
    assert load_prompts(str(path), max_prompts=2) == [extract_hh_prompt(DIALOGUE)] * 2


def test_datasets_folder_in_hh_format(tmp_path):
    """The `datasets` path (as for Anthropic/hh-rlhf), from a local folder: no network."""
    pytest.importorskip("datasets")
    folder = tmp_path / "hh"
    folder.mkdir()
    _jsonl(folder / "train.jsonl", [{"chosen": DIALOGUE, "rejected": DIALOGUE}] * 2)
    _jsonl(folder / "test.jsonl", [{"chosen": DIALOGUE.replace("dog", "cow"), "rejected": ""}])
    assert load_prompts(str(folder), split="train") == [extract_hh_prompt(DIALOGUE)] * 2
    assert load_prompts(str(folder), split="test")[0].endswith("And a cow?\n\nAssistant:")
    assert load_prompts(str(folder)) == [extract_hh_prompt(DIALOGUE)] * 2  # default: train
    assert load_prompts(str(folder), default_split="test")[0].endswith("a cow?\n\nAssistant:")


def test_split_or_data_dir_with_a_prompt_file_is_refused(tmp_path):
    """A file has no splits: --split test on it used to read the whole file (train and all)."""
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    with pytest.raises(DataError, match=r"p\.jsonl: --split 'test' select\(s\) within a data set"):
        load_prompts(str(path), split="test")
    with pytest.raises(DataError, match=r"--split 'train' and --data-dir 'harmless-base'"):
        load_prompts(str(path), split="train", data_dir="harmless-base")
    with pytest.raises(DataError, match=r"--data-dir 'x'"):
        load_references(str(path), data_dir="x")
    with pytest.raises(DataError, match=r"--split 'test'"):  # before any engine starts
        collect(model="org/no-model", prompts=str(path), out=str(tmp_path / "o"),
                split="test")
    with pytest.raises(DataError, match=r"--split 'test'"):
        evaluate(model="m", value_head="h", prompts=str(path), split="test",
                 reward_fn=lambda p, r: 0.0, out=str(tmp_path / "eval"))


def test_parquet_prompts(tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a b", "c d"], "x": [1, 2]}), path)
    assert load_prompts(str(path)) == ["a b", "c d"]
    with pytest.raises(DataError, match=r"p\.parquet has no column 'text'.*'prompt', 'x'"):
        load_prompts(str(path), prompt_column="text")


def test_missing_column_and_empty_data_errors(tmp_path):
    path = _jsonl(tmp_path / "q.jsonl", [{"question": "a"}, {"question": "b"}])
    with pytest.raises(DataError) as info:
        load_prompts(str(path))
    assert str(path) in str(info.value) and "['question']" in str(info.value)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty"):
        load_prompts(str(empty))
    with pytest.raises(DataError, match="does not exist"):
        load_prompts(str(tmp_path / "nope.jsonl"))


def test_bad_rows_are_named_as_a_person_counts_them(tmp_path):
    """A JSON lines record by its line (blank lines count), anything else by its row from 1."""
    lines = tmp_path / "p.jsonl"
    lines.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n{"prompt": " "}\n')
    with pytest.raises(DataError, match=r"p\.jsonl: line 4 column 'prompt' is an empty prompt"):
        load_prompts(str(lines))
    lines.write_text('{"prompt": "a"}\n{"prompt": 3}\n')
    with pytest.raises(DataError, match=r"line 2 column 'prompt' is int 3, expected a string"):
        load_prompts(str(lines))
    array = tmp_path / "p.json"
    array.write_text(json.dumps([{"prompt": "a"}, {"text": "b"}]))
    with pytest.raises(DataError, match=r"p\.json: record 2 has no column 'prompt'"):
        load_prompts(str(array))
    hh = _jsonl(tmp_path / "hh.jsonl", [{"chosen": DIALOGUE}, {"chosen": "no turns"}])
    with pytest.raises(DataError, match=r"line 2 column 'chosen': .*HH-RLHF format expected"):
        load_prompts(str(hh))
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = tmp_path / "p.parquet"
    pq.write_table(pyarrow.table({"prompt": ["a", "", "c"]}), table)
    with pytest.raises(DataError, match=r"p\.parquet: row 2 column 'prompt' is an empty prompt"):
        load_prompts(str(table))


def test_unreadable_prompt_files_are_named(tmp_path):
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=f"prompt file {latin1} is not UTF-8 text"):
        load_prompts(str(latin1))
    latin1.write_bytes(b'{"prompt": "caf\xe9"}\n')  # in the first record
    with pytest.raises(DataError, match="is not UTF-8 text"):
        load_prompts(str(latin1))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(DataError, match=f"prompt file {broken} cannot be read"):
        load_prompts(str(broken))


def test_prompt_files_saved_with_a_byte_order_mark_are_read(tmp_path):
    """Windows editors start UTF-8 files with a BOM, which was refused ("Unexpected UTF-8
    BOM") in JSON lines and arrays alike."""
    lines = tmp_path / "bom.jsonl"
    lines.write_bytes(b"\xef\xbb\xbf" + '{"prompt": "café"}\n{"prompt": "b"}\n'.encode())
    assert load_prompts(str(lines)) == ["café", "b"]
    array = tmp_path / "bom.json"
    array.write_bytes(b"\xef\xbb\xbf" + '[{"prompt": "café"}]'.encode())
    assert load_prompts(str(array)) == ["café"]


# ----------------------------------------------------------------------------- collection
@pytest.mark.parametrize("chunk_positions", [None, 9])
def test_shards_hold_every_response_once_with_the_right_states(tmp_path, monkeypatch,
                                                               chunk_positions):
    """Also when the pooling engine is asked for a few positions at a time (9: one sequence
    a call or two, some longer alone), as a real shard is."""
    if chunk_positions is not None:
        monkeypatch.setattr(collector, "STATES_CHUNK_POSITIONS", chunk_positions)
    data, engines, summary = fake_collect(tmp_path, count=20, shard_size=8)
    manifest = read_manifest(data)
    assert manifest["hidden_size"] == 8 and manifest["num_prompts"] == 20
    assert [s["name"] for s in manifest["shards"]] == ["shard-00000", "shard-00001", "shard-00002"]
    seen = []
    for shard in manifest["shards"]:
        rows = read_rows(data, shard["name"])
        index = read_shard_index(data, shard["name"])
        states = load_states(data, shard["name"])
        assert states.dtype == torch.bfloat16 and states.shape[1] == 8
        assert index.response_ids.tolist() == [r["response_id"] for r in rows]
        for i, row in enumerate(rows):
            assert row["seed"] == derive_seed(0, row["prompt_index"], 0)
            ids, response = row["prompt_token_ids"], row["response_token_ids"]
            # s_0 is the last prompt token's state, s_T the state that emitted the last token.
            expected = fake_states(ids + response[:-1])[len(ids) - 1:]
            got = states[index.offsets[i]:index.offsets[i + 1]]
            assert got.shape[0] == len(response) == row["num_states"]
            assert torch.equal(got, expected.to(torch.bfloat16))
            assert (row["finish_reason"] == "stop") == (response[-1] == EOS)
        seen += [r["prompt_index"] for r in rows]
    assert seen == list(range(20))
    assert engines.generate_calls == 3 and engines.closed
    assert summary["responses"] == 20
    if chunk_positions is None:
        assert engines.states_calls == 3
    else:  # every call within the budget, or one sequence alone; each sequence asked once
        assert engines.states_calls > 3
        assert all(sum(call) <= chunk_positions or len(call) == 1
                   for call in engines.states_lengths)
        assert any(len(call) == 1 and call[0] > chunk_positions
                   for call in engines.states_lengths)
        assert sum(len(call) for call in engines.states_lengths) == 20


class OddStates(FakeEngines):
    """States with ``value`` at the last position of the first response of shard 2."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def states(self, sequences):
        outputs = super().states(sequences)
        if self.states_calls == 3:
            outputs[0][-1, 3] = self.value
        return outputs


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_states_are_refused_before_their_shard_is_written(tmp_path, value):
    """NaN or inf states used to be stored: collect and label passed, and train stopped an
    epoch later with "lower --lr", naming no shard."""
    with pytest.raises(DataError, match=r"shard shard-00002: the pooling engine returned NaN "
                                        r"or inf states for response_id 16;"):
        fake_collect(tmp_path, count=20, shard_size=8, engines=OddStates(value))
    data = tmp_path / "data"
    assert [shard_status(data, f"shard-0000{i}") for i in range(3)] == [
        "done", "done", "generated"]  # shard 2 stays to be computed again
    resumed = FakeEngines()
    fake_collect(tmp_path, count=20, shard_size=8, engines=resumed)
    assert resumed.generate_calls == 0 and resumed.states_calls == 1


def test_states_beyond_float16_are_refused_naming_bfloat16(tmp_path):
    """70000 is finite in float32 but inf in float16 (largest 65504): the cast used to store
    inf without a word."""
    with pytest.raises(DataError, match=r"shard shard-00002: response_id 16 has states up to "
                                        r"70000 in size, beyond what float16 holds.*"
                                        r"--state-dtype bfloat16"):
        fake_collect(tmp_path / "f16", count=20, shard_size=8, engines=OddStates(70000.0),
                     state_dtype="float16")
    assert not (tmp_path / "f16" / "data" / "shard-00002.safetensors").exists()
    summary = fake_collect(tmp_path / "bf16", count=20, shard_size=8,
                           engines=OddStates(70000.0), state_dtype="bfloat16")[2]
    assert summary["shards done / planned"] == "3 / 3"


def test_position_chunks_cover_the_sequences_in_order_within_the_budget():
    lengths = [5, 7, 3, 20, 1, 1, 9]
    chunks = position_chunks(lengths, 10)
    assert [list(c) for c in chunks] == [[0], [1, 2], [3], [4, 5], [6]]
    assert position_chunks([], 10) == []
    assert [list(c) for c in position_chunks(lengths, 1000)] == [list(range(7))]


def _collection_bytes(data: Path) -> dict[str, bytes]:
    """Every shard file's bytes (the manifests differ only in the tmp paths they record)."""
    return {p.name: p.read_bytes() for p in sorted(data.iterdir())
            if p.is_file() and p.name != "manifest.json"}


@pytest.mark.parametrize("crash", ["generate", "states"])
def test_killed_run_resumes_without_duplicates(tmp_path, crash):
    reference = fake_collect(tmp_path / "ref", count=20, shard_size=8, samples_per_prompt=2)[0]
    broken = tmp_path / "run"
    broken.mkdir()
    write_prompts(broken / "prompts.jsonl", 20)
    failing = FakeEngines(**{f"fail_{crash}_call": 2})
    with pytest.raises(RuntimeError, match="simulated crash"):
        fake_collect(broken, count=20, shard_size=8, samples_per_prompt=2, engines=failing)
    data = broken / "data"
    assert (data / "shard-00000.jsonl").is_file()  # the first shard survived the crash
    assert not (data / "shard-00001.safetensors").exists()
    (data / ".shard-00001.safetensors.abc.tmp").write_bytes(b"half a file")  # killed mid-write

    resumed = FakeEngines()
    fake_collect(broken, count=20, shard_size=8, samples_per_prompt=2, engines=resumed)
    if crash == "generate":  # shard 0 was generated before the crash: only 1 and 2 are redone
        assert resumed.generate_calls == 2 and len(resumed.generated) == 2 * 12
        assert resumed.states_calls == 3
    else:  # shard 0 was finished, shards 1 and 2 generated: only their states are computed
        assert resumed.generate_calls == 0 and resumed.states_calls == 2
    assert _collection_bytes(data) == _collection_bytes(reference)
    ids = [r["response_id"] for s in ("shard-00000", "shard-00001", "shard-00002")
           for r in read_rows(data, s)]
    assert ids == list(range(40))

    again = FakeEngines()  # a third run finds everything done
    summary = fake_collect(broken, count=20, shard_size=8, samples_per_prompt=2, engines=again)[2]
    assert again.generate_calls == again.states_calls == 0
    assert summary["shards skipped (already done)"] == 3


def test_rerun_with_other_settings_is_refused(tmp_path):
    fake_collect(tmp_path, count=10, shard_size=4)
    with pytest.raises(DataError, match=r"different collection.*sampling.*'temperature': 1\.0"
                                        r".* there, .*'temperature': 0\.5.* now"):
        fake_collect(tmp_path, count=10, shard_size=4, temperature=0.5)
    # How to run the engine may change on a resume (e.g. another memory budget) ...
    fake_collect(tmp_path, count=10, shard_size=4, engine_args={"gpu_memory_utilization": 0.5})
    # ... what decides the states may not: finished and new shards would differ
    for changed in ({"dtype": "bfloat16"}, {"revision": "other-weights"}):
        with pytest.raises(DataError, match=r"different collection \(differs in \['engine_args'"):
            fake_collect(tmp_path, count=10, shard_size=4, engine_args=changed)
    with pytest.raises(DataError, match="pooling_engine_args"):
        fake_collect(tmp_path, count=10, shard_size=4, pooling_engine_args={"quantization": "fp8"})
    summary = fake_collect(tmp_path, count=10, shard_size=4, temperature=0.5, overwrite=True)[2]
    assert summary["responses"] == 10 and read_manifest(tmp_path / "data")["sampling"][
        "temperature"] == 0.5


def _crash_after_the_first_shard(tmp_path: Path) -> Path:
    """A run that generated shard 0 of 3 and died generating shard 1."""
    with pytest.raises(RuntimeError, match="simulated crash"):
        fake_collect(tmp_path, count=20, shard_size=8, engines=FakeEngines(fail_generate_call=2))
    data = tmp_path / "data"
    assert (data / "shard-00000.jsonl").is_file()
    return data


def _save_another_config(model: Path) -> None:
    """Another checkpoint of the same width saved in place (more layers, a wider FFN)."""
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(
        {**config, "num_hidden_layers": 7, "intermediate_size": 32}))


def _save_other_weights(model: Path) -> None:
    """Weights saved again: same name and size, a later time."""
    weights = model / "model.safetensors"
    weights.write_bytes(b"B" * 64)
    later = weights.stat().st_mtime + 60
    os.utime(weights, (later, later))


@pytest.mark.parametrize("change", [_save_another_config, _save_other_weights])
def test_a_model_folder_changed_since_the_collection_began_is_refused(tmp_path, change):
    """A local model folder saved again in place (ckpt/latest) used to resume silently:
    shard 0's responses came from the old model and its states from the new one."""
    model = tmp_path / "fake-model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"A" * 64)
    data = _crash_after_the_first_shard(tmp_path)
    assert read_manifest(data)["model_files"] is not None
    change(model)
    with pytest.raises(DataError, match=r"holds a different collection \(the files of the model "
                                        r"folder .*fake-model changed since this collection "
                                        r"began.*use a new --out, or --overwrite"):
        fake_collect(tmp_path, count=20, shard_size=8)
    assert not (data / "shard-00000.safetensors").exists()  # nothing computed by the new model
    summary = fake_collect(tmp_path, count=20, shard_size=8, overwrite=True)[2]
    assert summary["shards done / planned"] == "3 / 3"


def test_an_unchanged_model_folder_resumes(tmp_path):
    data = _crash_after_the_first_shard(tmp_path)
    resumed = FakeEngines()
    summary = fake_collect(tmp_path, count=20, shard_size=8, engines=resumed)[2]
    assert resumed.generate_calls == 2 and summary["shards done / planned"] == "3 / 3"
    assert read_manifest(data)["model_files"] is not None


def test_a_manifest_without_model_files_still_resumes(tmp_path):
    """A collection begun by an earlier release recorded no model_files: it resumes (its
    model's files cannot be checked) and its manifest is kept as it was, since label sets
    hold its hash."""
    from vllm_recontrol.training.shards import manifest_sha256, write_manifest

    data = _crash_after_the_first_shard(tmp_path)
    manifest = read_manifest(data)
    del manifest["model_files"], manifest["model_folder"]
    write_manifest(data, manifest)
    before = manifest_sha256(data)
    summary = fake_collect(tmp_path, count=20, shard_size=8)[2]
    assert summary["shards done / planned"] == "3 / 3"
    manifest = read_manifest(data)
    assert manifest_sha256(data) == before and "model_files" not in manifest
    assert "model_folder" not in manifest


def test_the_manifest_records_versions_and_a_resume_after_an_upgrade_says_so(
        tmp_path, monkeypatch, capsys):
    """The manifest records the package versions of the run that began it; a resume under
    other versions goes on (same model, same options) and says which changed, keeping the
    first run's record (label sets hold the manifest's hash)."""
    from vllm_recontrol.package_versions import package_versions
    from vllm_recontrol.training.shards import manifest_sha256

    data = _crash_after_the_first_shard(tmp_path)
    assert read_manifest(data)["software"] == package_versions()
    assert read_manifest(data)["software"]["torch"] == torch.__version__
    before = manifest_sha256(data)
    upgraded = {**package_versions(), "vllm": "9.9.9"}
    monkeypatch.setattr(collector, "package_versions", lambda: upgraded)
    capsys.readouterr()
    summary = fake_collect(tmp_path, count=20, shard_size=8)[2]
    assert summary["shards done / planned"] == "3 / 3"
    err = capsys.readouterr().err
    assert f"was begun with other package versions (vllm {package_versions()['vllm']} -> " \
           "9.9.9)" in err
    assert manifest_sha256(data) == before


def test_a_manifest_without_versions_resumes_without_a_note(tmp_path, capsys):
    from vllm_recontrol.training.shards import write_manifest

    data = _crash_after_the_first_shard(tmp_path)
    manifest = read_manifest(data)
    del manifest["software"]
    write_manifest(data, manifest)
    capsys.readouterr()
    assert fake_collect(tmp_path, count=20, shard_size=8)[2]["shards done / planned"] == "3 / 3"
    assert "package versions" not in capsys.readouterr().err
    assert "software" not in read_manifest(data)


def test_a_hub_model_has_no_files_to_check():
    assert collector.model_files("org/not-a-local-folder") is None
    assert collector.model_folder("org/not-a-local-folder") is None


def test_a_relative_model_path_is_recorded_as_the_folder_collect_read(tmp_path, monkeypatch):
    """``--model .`` (or ``models/x``) names another folder from wherever ``train`` runs:
    the manifest keeps the absolute folder, and the head records that one, not the folder
    train resolves the same text in (a false "trained on another model" warning at serve)."""
    from vllm_recontrol.training.labeler import label
    from vllm_recontrol.training.trainer import train

    fake_collect(tmp_path, count=20, shard_size=8)  # writes tmp_path/fake-model
    monkeypatch.chdir(tmp_path / "fake-model")
    data = fake_collect(tmp_path / "again", count=20, shard_size=8, model=".")[0]
    model = str((tmp_path / "fake-model").resolve())
    assert read_manifest(data)["model"] == "." and read_manifest(data)["model_folder"] == model
    label(data=str(data), reward_fn="training_fakes:good_reward", progress=False)
    monkeypatch.chdir(tmp_path)  # train runs from the project folder
    train(data=str(data), out=str(tmp_path / "head"), epochs=1, progress=False)
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    assert config["base_model"] == model


def test_the_same_model_folder_and_prompts_by_other_paths_resume(tmp_path, monkeypatch):
    """Relative instead of absolute paths (another working directory), or a --max-prompts
    past the file's end, name the same folder and the same prompts: the collection resumes
    (it was refused, with --overwrite, which deletes it, as the way out). Other prompts, or
    another folder, are still another collection."""
    data = fake_collect(tmp_path, count=10, shard_size=4)[0]
    manifest = (data / "manifest.json").read_text()
    monkeypatch.chdir(tmp_path)
    summary = fake_collect(tmp_path, count=10, shard_size=4, model="fake-model",
                           prompts="prompts.jsonl", max_prompts=1000)[2]
    assert summary["shards skipped (already done)"] == 3
    assert (data / "manifest.json").read_text() == manifest  # the first run's, as labels hash
    with pytest.raises(DataError, match=r"differs in \[.*'prompts'"):
        fake_collect(tmp_path, count=10, shard_size=4, max_prompts=9)
    other = tmp_path / "other-model"
    other.mkdir()
    (other / "config.json").write_text((tmp_path / "fake-model" / "config.json").read_text())
    with pytest.raises(DataError, match=r"differs in \[.*'model'"):
        fake_collect(tmp_path, count=10, shard_size=4, model=str(other))


def test_another_max_model_len_is_refused_on_resume(tmp_path):
    """vLLM ends a response where prompt + response reach max_model_len: a rerun with
    another limit would cut later shards' responses elsewhere than the finished ones'."""
    fake_collect(tmp_path, count=10, shard_size=4, engine_args={"max_model_len": 256})
    for limit in (64, 512):
        with pytest.raises(DataError, match=r"differs in \['engine_args'\].*'max_model_len'"):
            fake_collect(tmp_path, count=10, shard_size=4, engine_args={"max_model_len": limit})
    with pytest.raises(DataError, match="pooling_engine_args"):
        fake_collect(tmp_path, count=10, shard_size=4, engine_args={"max_model_len": 256},
                     pooling_engine_args={"max_model_len": 512})


def test_a_pooling_engine_shorter_than_the_generator_is_refused_before_generating(tmp_path):
    """Its refusal of a long prompt and response came after the whole generation phase, as
    a vLLM traceback; the rerun was then "a different collection"."""
    with pytest.raises(DataError, match=r"--pooling-engine-args max_model_len 64 is below "
                                        r"the generation engine's \(256, --engine-args\)"):
        fake_collect(tmp_path, count=10, shard_size=4, engine_args={"max_model_len": 256},
                     pooling_engine_args={"max_model_len": 64})
    assert not (tmp_path / "data").exists()


def test_a_pooling_engine_shorter_than_the_generator_s_default_is_refused_at_its_start(
        monkeypatch):
    """Without a max_model_len in --engine-args the generator's is vLLM's default for the
    model, known once it has started: checked then, before anything generates."""
    from types import SimpleNamespace

    from vllm_recontrol import _vllm_adapter
    from vllm_recontrol.training import engines

    stopped = []
    monkeypatch.setattr(engines, "shutdown_llm", stopped.append)
    # a stand-in generator has no model class to read (test_architectures checks that part)
    monkeypatch.setattr(_vllm_adapter, "states_changed_in_compute_logits", lambda llm: None)
    generator = SimpleNamespace(model_config=SimpleNamespace(max_model_len=512))
    monkeypatch.setattr(engines, "start_offline_engine", lambda *a, **k: generator)
    pair = engines.VllmEngines("m", {}, pooling_engine_args={"max_model_len": 16})
    with pytest.raises(DataError, match=r"max_model_len 16 is below the generation engine's "
                                        r"\(512, vLLM's default for this model, as "
                                        r"--engine-args set none: set max_model_len there"):
        pair.generate([])
    assert stopped == [generator] and pair._generator is None
    fits = engines.VllmEngines("m", {}, pooling_engine_args={"max_model_len": 512})
    assert fits._generator_llm() is generator


def test_seeds_do_not_depend_on_sharding(tmp_path):
    a = fake_collect(tmp_path / "a", count=12, shard_size=5)[0]
    b = fake_collect(tmp_path / "b", count=12, shard_size=12)[0]
    rows_a = [r for s in ("shard-00000", "shard-00001", "shard-00002") for r in read_rows(a, s)]
    rows_b = read_rows(b, "shard-00000")
    assert rows_a == rows_b


def test_collect_option_errors(tmp_path):
    with pytest.raises(DataError, match="replicas > 1 needs ray"):
        fake_collect(tmp_path, count=4, replicas=2)
    for sampling in ({"temperature": 3.0}, {"temperature": float("nan")}, {"top_k": -2}):
        with pytest.raises(DataError, match="sampling options refused by vLLM"):
            fake_collect(tmp_path, count=4, **sampling)
        assert not (tmp_path / "data").exists()  # refused before the manifest: a rerun works
    for seed in (2 ** 32, -1):  # the engine's seed too: vLLM seeds numpy with it
        with pytest.raises(DataError, match=rf"seed must be an integer in \[0, 2\*\*32\) "
                                            rf".*got {seed!r}"):
            fake_collect(tmp_path, count=4, seed=seed)
        assert not (tmp_path / "data").exists()
    fake_collect(tmp_path / "top", count=4, seed=2 ** 32 - 1)
    for flag in ("engine_args", "pooling_engine_args"):  # a seed there overrides --seed
        with pytest.raises(DataError, match=rf"--{flag.replace('_', '-')} seed must be an "
                                            rf"integer in \[0, 2\*\*32\) .*got 4294967296"):
            fake_collect(tmp_path, count=4, **{flag: {"seed": 2 ** 32}})
        assert not (tmp_path / "data").exists()
    with pytest.raises(Exception, match="unknown option"):
        fake_collect(tmp_path, count=4, max_tokens=3)


def test_a_prompt_vllm_refuses_is_named_with_its_shard(tmp_path):
    """vLLM names no prompt when it refuses one (too long for max_model_len, say): the
    collector names the longest of the batch by its index in the prompt set."""
    from vllm.exceptions import VLLMValidationError

    from vllm_recontrol.training.engines import refused_request

    class Words:
        def __call__(self, text):
            return {"input_ids": text.split()}

    refused = refused_request(Words(), ["a b", {"prompt_token_ids": [1, 2, 3, 4]}, "c"],
                              VLLMValidationError("too long"))
    assert refused.request == 1 and "has 4 tokens" in str(refused)

    class Refusing(FakeEngines):
        def generate(self, requests):
            if len(requests) == 4 and requests[2].prompt.startswith("good"):
                raise refused_request(Words(), [r.prompt for r in requests],
                                      VLLMValidationError("too long"))
            return super().generate(requests)

    (tmp_path / "prompts.jsonl").write_text("".join(
        json.dumps({"prompt": p}) + "\n" for p in
        ["a", "b", "c", "d", "e", "f", "good " + "x " * 30, "h"]))
    with pytest.raises(DataError, match=r"shard shard-00001: prompt 7 of .*prompts.jsonl "
                                        r"\(prompt_index 6, .*\): vLLM refused a request \(too long\).* Shorten"):
        fake_collect(tmp_path, count=8, shard_size=4, engines=Refusing())


def test_a_run_that_stopped_before_its_first_shard_does_not_lock_the_folder(tmp_path, capsys):
    """A first run that wrote the manifest and then failed (a model that did not load, say)
    used to refuse every corrected rerun as "a different collection"."""
    with pytest.raises(RuntimeError, match="simulated crash"):
        fake_collect(tmp_path, count=10, shard_size=4, engines=FakeEngines(fail_generate_call=1))
    assert read_manifest(tmp_path / "data")["sampling"]["temperature"] == 1.0
    summary = fake_collect(tmp_path, count=10, shard_size=4, temperature=0.5)[2]
    assert summary["responses"] == 10
    assert read_manifest(tmp_path / "data")["sampling"]["temperature"] == 0.5
    assert "holds no shards yet; its manifest (differs in ['sampling'])" in capsys.readouterr().err
    with pytest.raises(DataError, match="different collection"):  # now it holds shards
        fake_collect(tmp_path, count=10, shard_size=4, temperature=0.7)


def test_engine_arguments_and_model_paths_are_checked_before_anything_starts(tmp_path):
    def refused(message, **options):
        with pytest.raises(DataError, match=message):
            fake_collect(tmp_path, count=4, **options)
        assert not (tmp_path / "data").exists()

    refused(r"--engine-args: vLLM's LLM\(...\) takes no argument 'gpu_mem_util' \(did you "
            r"mean gpu_memory_utilization", engine_args={"gpu_mem_util": 0.5})
    refused(r"--pooling-engine-args: .* no argument 'no_such_arg'",
            pooling_engine_args={"no_such_arg": 1})
    refused("give the model with --model", engine_args={"model": "x"})
    with pytest.raises(DataError, match=r"--model \./no-model: no such folder"):
        collect(model="./no-model", prompts=str(write_prompts(tmp_path / "p.jsonl", 2)),
                out=str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()
    with pytest.raises(DataError, match=r"--engine-args: .* no argument 'nope'"):
        evaluate(model="m", value_head="h", prompts="p", engine_args={"nope": 1})
    with pytest.raises(DataError, match=r"--model /no/such/model: no such folder"):
        evaluate(model="/no/such/model", value_head="h", prompts="p")


def test_config_file_errors_are_one_line_usage_errors(tmp_path, capsys):
    from vllm_recontrol.cli import main

    (tmp_path / "bad.json").write_text("{bad")
    for config, message in ((tmp_path / "none.json", "does not exist"),
                            (tmp_path / "bad.json", "is not valid JSON")):
        for command in ("collect", "label", "train", "eval"):
            with pytest.raises(SystemExit) as exit_info:
                main([command, "--config", str(config)])
            assert exit_info.value.code == 2
            err = capsys.readouterr().err
            assert message in err and "Traceback" not in err, (command, err)


def test_an_engine_that_did_not_start_ends_with_where_to_look(capsys):
    """vLLM reports why an engine failed in its engine process's log, far above the
    traceback the command gets: the command's last line says so, with the common CPU cause;
    other runtime errors keep their traceback."""
    from vllm_recontrol.training.common import run_main

    def fails(message):
        raise RuntimeError(message)

    message = "Engine core initialization failed. See root cause above. Failed core proc(s): {}"
    assert run_main(fails, {"message": message}) == 1
    err = capsys.readouterr().err
    assert message in err  # the traceback, as before
    assert err.splitlines()[-2] == "error: the vLLM engine did not start"
    assert err.splitlines()[-1].startswith("hint: where vLLM's reason is not on the line above")
    assert "kv_cache_memory_bytes" in err.splitlines()[-1]
    with pytest.raises(RuntimeError, match="something else"):
        run_main(fails, {"message": "something else"})


def test_ctrl_c_ends_a_command_with_one_line_and_the_shell_s_status(tmp_path):
    """A command stopped by Ctrl-C printed 30-130 lines of traceback and ended with status 1
    (collect, eval: a script could not tell it from a failure); its cleanup still runs."""
    import signal
    import subprocess
    import sys
    import time

    cleaned = tmp_path / "cleaned"
    script = (
        "import contextlib, pathlib, sys, time\n"
        "from vllm_recontrol.training.common import run_main\n"
        "def command():\n"
        "    with contextlib.ExitStack() as stack:\n"
        f"        stack.callback(pathlib.Path({str(cleaned)!r}).touch)\n"
        "        print('started', flush=True)\n"
        "        time.sleep(60)\n"
        "sys.exit(run_main(command, {}))\n")
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "started"
    time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and err.strip() == "interrupted", err
    assert cleaned.exists()


def test_an_in_process_engine_that_did_not_start_says_why_and_where_to_look(
        tmp_path, capsys, llama_dir, monkeypatch):
    """In process, vLLM raises its own error (here a pydantic one) where the engine is built,
    not the multiprocess client's RuntimeError: the command ends with vLLM's reason and the
    same hint, not a traceback."""
    from vllm_recontrol.training.collector import collect
    from vllm_recontrol.training.common import run_main

    # --in-process sets this for the rest of the process: undone after the test, or later
    # tests in this worker would see an in-process engine (eval turns its overlap off)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # restored to unset after
    write_prompts(tmp_path / "prompts.jsonl", 2)
    code = run_main(collect, dict(model=str(llama_dir), prompts=str(tmp_path / "prompts.jsonl"),
                                  out=str(tmp_path / "data"), max_new_tokens=2, progress=False,
                                  in_process=True,
                                  engine_args={"max_model_len": 10 ** 9,
                                               "kv_cache_memory_bytes": 1 << 26}))
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    error, hint = err.splitlines()[-2:]
    assert error.startswith("error: collect: generation: the vLLM engine did not start ("), error
    assert "User-specified max_model_len (1000000000)" in error
    assert hint.startswith("hint: ") and "kv_cache_memory_bytes" in hint


def test_the_model_fingerprint_ignores_hidden_files(tmp_path):
    """hf download --local-dir rewrites its .cache metadata on every run: not a change."""
    from vllm_recontrol.training.common import folder_fingerprint

    (tmp_path / "m" / ".cache" / "huggingface").mkdir(parents=True)
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"12345678")
    before = folder_fingerprint(str(tmp_path / "m"))
    (tmp_path / "m" / ".cache" / "huggingface" / "model.metadata").write_text("now")
    assert folder_fingerprint(str(tmp_path / "m")) == before
    (tmp_path / "m" / "model.safetensors").write_bytes(b"123456789")
    assert folder_fingerprint(str(tmp_path / "m")) != before


def test_a_cpu_engine_without_a_memory_setting_is_warned_about(caplog, monkeypatch):
    from vllm_recontrol.training.engines import warn_without_cpu_memory_setting

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)  # vLLM's own CPU setting
    with caplog.at_level("WARNING", logger="vllm_recontrol"):
        warn_without_cpu_memory_setting("collect: generation", {"dtype": "float32"})
        assert "collect: generation: on a CPU vLLM sets aside" in caplog.text
        caplog.clear()
        for setting in ({"kv_cache_memory_bytes": 1 << 30}, {"gpu_memory_utilization": 0.3}):
            warn_without_cpu_memory_setting("collect: generation", setting)
        monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")  # vLLM's own CPU size, in GiB
        warn_without_cpu_memory_setting("collect: generation", {})
        assert caplog.text == ""


def test_stop_strings_are_checked_recorded_and_part_of_the_collection(tmp_path):
    """--stop goes to vLLM with the sampling options; the manifest records it only when
    given (collections made before it resume unchanged), and another stop list is another
    collection."""
    for bad, message in ((["Human:", ""], "stop strings must not be empty"),
                         ("Human:", "option stop must be a list"),
                         ([3], r"option stop\[0\] must be a string")):
        with pytest.raises(RecontrolError, match=message):
            fake_collect(tmp_path / "bad", count=4, stop=bad)
    plain = fake_collect(tmp_path / "plain", count=4)[0]
    assert "stop" not in read_manifest(plain)["sampling"]
    data, _, summary = fake_collect(tmp_path / "stopped", count=4, stop=["Human:", "User:"])
    assert read_manifest(data)["sampling"]["stop"] == ["Human:", "User:"]
    assert "responses ended by EOS or a stop string" in summary
    with pytest.raises(DataError, match=r"different collection.*'stop': \['Human:'\]"):
        fake_collect(tmp_path / "stopped", count=4, stop=["Human:"])
    with pytest.raises(DataError, match="different collection"):
        fake_collect(tmp_path / "stopped", count=4)


def test_stop_strings_reach_vllms_sampling_params():
    from vllm_recontrol.training.collector import CollectOptions

    options = CollectOptions(model="m", prompts="p", out="o", stop=["Human:"])
    assert options.sampling()["stop"] == ["Human:"]
    assert "stop" not in CollectOptions(model="m", prompts="p", out="o").sampling()
