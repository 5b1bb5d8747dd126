"""Bits per byte, checked against hand computations on known strings."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from resstream.data.tokenizer import ByteTokenizer
from resstream.metrics import bits_per_byte, eval_window_starts, evaluate_bpb


class FixedDistributionModel(torch.nn.Module):
    """Predicts the same next-byte distribution at every position, whatever the input."""

    def __init__(self, probabilities: dict[int, float]):
        super().__init__()
        rest = (1.0 - sum(probabilities.values())) / (256 - len(probabilities))
        probs = torch.full((256,), rest, dtype=torch.float64)
        for token, p in probabilities.items():
            probs[token] = p
        self.register_buffer("log_probs", probs.log().float())
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        return self.log_probs.expand(*input_ids.shape, 256).clone()


def test_bpb_of_a_known_string_matches_hand_computation():
    # Text "abba": the model predicts 'b', 'b', 'a' (the first byte has no context).
    # p(a) = 1/2, p(b) = 1/4, so the losses are ln 4 + ln 4 + ln 2 = 5 ln 2 nats = 5 bits
    # over 3 predicted bytes: 5/3 bits per byte.
    model = FixedDistributionModel({ord("a"): 0.5, ord("b"): 0.25})
    tokens = ByteTokenizer().encode("abba")
    result = evaluate_bpb(model, tokens, seq_len=3)
    assert result.tokens == 3 and result.bytes == 3
    assert result.total_nats == pytest.approx(5 * math.log(2), rel=1e-6)
    assert result.bpb == pytest.approx(5 / 3, rel=1e-6)
    assert result.loss == pytest.approx(5 * math.log(2) / 3, rel=1e-6)


def test_bpb_counts_bytes_not_characters():
    # "é" is two UTF-8 bytes (0xC3 0xA9): "aé" is three byte tokens and two targets.
    # p(0xC3) = 1/2 and p(0xA9) = 1/8: ln 2 + ln 8 = 4 ln 2 nats = 4 bits over 2 bytes = 2 bpb,
    # although the text has only one predicted *character*.
    model = FixedDistributionModel({0xC3: 0.5, 0xA9: 0.125})
    tokens = ByteTokenizer().encode("aé")
    assert list(tokens) == [97, 0xC3, 0xA9]
    result = evaluate_bpb(model, tokens, seq_len=2)
    assert result.bytes == 2
    assert result.bpb == pytest.approx(2.0, rel=1e-6)


def test_uniform_model_is_eight_bits_per_byte():
    model = FixedDistributionModel({})
    tokens = np.arange(0, 200, dtype=np.uint8)
    assert evaluate_bpb(model, tokens, seq_len=16, batch_size=3).bpb == pytest.approx(8.0, rel=1e-6)


def test_token_byte_table_changes_the_denominator():
    # With a (hypothetical) tokenizer where every token spells 2 bytes, bpb halves.
    model = FixedDistributionModel({})
    tokens = np.arange(0, 65, dtype=np.uint8)
    result = evaluate_bpb(model, tokens, seq_len=8, token_bytes=np.full(256, 2))
    assert result.bytes == 2 * result.tokens
    assert result.bpb == pytest.approx(4.0, rel=1e-6)


def test_bits_per_byte_formula_and_errors():
    assert bits_per_byte(8 * math.log(2), 8) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="n_bytes=0"):
        bits_per_byte(1.0, 0)


def test_eval_windows_are_fixed_and_non_overlapping():
    starts = eval_window_starts(n_tokens=1 + 10 * 8, seq_len=8)
    assert list(starts) == [8 * i for i in range(10)]  # every target predicted exactly once
    budget = eval_window_starts(n_tokens=1 + 10 * 8, seq_len=8, max_tokens=40)
    assert list(budget) == [0, 16, 32, 48, 64]  # 5 windows spread over the whole text
    assert list(budget) == list(eval_window_starts(1 + 10 * 8, 8, max_tokens=40))
    assert eval_window_starts(5, 8).size == 0


def test_evaluate_rejects_data_shorter_than_one_window():
    with pytest.raises(ValueError, match="at least seq_len"):
        evaluate_bpb(FixedDistributionModel({}), np.zeros(4, dtype=np.uint8), seq_len=8)


def test_progress_callback_sees_every_window():
    calls = []
    evaluate_bpb(FixedDistributionModel({}), np.arange(0, 81, dtype=np.uint8), seq_len=8,
                 batch_size=4, on_batch=lambda done, total: calls.append((done, total)))
    assert calls == [(4, 10), (8, 10), (10, 10)]
