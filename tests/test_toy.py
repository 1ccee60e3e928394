"""The self-made tokenizers that the tests and the demo build (nothing is downloaded)."""

from __future__ import annotations

import pytest

from vllm_recontrol.toy import build_tokenizer

TEXT = 'the good kan {"mood": "bad", "n": 12} zo-ze, naïve'


def test_byte_level_bpe_is_deterministic_and_encodes_any_text(tmp_path):
    first = build_tokenizer(tmp_path / "a", kind="byte-bpe")
    build_tokenizer(tmp_path / "b", kind="byte-bpe")  # a second build, same files
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == \
        (tmp_path / "b" / "tokenizer.json").read_bytes()
    ids = first(TEXT).input_ids
    assert ids[0] == first.bos_token_id and first.unk_token_id not in ids
    assert first.decode(ids, skip_special_tokens=True) == TEXT
    # trained on the word list: its words (with their leading space) are single tokens
    assert first.convert_ids_to_tokens(first(" good").input_ids[1:]) == ["Ġgood"]


def test_word_level_tokenizer_is_one_token_per_known_word(tmp_path):
    tokenizer = build_tokenizer(tmp_path, ["the", "good"])
    ids = tokenizer("the good kan").input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.convert_ids_to_tokens(ids[1:]) == ["the", "good", "<unk>"]


def test_unknown_tokenizer_kind_is_refused(tmp_path):
    with pytest.raises(ValueError, match="byte-bpe"):
        build_tokenizer(tmp_path, kind="sentencepiece")
