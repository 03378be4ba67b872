"""Tiny random configs shaped like Gemma 3 1B and 4B equal transformers with the same
weights (written by transformers, loaded by our loader), on both attention paths,
with left padding, and with a KV cache."""

from __future__ import annotations

import pytest
import torch

from gemma3_lab.load import build
from gemma3_lab.loading.hf import load_hf_state_dict
from gemma3_lab.model.kv_cache import KVCache

pytestmark = pytest.mark.oracle

SHAPES = {
    # 1B-shaped: 1 kv head, default RoPE on both layer types, window 512 -> 8
    "1b": dict(num_attention_heads=4, num_key_value_heads=1, sliding_window=8),
    # 4B-shaped: GQA 2:1, global linear RoPE x8, another window, final softcapping set
    "4b": dict(
        num_attention_heads=4, num_key_value_heads=2, sliding_window=5,
        rope_scaling={"rope_type": "linear", "factor": 8.0}, final_logit_softcapping=30.0,
        query_pre_attn_scalar=24,
    ),
}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def pair(request, tmp_path_factory):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    hc = Gemma3TextConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=7, head_dim=16,
        attn_implementation="eager", **SHAPES[request.param],
    )
    hf = Gemma3ForCausalLM(hc).eval()
    with torch.no_grad():  # norms start at zero: randomise so (1 + w) is really tested
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.normal_(0.0, 0.3)
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    hf.save_pretrained(folder)
    config, state = load_hf_state_dict(folder, progress=False)
    return hf, build(config, state)


def _hf_logits(hf, ids, mask=None, impl="eager"):
    hf.config._attn_implementation = impl
    kw = {}
    if mask is not None:
        kw = dict(attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0))
    with torch.no_grad():
        return hf(input_ids=ids, **kw).logits


@pytest.mark.parametrize("path", ["explicit", "sdpa"])
def test_logits_match(pair, path):
    hf, ours = pair
    ids = torch.randint(1, 300, (2, 23), generator=torch.Generator().manual_seed(1))
    ours.set_attention_path(path)
    with torch.no_grad():
        got = ours(ids).logits
    ours.set_attention_path("sdpa")
    ref = _hf_logits(hf, ids, impl="eager" if path == "explicit" else "sdpa")
    assert (got - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("path", ["explicit", "sdpa"])
def test_left_padding_matches(pair, path):
    hf, ours = pair
    ids = torch.randint(1, 300, (2, 19), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    ids[1, :6] = 0
    ours.set_attention_path(path)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask).logits
    ours.set_attention_path("sdpa")
    ref = _hf_logits(hf, ids, mask, impl="eager" if path == "explicit" else "sdpa")
    real = mask.bool()  # padded query rows carry no meaning (docs/gemma3.md §3.4)
    assert (got - ref)[real].abs().max() <= 1e-5


def test_cache_matches_full_forward_with_padding(pair):
    _, ours = pair
    ids = torch.randint(1, 300, (2, 30), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad():
        full = ours(ids, attention_mask=mask).logits
        cache = KVCache(ours.config.text)
        parts = [ours(ids[:, :12], attention_mask=mask[:, :12], cache=cache).logits]
        for t in range(12, 30):  # every step past the window of 8 / 5
            parts.append(ours(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache).logits)
    inc = torch.cat(parts, dim=1)
    assert (inc - full)[mask.bool()].abs().max() <= 1e-5
