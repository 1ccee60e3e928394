"""The toy world's text, reward and training tensors (the trained LM is covered end to end)."""

from __future__ import annotations

import random

from vllm_recontrol import toy_world as tw


def test_prompts_are_deterministic_single_mood_sentences():
    assert tw.prompts(20, seed=3) == tw.prompts(20, seed=3) != tw.prompts(20, seed=4)
    for text in tw.prompts(50, seed=0):
        words = text.split()
        assert words[-1] == "." and set(words) <= set(tw.WORDS)
        share = tw.positive_share("", text)
        assert share in (0.0, 1.0)  # one mood per sentence


def test_mood_carries_over_at_the_configured_rate():
    rng = random.Random(0)
    pairs = [tw.document(rng, mood_carry=0.75) for _ in range(4000)]
    same = sum(tw.positive_share("", a) == tw.positive_share("", b) for a, b in pairs)
    assert 0.72 < same / len(pairs) < 0.78


def test_positive_share():
    assert tw.positive_share("p", "the good happy cat sees a bad dog .") == 2 / 3
    assert tw.positive_share("p", "the cat sees a dog .") == 0.0
    assert tw.positive_share("p", "") == 0.0


def test_training_tensors_pad_with_eos_and_mask_the_padding(tmp_path):
    from vllm_recontrol.toy import build_tokenizer

    tokenizer = build_tokenizer(tmp_path, tw.WORDS)
    ids, labels = tw._training_tensors(tokenizer, ["the cat .", "the good cat sees a dog ."])
    eos = tokenizer.eos_token_id
    assert ids.shape == labels.shape == (2, 9)
    assert ids[0].tolist()[:5] == [tokenizer.bos_token_id, *tokenizer.convert_tokens_to_ids(
        ["the", "cat", "."]), eos]
    assert ids[0, 5:].tolist() == [eos] * 4  # padded with EOS ...
    assert labels[0, :5].tolist() == ids[0, :5].tolist()  # ... the first EOS is learned ...
    assert labels[0, 5:].tolist() == [-100] * 4  # ... the padding is not
    assert labels[1].tolist() == ids[1].tolist()
