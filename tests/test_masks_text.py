"""Text-only masks written out as 0/1 matrices: causal, the sliding window of a local layer
against the global layer, left padding, and a cache offset (queries at slots k.. over keys
from 0, or from the window's start on a local layer); and the model draws the very same
matrices in `hook_mask` (docs/gemma3.md §3.1, §3.2, §3.4, §3.5)."""

from __future__ import annotations

import pytest
import torch

from gemma3_lab.config import Gemma3Config, TextConfig, pattern_layer_types
from gemma3_lab.explorer import Gemma3
from gemma3_lab.model.kv_cache import KVCache
from gemma3_lab.model.masks import causal, layer_mask, model_masks, sliding_window


def _m(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


CAUSAL_5 = _m([
    [1, 0, 0, 0, 0],
    [1, 1, 0, 0, 0],
    [1, 1, 1, 0, 0],
    [1, 1, 1, 1, 0],
    [1, 1, 1, 1, 1],
])

GLOBAL_7 = _m([
    [1, 0, 0, 0, 0, 0, 0],
    [1, 1, 0, 0, 0, 0, 0],
    [1, 1, 1, 0, 0, 0, 0],
    [1, 1, 1, 1, 0, 0, 0],
    [1, 1, 1, 1, 1, 0, 0],
    [1, 1, 1, 1, 1, 1, 0],
    [1, 1, 1, 1, 1, 1, 1],
])

LOCAL_7_W3 = _m([  # each query sees itself and the 2 slots before it: 3 keys at most
    [1, 0, 0, 0, 0, 0, 0],
    [1, 1, 0, 0, 0, 0, 0],
    [1, 1, 1, 0, 0, 0, 0],
    [0, 1, 1, 1, 0, 0, 0],
    [0, 0, 1, 1, 1, 0, 0],
    [0, 0, 0, 1, 1, 1, 0],
    [0, 0, 0, 0, 1, 1, 1],
])


def test_causal():
    pos = torch.arange(5)
    assert torch.equal(causal(pos, pos), CAUSAL_5)
    assert torch.equal(layer_mask(pos, pos)[0, 0], CAUSAL_5)
    assert layer_mask(pos, pos).shape == (1, 1, 5, 5)


def test_sliding_window_is_only_the_backward_bound():
    pos = torch.arange(5)
    assert torch.equal(sliding_window(pos, pos, 2), _m([  # causality is a separate rule
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1],
        [0, 1, 1, 1, 1],
        [0, 0, 1, 1, 1],
        [0, 0, 0, 1, 1],
    ]))


def test_local_layer_against_global_layer():
    # the 5 local : 1 global pattern in miniature: windows of layers 0..5, the last global
    masks = model_masks([3, 3, 3, 3, 3, None], 7)
    for m in masks[:5]:
        assert torch.equal(m[0, 0], LOCAL_7_W3)
    assert torch.equal(masks[5][0, 0], GLOBAL_7)
    assert masks[0] is masks[4]  # layers with one window share one tensor


def test_left_padding_masks_pad_keys_and_leaves_pad_rows_empty():
    # row 0 has two pads on the left, row 1 none
    attention = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    full, local = model_masks([None, 2], 5, attention_mask=attention)
    assert full.shape == (2, 1, 5, 5)
    assert torch.equal(full[0, 0], _m([
        [0, 0, 0, 0, 0],  # pad queries see nothing: their rows carry no meaning
        [0, 0, 0, 0, 0],
        [0, 0, 1, 0, 0],  # the first real token sees only itself
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ]))
    assert torch.equal(local[0, 0], _m([  # window 2, counted in slots: pads are contiguous
        [0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 0, 1, 1],
    ]))
    assert torch.equal(full[1, 0], CAUSAL_5)  # the unpadded row is untouched


def test_cache_offset_global_and_local():
    # 4 slots already cached, 2 new queries at slots 4 and 5; window 3
    text = TextConfig(num_layers=2, sliding_window=3, layer_types=pattern_layer_types(2, 2))
    kv = KVCache(text)
    kv.length = 4
    q = torch.arange(4, 6)
    local_t, global_t = text.layer_types
    assert kv.kv_slots(global_t, 2).tolist() == [0, 1, 2, 3, 4, 5]
    assert kv.kv_slots(local_t, 2).tolist() == [2, 3, 4, 5]  # the local layer kept W-1 = 2 slots
    assert torch.equal(layer_mask(q, kv.kv_slots(global_t, 2))[0, 0], _m([
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1],
    ]))
    assert torch.equal(layer_mask(q, kv.kv_slots(local_t, 2), 3)[0, 0], _m([
        #  2  3  4  5   (key slots)
        [1, 1, 1, 0],
        [0, 1, 1, 1],
    ]))
    # one decode step at slot 6 over the same cache, with slot 1 a left pad
    kv.length = 6
    key_valid = torch.tensor([[1, 0, 1, 1, 1, 1, 1]])
    one = torch.tensor([6])
    assert torch.equal(layer_mask(one, kv.kv_slots(global_t, 1), None, None, key_valid)[0, 0],
                       _m([[1, 0, 1, 1, 1, 1, 1]]))
    assert torch.equal(layer_mask(one, kv.kv_slots(local_t, 1), 3, None, key_valid)[0, 0],
                       _m([[1, 1, 1]]))  # key slots 4, 5, 6


@pytest.fixture(scope="module")
def tiny():
    """Text only: local window 3, global (local, global)."""
    text = TextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=2,
                      num_kv_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=3,
                      layer_types=pattern_layer_types(2, 2))
    torch.manual_seed(0)
    return Gemma3(Gemma3Config(text, None, name="tiny-text")).eval()


def test_model_uses_these_masks_with_padding(tiny):
    ids = torch.tensor([[0, 0, 5, 6, 7, 8, 9], [3, 4, 5, 6, 7, 8, 9]])
    attention = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    with torch.no_grad():
        _, cache = tiny.run_with_cache(ids, ["blocks.*.attn.hook_mask"], attention_mask=attention)
    local, full = cache["blocks.0.attn.hook_mask"], cache["blocks.1.attn.hook_mask"]
    assert torch.equal(local, model_masks([3], 7, attention_mask=attention)[0])
    assert torch.equal(full, model_masks([None], 7, attention_mask=attention)[0])
    assert torch.equal(local[1, 0], LOCAL_7_W3) and torch.equal(full[1, 0], GLOBAL_7)
    assert torch.equal(full[0, 0, 2:, 2:], GLOBAL_7[:5, :5]) and not full[0, 0, :, :2].any()


def test_model_uses_these_masks_with_a_cache_offset(tiny):
    seen = {}

    def keep(name):
        def hook(t, hook):
            seen[name] = t.clone()
        return hook

    kv = KVCache(tiny.config.text)
    hooks = [(f"blocks.{i}.attn.hook_mask", keep(i)) for i in range(2)]
    with torch.no_grad():
        tiny(torch.tensor([[3, 4, 5, 6]]), cache=kv)
        with tiny.hooks(hooks):
            tiny(torch.tensor([[7, 8]]), cache=kv)
    assert torch.equal(seen[0][0, 0], _m([[1, 1, 1, 0], [0, 1, 1, 1]]))  # keys at slots 2..5
    assert torch.equal(seen[1][0, 0], _m([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]))  # keys 0..5
