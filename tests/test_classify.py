"""Sequence classification equals transformers' Gemma3TextForSequenceClassification."""

from __future__ import annotations

import pytest
import torch

from gemma3_lab.classify import Gemma3Classifier
from gemma3_lab.load import build
from gemma3_lab.loading.hf import load_hf_state_dict

pytestmark = pytest.mark.oracle


def test_scores_match_transformers(tmp_path):
    from transformers import Gemma3TextConfig, Gemma3TextForSequenceClassification

    torch.manual_seed(0)
    hc = Gemma3TextConfig(
        vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=4, num_labels=3, attn_implementation="eager",
    )
    hf = Gemma3TextForSequenceClassification(hc).eval()
    hf.save_pretrained(tmp_path)
    config, state = load_hf_state_dict(tmp_path, progress=False)
    ours = build(config, state)
    assert isinstance(ours, Gemma3Classifier) and ours.num_labels == 3

    ids = torch.randint(1, 200, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0  # left padding
    ids[2, -3:], mask[2, -3:] = 0, 0  # right padding: score is read before the pads
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
        got = ours.classify(ids, attention_mask=mask)
    assert got.shape == (3, 3)
    assert (got - ref).abs().max() <= 1e-5
