"""The residual stream taken apart, TransformerLens-style: accumulated and decomposed residuals,
per-head and per-neuron outputs, the final norm applied with its scale frozen, and direct logit
attribution. `ActivationCache`'s methods of the same names call these.

Gemma's sandwich norms make this less simple than on GPT-2. Each attention and MLP output is
RMS-normed (`post_attention_norm` / `post_ffw_norm`, gain 1 + w) before it joins the residual:

    attn_out = o * s * (1 + w),   o = sum_h z_h W_O[h],   s = 1 / rms(o)  (per position)

so `attn_out` is *not* the sum of what each head computes — until `s` is frozen at its value in
the run. With `s` frozen, head h's share `z_h W_O[h] * s * (1 + w)` is linear and the heads sum
to `hook_attn_out` exactly; likewise each neuron's share of `hook_mlp_out`, and each component's
share of the logits through the final norm with its own scale frozen (`apply_ln_to_stack`). The
frozen scales are read from the run (`...norm.hook_scale`), so those hooks must be captured.

Every stack is (components, B, S', D) in float32, S' the positions kept by `pos_slice`
(int, slice, list or tensor, along the cache's stored positions); labels are TransformerLens':
"embed", "3_attn_out", "3_mlp_out", "L3H1", "L3N17", "3_pre", "3_mid", "final_post".
"""

from __future__ import annotations

import torch
from torch import Tensor

from gemma3_lab.errors import Gemma3LabError
from gemma3_lab.instrument.tl_compat import matrix


class MissingActivation(Gemma3LabError, KeyError):
    """A decomposition needs a hook point the cache does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def need(cache, name: str, why: str) -> Tensor:
    """cache[name] as float32 with a batch axis, or one line naming what to capture."""
    if name not in cache:
        raise MissingActivation(f"{why} needs {name!r}: capture it (run_with_cache without a names_filter, "
                                f"or one that includes it)")
    t = cache[name]
    t = t if cache.has_batch_dim else t[None]
    return t.float()


def positions(t: Tensor, pos_slice) -> Tensor:
    """Keep `pos_slice` along the sequence axis (axis 1 of a batched tensor)."""
    if pos_slice is None:
        return t
    if isinstance(pos_slice, int):
        return t[:, pos_slice : pos_slice + 1] if pos_slice != -1 else t[:, -1:]
    if isinstance(pos_slice, slice):
        return t[:, pos_slice]
    return t.index_select(1, torch.as_tensor(pos_slice, dtype=torch.long, device=t.device).flatten())


def _n_layers(cache, layer: int | None) -> int:
    n = cache.model.config.text.num_layers
    if layer is None or layer == -1:
        return n
    return layer + n if layer < 0 else layer


def _finish(cache, parts: list[Tensor], labels: list[str], return_labels: bool):
    stack = torch.stack(parts) if parts else torch.empty(0)
    if not cache.has_batch_dim:
        stack = stack[:, 0]
    return (stack, labels) if return_labels else stack


def _embed(cache, pos_slice) -> Tensor:
    name = "hook_inputs_embeds" if "hook_inputs_embeds" in cache else "blocks.0.hook_resid_pre"
    return positions(need(cache, name, "the embedding component"), pos_slice)


def gain(norm) -> Tensor:
    """(D,) float32: an RMSNorm's multiplier 1 + w, as the model applies it."""
    return 1.0 + norm.weight.detach().float()


# ------------------------------------------------------------------ residual stacks
def accumulated_resid(cache, layer=None, incl_mid=False, apply_ln=False, pos_slice=None, return_labels=False):
    """The residual stream entering each layer up to `layer` (None: all, then "final_post",
    the residual before the final norm); `incl_mid` adds each layer's `resid_mid`."""
    n = _n_layers(cache, layer)
    total = cache.model.config.text.num_layers
    parts, labels = [], []
    for i in range(min(n + 1, total)):
        parts.append(positions(need(cache, f"blocks.{i}.hook_resid_pre", "accumulated_resid"), pos_slice))
        labels.append(f"{i}_pre")
        if incl_mid and i < n:
            parts.append(positions(need(cache, f"blocks.{i}.hook_resid_mid", "accumulated_resid"), pos_slice))
            labels.append(f"{i}_mid")
    if n == total:
        parts.append(positions(need(cache, f"blocks.{total - 1}.hook_resid_post", "accumulated_resid"), pos_slice))
        labels.append("final_post")
    if apply_ln:
        parts = list(_apply_ln(cache, torch.stack(parts), n, pos_slice))
    return _finish(cache, parts, labels, return_labels)


def decompose_resid(cache, layer=None, mode="all", incl_embeds=True, apply_ln=False, pos_slice=None,
                    return_labels=False):
    """The residual entering `layer` (None: before the final norm) as the sum of its parts:
    "embed" (the scaled embeddings, image features scattered in), then each layer's
    attention and MLP outputs; `mode` "attn" or "mlp" keeps one kind. The parts sum to the
    residual exactly: Gemma has no positional embedding to add (RoPE acts inside attention)."""
    if mode not in ("all", "attn", "mlp"):
        raise Gemma3LabError(f"mode must be 'all', 'attn' or 'mlp', not {mode!r}")
    n = _n_layers(cache, layer)
    parts, labels = ([_embed(cache, pos_slice)], ["embed"]) if incl_embeds else ([], [])
    for i in range(n):
        for kind in ("attn", "mlp"):
            if mode in ("all", kind):
                parts.append(positions(need(cache, f"blocks.{i}.hook_{kind}_out", "decompose_resid"), pos_slice))
                labels.append(f"{i}_{kind}_out")
    if apply_ln:
        parts = list(_apply_ln(cache, torch.stack(parts), n, pos_slice))
    return _finish(cache, parts, labels, return_labels)


# ------------------------------------------------------------------ per head, per neuron
def head_results(cache, layer: int, pos_slice=None) -> Tensor:
    """(B, S', N, D) float32: what each head of `layer` adds to the residual, through
    `post_attention_norm` with its scale frozen; the heads sum to `hook_attn_out`."""
    block = cache.model.blocks[layer]
    z = positions(need(cache, f"blocks.{layer}.attn.hook_z", "per-head results"), pos_slice)  # (B, S', N, H)
    scale = positions(need(cache, f"blocks.{layer}.post_attention_norm.hook_scale", "per-head results"), pos_slice)
    N, H = z.shape[-2], z.shape[-1]
    w_o = matrix(block.attn.o_proj).detach().float().T.reshape(N, H, -1)  # (N, H, D)
    out = torch.einsum("bsnh,nhd->bsnd", z, w_o)
    return out * scale[..., None, :] * gain(block.post_attention_norm)


def stack_head_results(cache, layer=None, return_labels=False, incl_remainder=False, pos_slice=None,
                       apply_ln=False):
    """(L·N [+1], B, S', D): every head of every layer before `layer` (None: all), labelled
    "L{l}H{h}"; `incl_remainder` adds what the heads do not explain of that residual
    (embedding and MLPs), so the stack sums to it."""
    n = _n_layers(cache, layer)
    parts, labels = [], []
    for i in range(n):
        r = head_results(cache, i, pos_slice)
        parts.extend(r.unbind(2))
        labels.extend(f"L{i}H{h}" for h in range(r.shape[2]))
    if incl_remainder:
        parts.append(_resid_at(cache, n, pos_slice) - torch.stack(parts).sum(0))
        labels.append("remainder")
    if apply_ln:
        parts = list(_apply_ln(cache, torch.stack(parts), n, pos_slice))
    return _finish(cache, parts, labels, return_labels)


def neuron_results(cache, layer: int, pos_slice=None, neuron_slice=None) -> Tensor:
    """(B, S', I', D) float32: each MLP neuron's share of `hook_mlp_out` (post-activation
    times its `W_out` row, through `post_ffw_norm` with its scale frozen)."""
    block = cache.model.blocks[layer]
    post = positions(need(cache, f"blocks.{layer}.mlp.hook_post", "per-neuron results"), pos_slice)  # (B, S', I)
    scale = positions(need(cache, f"blocks.{layer}.post_ffw_norm.hook_scale", "per-neuron results"), pos_slice)
    w_out = matrix(block.mlp.down_proj).detach().float().T  # (I, D)
    if neuron_slice is not None:
        post, w_out = post[..., neuron_slice], w_out[neuron_slice]
    return post[..., None] * w_out * (scale[..., None, :] * gain(block.post_ffw_norm))


def stack_neuron_results(cache, layer=None, pos_slice=None, neuron_slice=None, return_labels=False,
                         incl_remainder=False, apply_ln=False):
    """(L·I' [+1], B, S', D): every neuron's output, labelled "L{l}N{n}". Large — S' × I × D
    floats per layer — so pick positions (`pos_slice`) and neurons (`neuron_slice`)."""
    n = _n_layers(cache, layer)
    idx = torch.arange(cache.model.config.text.intermediate_size)
    idx = idx if neuron_slice is None else idx[neuron_slice]
    parts, labels = [], []
    for i in range(n):
        parts.extend(neuron_results(cache, i, pos_slice, neuron_slice).unbind(2))
        labels.extend(f"L{i}N{int(j)}" for j in idx.reshape(-1))
    if incl_remainder:
        parts.append(_resid_at(cache, n, pos_slice) - torch.stack(parts).sum(0))
        labels.append("remainder")
    if apply_ln:
        parts = list(_apply_ln(cache, torch.stack(parts), n, pos_slice))
    return _finish(cache, parts, labels, return_labels)


def _resid_at(cache, n: int, pos_slice) -> Tensor:
    total = cache.model.config.text.num_layers
    name = f"blocks.{n}.hook_resid_pre" if n < total else f"blocks.{total - 1}.hook_resid_post"
    return positions(need(cache, name, "the remainder"), pos_slice)


# ------------------------------------------------------------------ norms and logits
def _norm_at(cache, layer: int, mlp_input: bool):
    """(the RMSNorm that reads the residual at `layer`, its hook name prefix)."""
    total = cache.model.config.text.num_layers
    if layer >= total:
        return cache.model.final_norm, "final_norm"
    which = "pre_ffw_norm" if mlp_input else "pre_attention_norm"
    return getattr(cache.model.blocks[layer], which), f"blocks.{layer}.{which}"


def _apply_ln(cache, stack: Tensor, layer: int, pos_slice, mlp_input=False, recompute_ln=False) -> Tensor:
    norm, prefix = _norm_at(cache, layer, mlp_input)
    if recompute_ln:  # each component normed as if it were the whole residual (the logit lens)
        scale = torch.rsqrt(stack.pow(2).mean(-1, keepdim=True) + norm.eps)
    else:
        scale = positions(need(cache, f"{prefix}.hook_scale", "apply_ln_to_stack"), pos_slice)
    return stack * scale * gain(norm)


def apply_ln_to_stack(cache, residual_stack: Tensor, layer=None, mlp_input=False, pos_slice=None,
                      recompute_ln=False) -> Tensor:
    """Each component through the norm that reads the residual at `layer` (None: the final
    norm), with the scale frozen at its value in the run: linear, so the normed components sum
    to the norm's output. `recompute_ln` norms every component by its own rms instead."""
    batched = cache.has_batch_dim
    stack = residual_stack.float() if batched else residual_stack.float()[:, None]
    out = _apply_ln(cache, stack, _n_layers(cache, layer), pos_slice, mlp_input, recompute_ln)
    return out if batched else out[:, 0]


def logit_directions(cache, tokens, incorrect_tokens=None) -> Tensor:
    """(D, ...) float32 columns of W_U for `tokens` (int, str of one token, or a tensor),
    minus those of `incorrect_tokens` when given."""
    def ids(t):
        if isinstance(t, str):
            one = cache.model.tokenizer.encode(t, add_bos=False)
            if len(one) != 1:
                raise Gemma3LabError(f"{t!r} is {len(one)} tokens, not one")
            t = one[0]
        return torch.as_tensor(t, dtype=torch.long)

    w_u = cache.model.W_U.detach().float()
    d = w_u[:, ids(tokens)]
    return d if incorrect_tokens is None else d - w_u[:, ids(incorrect_tokens)]


def logit_attrs(cache, residual_stack: Tensor, tokens, incorrect_tokens=None, pos_slice=None) -> Tensor:
    """Direct logit attribution: each component's contribution to the logit of `tokens` (minus
    `incorrect_tokens`), through the final norm with its scale frozen — (C, B, S') or, for a
    tensor of tokens per position, shaped to match. The components of `decompose_resid()`
    sum to the logit exactly. With `final_logit_softcapping` set (no released Gemma 3 sets
    it) they sum to the logit before the cap, c·atanh(logit / c)."""
    scaled = apply_ln_to_stack(cache, residual_stack, None, pos_slice=pos_slice)  # (C, B, S', D)
    d = logit_directions(cache, tokens, incorrect_tokens).to(scaled.device)  # (D,) or (D, *tok)
    if d.dim() == 1:
        return scaled @ d
    return (scaled * torch.movedim(d, 0, -1)).sum(-1)
