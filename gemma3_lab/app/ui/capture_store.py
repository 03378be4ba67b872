"""What one column's generation captured for the views: every layer's attention pattern
(local layers as bands, float16) and the residual stream after every layer (float32), over
the whole sequence the model computed. Every look (inspector, mask atlas, image attention)
reads it; the model is not run again.

A session holds at most `session_budget()` bytes of captures (both columns together); a
generation that would need more is not captured and its views say so. A saved session carries
it as `to_captures()` gives it, and `from_result` reads it back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gemma3_lab.instrument.activation_cache import ActivationCache, act_name
from gemma3_lab.instrument.capture import Capture
from gemma3_lab.instrument.lens import LogitLens, top_logits
from gemma3_lab.model.banded import BandedPattern
from gemma3_lab.model.masks import image_block_ids, layer_mask

BUDGET_ENV = "GEMMA3_LAB_SESSION_CAPTURE_MB"
DEFAULT_BUDGET_MB = 2048  # both columns of a 4096-token prompt fit
NAMES = ["blocks.*.attn.hook_pattern", "blocks.0.hook_resid_pre", "blocks.*.hook_resid_post"]
LENS_K = 5  # top-k kept per layer and slot of the logit lens: the candidates panel shows 5, the lens table 3
LENS_PARTS = ("ids", "probs", "lse")  # what the lens keeps per slot, in order
LENS_CHUNK = 64  # slots per pass over the head when the lens of many slots is computed
PATTERN_DTYPE = torch.float16  # 3 significant digits of an attention weight are what a view shows


def session_budget() -> int:
    value = os.environ.get(BUDGET_ENV) or DEFAULT_BUDGET_MB
    try:
        return int(float(value) * 2**20)
    except ValueError:
        raise ValueError(f"{BUDGET_ENV}={value!r}: expected a number of MB, such as 2048") from None


def estimate_bytes(config, tokens: int) -> int:
    """Bytes `from_result` keeps for a sequence of `tokens` slots (patterns + residuals)."""
    t = config.text
    elem = torch.finfo(PATTERN_DTYPE).bits // 8
    total = (t.num_layers + 1) * tokens * t.hidden_size * 4
    for kind in t.layer_types:
        w = t.window_for(kind)
        total += t.num_heads * tokens * (min(tokens, w) if w else tokens) * elem
    return total


@dataclass
class ColumnCapture:
    input_ids: Tensor  # (1, T) the slots computed: the prompt and every token fed back
    token_types: Tensor  # (1, T) 1 on image soft tokens
    patterns: list  # per layer: BandedPattern (local) or a (1, N, T, T) tensor (global), PATTERN_DTYPE
    resid: Tensor  # (L + 1, T, D) float32: what enters block 0, then the output of each block
    windows: list  # per layer: its sliding window, None for a global layer
    # slot -> (top ids (L+1, LENS_K), their probabilities, log-sum-exp (L+1,)) of the logit lens
    # there, computed on first use and kept (~0.6 KB a slot; not serialised: a load recomputes)
    lenses: dict = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    @property
    def nbytes(self) -> int:
        pats = sum(p.nbytes if isinstance(p, BandedPattern) else p.numel() * p.element_size() for p in self.patterns)
        return pats + self.resid.numel() * self.resid.element_size()

    def row(self, layer: int, query: int) -> Tensor:
        """(N, T) float32 attention of slot `query` over every key slot, at `layer`."""
        p = self.patterns[layer]
        if isinstance(p, BandedPattern):
            return p.select(rows=[query]).dense()[0, :, 0].float()
        return p[0, :, query].float()

    def mask(self, layer: int) -> Tensor:
        """(T, T) bool: the mask that layer used (from the library's mask functions)."""
        pos = torch.arange(self.length)
        blocks = image_block_ids(self.token_types) if bool((self.token_types == 1).any()) else None
        return layer_mask(pos, pos, self.windows[layer], blocks)[0, 0]

    def cache(self, model, layers) -> ActivationCache:
        """An ActivationCache of these layers' patterns and masks, as the visualizers take it."""
        store = {}
        for i in layers:
            store[act_name("pattern", i)] = self.patterns[i]
            store[act_name("mask", i)] = self.mask(i)[None, None]
        return ActivationCache(store, model, input_ids=self.input_ids)

    @torch.no_grad()
    def lens(self, model, positions: list[int], k: int = 3, progress=None) -> LogitLens:
        """The logit lens at `positions` (top-k ≤ LENS_K), read off the captured residuals
        (final norm + head only). Each position is computed once and kept: a later look, a
        layer or head switch, or the whole table reads it again. `progress(done, total)` is
        called after each chunk of positions computed."""
        self.compute_lens(model, positions, progress)
        ids = torch.stack([self.lenses[p][0][:, :k] for p in positions], 1)  # (L+1, S, k)
        probs = torch.stack([self.lenses[p][1][:, :k] for p in positions], 1)
        piece = model.tokenizer.id_to_token if model.tokenizer is not None else str
        return LogitLens(
            layer_labels=["embed"] + [f"L{i}" for i in range(len(self.patterns))],
            tokens=[piece(int(self.input_ids[0, p])) for p in positions],
            top_ids=ids, top_probs=probs,
            top_tokens=[[[piece(int(t)) for t in row] for row in layer] for layer in ids.tolist()],
            positions=list(positions),
        )

    @property
    def lens_positions(self) -> list[int]:
        """The slots whose logit lens is computed, in order."""
        return sorted(self.lenses.copy())  # one C call: safe while a fill adds slots in another thread

    @torch.no_grad()
    def compute_lens(self, model, positions, progress=None) -> None:
        """Compute (and keep) the lens of every slot in `positions` not computed yet, LENS_CHUNK
        slots per pass over the head."""
        todo = [p for p in dict.fromkeys(positions) if p not in self.lenses]
        for c in range(0, len(todo), LENS_CHUNK):
            part = todo[c: c + LENS_CHUNK]
            h = model.final_norm(self.resid[:, part].to(device=model.device, dtype=model.dtype))  # (L+1, S, D)
            vals, ids, lse = top_logits(model, h, LENS_K, logsumexp=True)
            probs = (vals.float() - lse[..., None]).exp().cpu()
            ids, lse = ids.cpu(), lse.float().cpu()
            for j, p in enumerate(part):
                self.lenses[p] = (ids[:, j], probs[:, j], lse[:, j])
            if progress is not None:
                progress(c + len(part), len(todo))

    def lens_arrays(self) -> dict[str, Tensor]:
        """The logit-lens slots computed so far, as arrays (what a saved session carries)."""
        slots = self.lens_positions
        if not slots:
            return {}
        return {"lens_slots": torch.tensor(slots)} | {
            f"lens_{name}": torch.stack([self.lenses[p][i] for p in slots]) for i, name in enumerate(LENS_PARTS)}

    def restore_lens(self, arrays: dict[str, Tensor]) -> None:
        """Put back what `lens_arrays` gave; a ValueError names a part that does not fit."""
        if "lens_slots" not in arrays:
            return
        slots = [int(p) for p in arrays["lens_slots"]]
        rows = self.resid.shape[0]
        for i, name in enumerate(LENS_PARTS):
            a = arrays.get(f"lens_{name}")
            if a is None or a.shape[:2] != (len(slots), rows) or (i < 2 and a.shape[2] != LENS_K):
                raise ValueError(f"lens_{name} has shape {None if a is None else tuple(a.shape)}, expected "
                                 f"({len(slots)}, {rows}{', ' + str(LENS_K) if i < 2 else ''})")
        if any(not 0 <= p < self.length for p in slots):
            raise ValueError(f"lens_slots name a slot outside 0–{self.length - 1}")
        for j, p in enumerate(slots):
            self.lenses[p] = tuple(arrays[f"lens_{name}"][j] for name in LENS_PARTS)

    @torch.no_grad()
    def next_token(self, model, position: int, k: int = 5, also: int | None = None):
        """([(id, p)] the top-k next-token distribution after slot `position` (k ≤ LENS_K),
        log p of token `also`): the lens's last row there, which is the model's own output."""
        self.compute_lens(model, [position])
        ids, probs, lse = self.lenses[position]
        logp = None
        if also is not None:
            h = model.final_norm(self.resid[-1, position][None].to(device=model.device, dtype=model.dtype))
            logp = float(model._unembed(h, vocab=slice(also, also + 1))[0, 0].float() - lse[-1])
        return [(int(i), float(p)) for i, p in zip(ids[-1, :k], probs[-1, :k])], logp


def to_captures(cap: ColumnCapture) -> dict[str, Capture]:
    """The capture as `from_result` reads it back (hook name -> one-piece Capture over every
    slot): how a saved session carries it."""
    slots = torch.arange(cap.length)
    out = {}

    def put(name: str, t) -> None:
        c = Capture(name)
        c.add(t, slots)
        out[name] = c

    for i, p in enumerate(cap.patterns):
        put(act_name("pattern", i), p)
    put("blocks.0.hook_resid_pre", cap.resid[0][None])
    for i in range(len(cap.patterns)):
        put(f"blocks.{i}.hook_resid_post", cap.resid[i + 1][None])
    return out


def from_result(res, config) -> ColumnCapture:
    """The compact capture of a `GenerationResult` recorded with `capture=NAMES`."""
    t = config.text
    caps = res.captures
    patterns = []
    for i in range(t.num_layers):
        p = caps[act_name("pattern", i)].tensor()
        patterns.append(p.to(dtype=PATTERN_DTYPE) if isinstance(p, BandedPattern) else p.to_dense().to(PATTERN_DTYPE))
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(t.num_layers)]
    resid = torch.stack([caps[n].tensor()[0].float() for n in names])
    T = resid.shape[1]
    ids = torch.tensor([(res.prompt_ids + res.token_ids)[:T]])
    types = torch.zeros_like(ids)
    if res.inputs is not None:
        n = res.inputs.token_types.shape[1]
        types[:, :n] = res.inputs.token_types[:, :T]
    return ColumnCapture(ids, types, patterns, resid, [t.window_for(k) for k in t.layer_types])
