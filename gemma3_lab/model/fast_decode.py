"""One decode step with nothing to observe, in fewer operations than the instrumented forward.

The same arithmetic as `Gemma3Network.forward` for a single new token (the same ops in the
same order, so float32 logits are bit-for-bit the plain path's), minus what only matters
when something is watching or the batch is irregular: no hook points, no mask plans, no
module calls per norm; the RMSNorm offsets (1 + w) are built once, and the projections go
through `kernels.linear` (oneDNN-packed bfloat16, packed low-bit kernels).

`decode_step` returns None whenever the plain forward must run instead: any hook on any
module (instrumentation sees everything), an attention path forced explicit, padding or
images in the cache, or a cache that was not filled by a prefill. A step that applies takes
the native step where that applies (`native_decode`: float32 or bfloat16 weights, or int8/int4
codes, on a CPU with its C loops; up to 4 rows), else for one row the model's compiled step
where it is ready (`compiled_decode`, started by `Gemma3.compile_decode`). Several rows
decoding from one prompt (`generate_batch`) take one step together, native or lean: one pass
over the float weights for all of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from gemma3_lab.model import compiled_decode, kernels, native_decode
from gemma3_lab.model.explicit import grouped_matmul
from gemma3_lab.model.hook_point import LOCAL_HOOKS, _global_hooks_present
from gemma3_lab.model.kv_cache import KVCache
from gemma3_lab.model.norm import RMSNorm, decode_gain, fused_rms_norm
from gemma3_lab.model.rope import apply_rope, rope_tables


def applies(net, cache: KVCache) -> bool:
    """Can a step over this cache (any number of rows) take the lean path and still compute
    exactly what the plain one would?"""
    if cache.next_position is None or cache.key_valid is not None or cache.block_ids is not None:
        return False
    # hooks attached with `model.hooks()` live in this context, not on the modules
    if _global_hooks_present() or LOCAL_HOOKS.get():
        return False
    return not any(b.attn.explicit for b in net.blocks) and not _hooked(net, cache)


def _hooked(net, cache: KVCache) -> bool:
    """Any forward hook on any module a decode step runs? The modules' hook dicts are listed
    once per cache (walking the tree cost 1 ms a step, a fiftieth of the step), and looked at
    every step (registering a hook fills one of these dicts). The vision tower never runs in
    a decode step."""
    dicts = cache.plan.get("hook_dicts")
    if dicts is None:
        skip = {id(net.vision), id(net.projector)}
        stack, dicts = [net], []
        while stack:
            m = stack.pop()
            dicts += (m._forward_hooks, m._forward_pre_hooks)
            stack.extend(c for c in m._modules.values() if c is not None and id(c) not in skip)
        cache.plan["hook_dicts"] = dicts
    return any(dicts)


@torch.no_grad()
def decode_step(net, token_id: int | list[int], cache: KVCache) -> Tensor | None:
    """(V,) float logits for the token after `token_id`, appended at the cache's next slot;
    for a list of ids, one per row of the cache, (B, V). None (nothing done) when `applies`
    says the plain forward must run."""
    ids = [token_id] if isinstance(token_id, int) else list(token_id)
    if not applies(net, cache) or cache.next_position.shape[0] != len(ids):
        return None
    # the native step where it applies (up to 4 rows), else for one row the compiled one where ready
    path, logits = "native", native_decode.step(net, token_id, cache)
    if logits is None and len(ids) == 1:
        path, logits = "compiled", compiled_decode.step(net, ids[0], cache)
        logits = logits if logits is None or isinstance(token_id, int) else logits[None]
    cache.paths["lean" if logits is None else path] += 1
    if logits is not None:
        return logits
    cfg = net.config.text
    dev = net.final_norm.weight.device
    positions = cache.next_position[:, None]  # (B, 1)
    h = net._embed(torch.tensor([[t] for t in ids], device=dev), None)
    tables = {t: rope_tables(positions, getattr(net, f"inv_freq_{t.short}"), h.dtype) for t in set(cfg.layer_types)}
    for i, block in enumerate(net.blocks):
        h = _block(block, h, *tables[block.attention_type], cache.layers[i])
    cache.advance(1, None, None, positions)
    h = _norm(net.final_norm, h)
    if net.lm_head is not None:
        logits = kernels.linear(h, net.lm_head)
    else:
        logits = kernels.linear(h, net.embed, net.embed.weight)
    logits = net.softcap(logits)[:, -1].float()
    return logits[0] if isinstance(token_id, int) else logits


def _norm(norm: RMSNorm, x: Tensor) -> Tensor:
    """RMSNorm.forward's arithmetic in torch's one fused kernel (float32 inside, the (1 + w)
    multiply before the single cast back), with the (1 + w) factor kept between steps."""
    return fused_rms_norm(x, decode_gain(norm), norm.eps)


def _block(b, x: Tensor, cos: Tensor, sin: Tensor, layer_cache) -> Tensor:
    a = _norm(b.post_attention_norm, _attention(b.attn, _norm(b.pre_attention_norm, x), cos, sin, layer_cache))
    x = x + a
    mlp = b.mlp
    y = _norm(b.pre_ffw_norm, x)
    gate, up = kernels.linear(y, mlp.gate_proj), kernels.linear(y, mlp.up_proj)
    m = kernels.linear(F.gelu(gate, approximate="tanh") * up, mlp.down_proj)
    return x + _norm(b.post_ffw_norm, m)


def _attention(at, x: Tensor, cos: Tensor, sin: Tensor, layer_cache) -> Tensor:
    B = x.shape[0]
    N, K, H = at.n_heads, at.n_kv, at.head_dim
    q = kernels.linear(x, at.q_proj).view(B, 1, N, H)
    k = kernels.linear(x, at.k_proj).view(B, 1, K, H)
    v = kernels.linear(x, at.v_proj).view(B, 1, K, H)
    q = apply_rope(_norm(at.q_norm, q), cos, sin).transpose(1, 2)  # (B, N, 1, H)
    k = apply_rope(_norm(at.k_norm, k), cos, sin).transpose(1, 2)
    k, v = layer_cache.update(k, v.transpose(1, 2))  # (B, K, T, H)
    z = _one_query(at, q, k, v)  # (B, N, 1, H)
    return kernels.linear(z.transpose(1, 2).reshape(B, 1, N * H), at.o_proj)


def _one_query(at, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Attention of one query over the cache. CPU bfloat16/float16 batched matmuls of these
    sizes run ~5x slower than float32 ones, so reduced-precision steps multiply in float32
    and round where the plain path's products round (each product's output)."""
    if q.dtype == torch.float32:
        return at._one_query(q, k, v, None)
    scores = grouped_matmul(q.float(), k.float().transpose(2, 3)).to(q.dtype) * at.scale  # (B, N, 1, T)
    pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return grouped_matmul(pattern.float(), v.float()).to(q.dtype)
