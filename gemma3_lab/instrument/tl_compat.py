"""TransformerLens' vocabulary on the Gemma3 model: `cfg` aliases, tokens in and out, loss, and
weight views in TransformerLens' shapes, so a HookedTransformer notebook reads the same here.

Where Gemma differs from the GPT-2 picture TransformerLens was built around:

- **embedding scale**: the residual starts at `W_E[t] * sqrt(d_model)` (the scale rounded to the
  weight dtype first); `W_E` here is the unscaled table, as stored.
- **(1 + w) RMSNorms**: every norm multiplies by `1 + w`, computed in float32; nothing is folded
  into the weights, so `W_Q` etc. are the checkpoint's matrices and a norm's gain is `1 + weight`.
- **q/k norms**: queries and keys are RMS-normed per head (`attn.q_norm`, `attn.k_norm`) before
  RoPE; `x @ W_Q` gives `hook_q`, the input of that norm, not the rotated query.
- **grouped-query attention**: `W_K`/`W_V` are repeated per *query* head, (L, n_heads, D, H),
  as TransformerLens' `W_K`; `_W_K`/`_W_V` are the stored per-*kv*-head ones, (L, n_kv, D, H).
- **tied head**: `W_U` is `W_E.T` (a view, not a copy); there is no `b_U`, and no biases anywhere.
- **gated MLP**: `W_gate` and `W_in` both read the normed residual: post = gelu_tanh(x W_gate) * (x W_in).
- **sandwich norms**: `post_attention_norm` / `post_ffw_norm` normalise each sublayer's output
  before it joins the residual, so per-head and per-neuron contributions are linear only with
  those norms' scales frozen at their values in the run (see `instrument/decompose.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gemma3_lab.errors import Gemma3LabError


@dataclass(frozen=True)
class TLConfig:
    """TransformerLens' `cfg` names for the text decoder's sizes."""

    n_layers: int
    n_heads: int
    n_key_value_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    window: int  # the local layers' sliding window
    final_logit_softcapping: float | None

    @classmethod
    def of(cls, text) -> "TLConfig":
        return cls(text.num_layers, text.num_heads, text.num_kv_heads, text.hidden_size, text.head_dim,
                   text.intermediate_size, text.vocab_size, text.max_position_embeddings, text.sliding_window,
                   text.final_logit_softcapping)


def matrix(linear: nn.Module) -> Tensor:
    """(out, in) weight of a Linear, dequantized for a weight-only quantized projection."""
    return linear.weight if isinstance(linear, nn.Linear) else linear.dequantize()


def per_token_loss(logits: Tensor, ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """(B, S-1) float32 cross-entropy of predicting token s+1 at position s; 0 where either is padding."""
    loss = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
    if attention_mask is not None:
        loss = loss * (attention_mask[:, 1:] * attention_mask[:, :-1])
    return loss


class TransformerLensMixin:
    """`cfg`, `to_tokens`/`to_str_tokens`/`to_string` and the `W_*` views for `Gemma3`.

    The stacked views (all but `W_E`/`W_U`) are fresh tensors, built per access."""

    @property
    def cfg(self) -> TLConfig:
        return TLConfig.of(self.config.text)

    # ------------------------------------------------------------------ tokens
    def to_tokens(self, text: str | list[str], prepend_bos: bool = True) -> Tensor:
        """(1, T) long ids of `text` (a list: (B, T), left-padded as the processor pads), on the model's device."""
        if isinstance(text, Tensor):
            return text[None] if text.dim() == 1 else text
        return self.processor(text, add_bos=prepend_bos).input_ids.to(self.device)

    def to_str_tokens(self, x, prepend_bos: bool = True) -> list[str]:
        """Each token decoded on its own (" Tower", not "▁Tower"), from text, a list of ids or a (1, T) tensor."""
        ids = self.to_tokens(x, prepend_bos) if isinstance(x, str) else torch.as_tensor(x)
        if ids.dim() == 2:
            if ids.shape[0] != 1:
                raise Gemma3LabError(f"to_str_tokens takes one sequence, not a batch of {ids.shape[0]}")
            ids = ids[0]
        return [self.tokenizer.decode([int(i)]) for i in ids]

    def to_string(self, ids) -> str | list[str]:
        """Decoded text of (T,) ids, or one string per row of (B, T)."""
        ids = torch.as_tensor(ids)
        if ids.dim() == 2:
            return [self.tokenizer.decode(r.tolist()) for r in ids]
        return self.tokenizer.decode(ids.tolist())

    # ------------------------------------------------------------------ weights
    def _heads(self, name: str, n: int) -> Tensor:
        """(L, n, D, H) from each block's attn.{name} (n*H, D) weight."""
        H = self.config.text.head_dim
        return torch.stack([matrix(getattr(b.attn, name)).view(n, H, -1).transpose(1, 2) for b in self.blocks])

    @property
    def W_E(self) -> Tensor:
        """(d_vocab, d_model) embedding table, unscaled (the model multiplies by sqrt(d_model))."""
        return self.embed.weight

    @property
    def W_U(self) -> Tensor:
        """(d_model, d_vocab): the tied embedding transposed (a view), or the untied head's."""
        return (self.lm_head.weight if self.lm_head is not None else self.embed.weight).T

    @property
    def W_Q(self) -> Tensor:  # (L, N, D, H)
        return self._heads("q_proj", self.config.text.num_heads)

    @property
    def _W_K(self) -> Tensor:  # (L, K, D, H) per kv head, as stored
        return self._heads("k_proj", self.config.text.num_kv_heads)

    @property
    def _W_V(self) -> Tensor:  # (L, K, D, H)
        return self._heads("v_proj", self.config.text.num_kv_heads)

    @property
    def W_K(self) -> Tensor:
        """(L, N, D, H): query head h reads kv head h // n_rep."""
        return self._W_K.repeat_interleave(self.config.text.n_rep, dim=1)

    @property
    def W_V(self) -> Tensor:  # (L, N, D, H)
        return self._W_V.repeat_interleave(self.config.text.n_rep, dim=1)

    @property
    def W_O(self) -> Tensor:
        """(L, N, H, D): head h's z (H) times W_O[l, h] is its share of `attn.hook_out`."""
        N, H = self.config.text.num_heads, self.config.text.head_dim
        return torch.stack([matrix(b.attn.o_proj).T.reshape(N, H, -1) for b in self.blocks])

    @property
    def W_gate(self) -> Tensor:  # (L, D, I)
        return torch.stack([matrix(b.mlp.gate_proj).T for b in self.blocks])

    @property
    def W_in(self) -> Tensor:  # (L, D, I), the up projection
        return torch.stack([matrix(b.mlp.up_proj).T for b in self.blocks])

    @property
    def W_out(self) -> Tensor:  # (L, I, D)
        return torch.stack([matrix(b.mlp.down_proj).T for b in self.blocks])
