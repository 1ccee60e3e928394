"""Value heads from the Hugging Face Hub: ids resolve through the hub cache, local wins."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vllm_recontrol import ValueHead
from vllm_recontrol.errors import ValueHeadError
from vllm_recontrol.head_source import HEAD_FILES, locate_head

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root, repo: str = "someone/tiny-head"):
    """A hub cache as huggingface_hub lays it out: the snapshot of COMMIT, main -> COMMIT,
    and a pickle beside the head that must never be needed."""
    folder = root / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / COMMIT
    ValueHead(8, [4, 3], seed=3, base_model="tiny").save(snapshot)
    (snapshot / "pytorch_model.bin").write_bytes(b"not to be loaded")
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(COMMIT)
    return snapshot


def inspect_offline(cache, *heads):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "vllm_recontrol.cli", "inspect", "--json",
                           *heads], capture_output=True, text=True, timeout=120, env=env)


def test_a_hub_id_loads_from_the_cache_offline(tmp_path):
    """`inspect owner/name` (and @commit) in a process with the hub offline: the head comes
    from the cached snapshot, whose weights it reports; an id the cache lacks is refused
    with a message that names it and the hub."""
    snapshot = hub_cache(tmp_path / "hub")
    proc = inspect_offline(tmp_path / "hub", "someone/tiny-head", f"someone/tiny-head@{COMMIT}",
                           "someone/absent-head")
    assert proc.returncode == 1, proc.stderr[-2000:]
    found, pinned, missing = [json.loads(line) for line in proc.stdout.splitlines()
                              if line.startswith("{")]
    for report in (found, pinned):
        assert report["widths"] == [4, 3] and report["base_model"] == "tiny"
        assert report["folder"] == str(snapshot)
    assert missing["path"] == "someone/absent-head"
    assert "not a local folder, and fetching it from the Hugging Face Hub failed" in \
        missing["error"]


def test_only_the_head_files_are_asked_for_with_the_revision(monkeypatch, tmp_path):
    import huggingface_hub

    asked = []
    snapshot = hub_cache(tmp_path)

    def fake_download(repo, revision=None, allow_patterns=None):
        asked.append((repo, revision, allow_patterns))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert locate_head("org/head@v2") == snapshot
    assert locate_head("org/head") == snapshot
    assert asked == [("org/head", "v2", list(HEAD_FILES)), ("org/head", None, list(HEAD_FILES))]
    assert ValueHead.load("org/head").widths == [4, 3]


def test_a_local_folder_wins_and_other_missing_paths_are_not_hub_ids(monkeypatch, tmp_path):
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    monkeypatch.chdir(tmp_path)
    ValueHead(8, [4], seed=0).save(tmp_path / "org" / "head")
    assert ValueHead.load("org/head").widths == [4]  # relative folder shaped like an id
    for missing in (str(tmp_path / "nope"), "./org/nope", "a/b/c", "heads"):
        with pytest.raises(ValueHeadError, match="does not exist"):
            ValueHead.load(missing)


def test_a_mistyped_path_in_a_local_folder_is_not_fetched_from_the_hub(monkeypatch, tmp_path):
    """`heads/vicuan` reads as a hub id, but heads/ is a local folder: a typo, not a hub
    repository (which could hold anyone's head), so the hub is not asked and the error names
    the nearest folders there; hf:// asks the hub for that name all the same."""
    import huggingface_hub

    asked = []
    snapshot = hub_cache(tmp_path / "hub")

    def fake_download(repo, revision=None, allow_patterns=None):
        asked.append((repo, revision))
        if repo != "heads/vicuan":
            raise RuntimeError("404 repository not found")
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.chdir(tmp_path)
    for name in ("vicuna", "llama"):
        ValueHead(8, [4], seed=0).save(tmp_path / "heads" / name)
    with pytest.raises(ValueHeadError, match=r"'heads/vicuan' does not exist \(nearest in "
                                             r"heads/: vicuna\)\. Read as a path, .* write "
                                             r"hf://heads/vicuan$"):
        ValueHead.load("heads/vicuan")
    assert asked == []
    assert ValueHead.load("hf://heads/vicuan@v1").widths == [4, 3]
    assert asked == [("heads/vicuan", "v1")]
    with pytest.raises(ValueHeadError, match=r"the head in its cache$"):  # no local owner
        ValueHead.load("someone/vicuan")
    with pytest.raises(ValueHeadError, match=r"hf://\./x: not a Hugging Face Hub repository"):
        ValueHead.load("hf://./x")
