"""What `run_with_cache` returns: captured activations by hook name, with the sequence and
head axes of every hook point known, so positions/heads can be selected and a logit lens run.

Patterns and scores of local layers are `BandedPattern`s (T × window), of global layers on
prompts longer than one chunk `BlockRows` (the causal triangle); `.to_dense()` gives the full
tensor from either, and from a plain tensor (everything else) too.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping

import torch
from torch import Tensor

from gemma3_lab.config import kv_heads_of
from gemma3_lab.instrument import decompose
from gemma3_lab.instrument.lens import logit_lens
from gemma3_lab.model.banded import PatternView

# TransformerLens' short names, for cache["pattern", 3]-style keys
_SHORT = {
    "resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out",
    "q": "attn.hook_q", "k": "attn.hook_k", "v": "attn.hook_v", "rot_q": "attn.hook_rot_q",
    "rot_k": "attn.hook_rot_k", "z": "attn.hook_z", "pattern": "attn.hook_pattern",
    "attn_scores": "attn.hook_attn_scores", "scores": "attn.hook_attn_scores", "mask": "attn.hook_mask",
    "pre": "mlp.hook_pre", "pre_linear": "mlp.hook_pre_linear", "post": "mlp.hook_post",
    "result": "attn.hook_result",
}
_RESULT = re.compile(r"blocks\.(\d+)\.attn\.hook_result$")  # computed on demand, never stored
# TransformerLens' module names for Gemma's four norms and the final one
_ALIASES = [
    (re.compile(r"(^|\.)ln1\."), r"\1pre_attention_norm."), (re.compile(r"(^|\.)ln1_post\."), r"\1post_attention_norm."),
    (re.compile(r"(^|\.)ln2\."), r"\1pre_ffw_norm."), (re.compile(r"(^|\.)ln2_post\."), r"\1post_ffw_norm."),
    (re.compile(r"^ln_final\."), "final_norm."),
]


def act_name(kind: str, layer: int | None = None) -> str:
    """("pattern", 3) -> "blocks.3.attn.hook_pattern"; full names pass through."""
    if layer is None:
        return kind
    return f"blocks.{layer}.{_SHORT.get(kind, kind if kind.startswith('hook_') or '.' in kind else 'hook_' + kind)}"


def unknown_name(name: str, names: Iterable[str], where: str = "") -> str:
    """The error text for a name that is not there, with the nearest names that are."""
    near = difflib.get_close_matches(name, list(names), n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(near)}?" if near else "; see model.hook_names()"
    return f"unknown hook point {name!r} {where}".rstrip() + hint


def canonical(name: str) -> str:
    """Gemma's name for a TransformerLens alias (`blocks.0.ln1.hook_scale` -> `...pre_attention_norm.hook_scale`)."""
    for pat, repl in _ALIASES:
        name = pat.sub(repl, name)
    return name


@dataclass(frozen=True)
class Layout:
    """Where the sequence (query) axis and the head axis of a hook point's tensor are."""

    seq: int | None  # None: not per token (vision tower, projector)
    head: int | None = None
    kv_heads: bool = False  # the head axis counts key/value heads
    keys: bool = False  # last axis runs over key slots (mask, scores, pattern)


_Q = ("attn.hook_q", "attn.hook_rot_q", "attn.hook_z", "attn.q_norm.hook_in", "attn.q_norm.hook_scale",
      "attn.q_norm.hook_normalized")
_KV = ("attn.hook_k", "attn.hook_v", "attn.hook_rot_k", "attn.k_norm.hook_in", "attn.k_norm.hook_scale",
       "attn.k_norm.hook_normalized")


def layout(name: str) -> Layout:
    if name.startswith(("vision.", "projector.")) or name == "hook_image_features":
        return Layout(None)
    if name == "hook_slots":
        return Layout(0)
    if name.endswith(("attn.hook_pattern", "attn.hook_attn_scores")):
        return Layout(2, head=1, keys=True)
    if name.endswith("attn.hook_mask"):
        return Layout(2, keys=True)
    if name.endswith(_Q):
        return Layout(1, head=2)
    if name.endswith(_KV):
        return Layout(1, head=2, kv_heads=True)
    return Layout(1)


def select(name: str, t, heads: list[int] | None, positions: Tensor | None, n_rep: int):
    """Keep the given query heads (k/v: the kv heads they read) and query positions of one activation."""
    lay = layout(name)
    if heads is not None and lay.head is not None:
        idx = kv_heads_of(heads, n_rep) if lay.kv_heads else list(heads)
        t = t.select(heads=idx) if isinstance(t, PatternView) else t.index_select(lay.head, torch.tensor(idx, device=t.device))
    if positions is not None and lay.seq is not None:
        if isinstance(t, PatternView):
            t = t.select(rows=positions)
        else:
            t = t.index_select(lay.seq, positions.to(t.device))
    return t


@dataclass
class TopLogits:
    """Per-position top-k of the logits, kept instead of the full (B, S, V) tensor."""

    values: Tensor  # (B, S', k) in the model dtype, highest first
    ids: Tensor  # (B, S', k) long
    positions: Tensor  # (S',) the query positions they belong to

    def to(self, device=None, dtype=None) -> "TopLogits":
        return TopLogits(self.values.to(device=device, dtype=dtype), self.ids.to(device), self.positions.to(device))


def _nbytes(x) -> dict[tuple, int]:
    """{storage key: bytes} so tensors shared by two hook points count once."""
    if isinstance(x, PatternView):
        return {k: v for t in x.tensors() for k, v in _nbytes(t).items()}
    if isinstance(x, TopLogits):
        return {**_nbytes(x.values), **_nbytes(x.ids)}
    if not isinstance(x, Tensor):
        return {}
    s = x.untyped_storage()
    return {(x.device, s.data_ptr()): s.nbytes()}


class ActivationCache(Mapping[str, Tensor]):
    """Captured activations by hook name; `cache["pattern", 3]` is TransformerLens' shorthand.

    `positions` / `heads` say which query positions and heads were kept (None: all), in the
    order they sit along the stored axes. Local-layer `hook_pattern`/`hook_attn_scores` are
    `BandedPattern`s and, past one chunk of rows, global ones `BlockRows`:
    `cache["pattern", 0].to_dense()` is the full (B, N, S, T) tensor for any layer.

    The analysis methods (`decompose_resid`, `stack_head_results`, `logit_attrs`, ...) are
    TransformerLens'; `instrument/decompose.py` says how Gemma's sandwich norms enter them.
    `cache["result", l]` is layer l's per-head output (B, S, N, D), computed on demand.
    """

    def __init__(self, store: dict, model=None, *, input_ids: Tensor | None = None,
                 positions: Tensor | None = None, heads: list[int] | None = None,
                 top_logits: TopLogits | None = None, has_batch_dim: bool = True) -> None:
        self._store = store
        self.model = model
        self.input_ids = input_ids  # (B, S) of the run
        self.positions = positions
        self.heads = heads
        self.top_logits = top_logits
        self.has_batch_dim = has_batch_dim

    def _key(self, key) -> str:
        if isinstance(key, tuple):
            kind, layer = key
            if layer < 0 and self.model is not None:
                layer += self.model.config.text.num_layers
            return act_name(kind, layer)
        return canonical(key)

    def __getitem__(self, key):
        name = self._key(key)
        hit = _RESULT.match(name)
        if hit and name not in self._store and self.model is not None:
            r = decompose.head_results(self, int(hit.group(1)))
            return r if self.has_batch_dim else r[0]
        if name not in self._store:
            hint = ""
            if name == "hook_logits" and self.top_logits is not None:
                hint = " (full logits were not kept: see cache.top_logits, or pass full_logits=True)"
            raise KeyError(unknown_name(name, self._store, f"in this cache{hint or ' (was it filtered out?)'}"))
        return self._store[name]

    def __contains__(self, key) -> bool:
        return self._key(key) in self._store

    def __iter__(self) -> Iterator[str]:
        return iter(self._store)

    def __len__(self) -> int:
        return len(self._store)

    def memory_bytes(self) -> int:
        """Bytes held, each storage counted once (resid_post of layer i is resid_pre of layer i+1)."""
        seen: dict = {}
        for v in [*self._store.values(), self.top_logits]:
            seen.update(_nbytes(v))
        return sum(seen.values())

    def to(self, device=None, dtype=None) -> "ActivationCache":
        """A copy on `device`; floating activations cast to `dtype` when given (masks stay bool)."""

        def move(t):
            if isinstance(t, (PatternView, TopLogits)):
                return t.to(device, dtype)
            if isinstance(t, Tensor):
                return t.to(device=device, dtype=dtype if t.is_floating_point() else None)
            return t

        return ActivationCache(
            {k: move(v) for k, v in self._store.items()}, self.model, input_ids=self.input_ids,
            positions=self.positions, heads=self.heads, top_logits=move(self.top_logits),
            has_batch_dim=self.has_batch_dim,
        )

    def remove_batch_dim(self) -> "ActivationCache":
        """The same cache without the batch axis (a batch of one only), as TransformerLens';
        local-layer patterns become dense tensors. Per-image vision activations are kept as they are."""
        if not self.has_batch_dim:
            return self
        if self.input_ids is not None and self.input_ids.shape[0] != 1:
            raise ValueError(f"remove_batch_dim needs a batch of one, not {self.input_ids.shape[0]}")

        def drop(name, t):
            if layout(name).seq is None or name == "hook_slots":
                return t
            return (t.to_dense() if isinstance(t, PatternView) else t)[0]

        top = self.top_logits
        top = None if top is None else TopLogits(top.values[0], top.ids[0], top.positions)
        return ActivationCache({k: drop(k, v) for k, v in self._store.items()}, self.model,
                               input_ids=self.input_ids, positions=self.positions, heads=self.heads,
                               top_logits=top, has_batch_dim=False)

    # ------------------------------------------------------------------ TransformerLens' analysis
    def accumulated_resid(self, layer=None, incl_mid=False, apply_ln=False, pos_slice=None, return_labels=False):
        return decompose.accumulated_resid(self, layer, incl_mid, apply_ln, pos_slice, return_labels)

    def decompose_resid(self, layer=None, mode="all", incl_embeds=True, apply_ln=False, pos_slice=None,
                        return_labels=False):
        return decompose.decompose_resid(self, layer, mode, incl_embeds, apply_ln, pos_slice, return_labels)

    def stack_head_results(self, layer=None, return_labels=False, incl_remainder=False, pos_slice=None,
                           apply_ln=False):
        return decompose.stack_head_results(self, layer, return_labels, incl_remainder, pos_slice, apply_ln)

    def stack_neuron_results(self, layer=None, pos_slice=None, neuron_slice=None, return_labels=False,
                             incl_remainder=False, apply_ln=False):
        return decompose.stack_neuron_results(self, layer, pos_slice, neuron_slice, return_labels,
                                              incl_remainder, apply_ln)

    def apply_ln_to_stack(self, residual_stack, layer=None, mlp_input=False, pos_slice=None, recompute_ln=False):
        return decompose.apply_ln_to_stack(self, residual_stack, layer, mlp_input, pos_slice, recompute_ln)

    def logit_attrs(self, residual_stack, tokens, incorrect_tokens=None, pos_slice=None):
        return decompose.logit_attrs(self, residual_stack, tokens, incorrect_tokens, pos_slice)

    def logit_lens(self, k: int = 5, batch: int = 0):
        """Top-k next-token predictions read off the residual after every layer (see `lens.py`)."""
        return logit_lens(self, k=k, batch=batch)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} hook points, {self.memory_bytes() / 2**20:.1f} MiB)"
