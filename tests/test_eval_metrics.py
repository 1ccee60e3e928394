"""Evaluation helpers: the paper's diversity, the grid syntax, the report table."""

from __future__ import annotations

import math

import pytest

from vllm_recontrol.evaluation.evaluate import MethodResult, markdown_table, parse_grid
from vllm_recontrol.evaluation.metrics import Coherence, diversity
from vllm_recontrol.training.common import RecontrolError


def test_diversity_by_hand():
    # "a b a b": 2-grams ab, ba, ab -> 2 unique / (3 + 1); 3-grams aba, bab -> 2 / 3;
    # 4-grams abab -> 1 / 2.
    assert diversity("a b a b") == pytest.approx((2 / 4) * (2 / 3) * (1 / 2))


def test_repetition_lowers_diversity():
    assert diversity("the cat sees the dog and a bird") > diversity("the the the the the the")


def test_short_text_has_zero_diversity_not_an_error():
    assert diversity("") == 0.0 and diversity("one two") == 0.0


def test_grid_syntax():
    assert parse_grid("0.5:10, 1:20") == [(0.5, 10), (1.0, 20)]
    assert parse_grid([[2, 3]]) == [(2.0, 3)]
    for bad in ["0.5", "x:3", "0.5:0", "-1:3", ""]:
        with pytest.raises(RecontrolError, match="alpha:steps"):
            parse_grid(bad)


def test_table_reports_unavailable_coherence_with_its_reason():
    results = [MethodResult("base", reward=0.4, diversity=0.5, generated_tokens=100,
                            delivered_tokens=100, seconds=1.0),
               MethodResult("best-of-4", n=4, reward=0.8, diversity=0.6, generated_tokens=400,
                            delivered_tokens=100, seconds=2.0)]
    table = markdown_table(results, Coherence.load(None))
    assert "| best-of-4 | 0 | 0 | 4 | 0.8000 | 0.600 | n/a | 200.0 | 50.0 | 0.50 |" in table
    assert "coherence: unavailable (no --embedding-model given)" in table
    assert math.isnan(MethodResult("x").tokens_per_s)
