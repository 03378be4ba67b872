"""Helpers shared by test files (tests/ is on sys.path under pytest's default import mode)."""

from __future__ import annotations

import contextlib

import torch

from gemma3_lab.config import Gemma3Config, TextConfig, pattern_layer_types
from gemma3_lab.explorer import Gemma3


def tiny_decoder(seed: int = 0) -> Gemma3:
    """A 3-layer random text model (local, global, local) with a 4-token window: a few
    decode steps slide the window and grow the global cache."""
    text = TextConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
                      num_kv_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
                      layer_types=pattern_layer_types(3, 2))
    return random_gemma(Gemma3Config(text, name="tiny"), seed=seed)


def random_gemma(config: Gemma3Config, seed: int = 0, std: float = 0.2) -> Gemma3:
    """A Gemma3 with every parameter drawn from N(0, std²) after `torch.manual_seed(seed)`:
    weights large enough that attention patterns and logits are far from uniform."""
    torch.manual_seed(seed)
    model = Gemma3(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def steps_in_turns(model, ids, n: int, fast_module, cache=None):
    """(n + 1, V) logits like `greedy_steps`, the decode steps taken in turns: the fast step
    (where it applies), then the eager lean step (`fast_module.step`, the compiled or native
    step, made to step aside), then the plain forward, and again; all into one cache."""
    from unittest import mock

    from gemma3_lab.generate import decode_one, prefill
    from gemma3_lab.model.kv_cache import KVCache

    cache = KVCache(model.config.text) if cache is None else cache
    with torch.no_grad():
        logits = [prefill(model, model.to_inputs(ids), cache)]
        for i in range(n):
            nxt = int(logits[-1].argmax())
            with mock.patch.object(fast_module, "step", lambda *a: None) if i % 3 == 1 else contextlib.nullcontext():
                logits.append(decode_one(model, nxt, cache, i % 3 != 2))
    return torch.stack(logits)


def greedy_steps(model, ids, n: int, fast: bool, cache=None):
    """(n + 1, V) logits: the prefill of `ids`, then n greedy decode steps (`fast`: the lean or
    compiled step where it applies), into `cache` if given (to read its `paths` after)."""
    from gemma3_lab.generate import decode_one, prefill
    from gemma3_lab.model.kv_cache import KVCache

    cache = KVCache(model.config.text) if cache is None else cache
    with torch.no_grad():
        logits = [prefill(model, model.to_inputs(ids), cache)]
        for _ in range(n):
            logits.append(decode_one(model, int(logits[-1].argmax()), cache, fast))
    return torch.stack(logits)


def bf16_noise_check(fast, plain, reference) -> None:
    """A bfloat16 step (`fast`) that rounds elsewhere than the plain bfloat16 path (its products
    summed in another order, its fused loops rounding at their ends) against the plain path,
    both (n + 1, V) logits of the same greedy tokens: the same tokens, and no further from
    float32's logits (`reference`) than the plain path is, give or take bfloat16 noise. On the
    270M the plain bfloat16 logits lie 2.3% from float32's, the C gemv's lean step 2.9%, and
    2.2% from each other."""
    def rel(a, b):
        return float(((a.float() - b.float()).norm(dim=-1) / b.float().norm(dim=-1)).max())

    assert torch.equal(fast.argmax(-1), plain.argmax(-1)) and torch.equal(plain.argmax(-1), reference.argmax(-1))
    ours, theirs = rel(fast, reference), rel(plain, reference)
    assert ours <= 1.5 * theirs + 5e-3 and rel(fast, plain) <= 2 * theirs + 5e-3, (ours, theirs, rel(fast, plain))
