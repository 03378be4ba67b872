"""Hook API on top of the named hook points: list, attach (always removed), capture.

TransformerLens-style: `run_with_hooks(fwd_hooks=[(name, fn)])` where `fn(tensor, hook)`
may return a replacement tensor, and `run_with_cache` returning an `ActivationCache`.
Names may use TransformerLens' aliases (`blocks.0.ln1.hook_scale`, `ln_final.hook_normalized`).
"""

from __future__ import annotations

import contextlib
import re
import weakref
from typing import Callable, Iterable

import torch
from torch import Tensor

from gemma3_lab.instrument.activation_cache import (
    ActivationCache,
    TopLogits,
    act_name,
    canonical,
    layout,
    select,
    unknown_name,
)
from gemma3_lab.instrument.cache_estimate import CacheEstimate, check_budget, default_budget, estimate
from gemma3_lab.instrument.lens import top_logits
from gemma3_lab.model.hook_point import LOCAL_HOOKS, HookPoint

__all__ = ["HookedMixin", "ActivationCache", "act_name", "unknown_name"]

HookFn = Callable[..., Tensor | None]
NamesFilter = None | str | Iterable[str] | Callable[[str], bool]


def _matcher(names_filter: NamesFilter, all_names: list[str]) -> Callable[[str], bool]:
    if names_filter is None:
        return lambda n: True
    if callable(names_filter):
        return names_filter
    wanted = [canonical(w) for w in ([names_filter] if isinstance(names_filter, str) else names_filter)]
    for w in wanted:
        if w not in all_names and not any(c in w for c in "*?["):
            raise ValueError(unknown_name(w, all_names))
    pats = [re.compile(re.escape(w).replace(r"\*", ".*").replace(r"\?", ".") + "$") for w in wanted]
    return lambda n: any(p.match(n) for p in pats)


def _layer_of(name: str) -> int | None:
    m = re.match(r"blocks\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _positions(positions, S: int) -> Tensor | None:
    """Normalise int / list / slice / range / tensor (negative counts from the end) to a LongTensor."""
    if positions is None:
        return None
    if isinstance(positions, slice):
        return torch.arange(S)[positions]
    p = torch.as_tensor([positions] if isinstance(positions, int) else list(positions), dtype=torch.long).flatten()
    p = torch.where(p < 0, p + S, p)
    if len(p) and (p.min() < 0 or p.max() >= S):
        raise IndexError(f"positions {positions} out of range for {S} tokens")
    return p


class HookedMixin:
    """Adds the hook API to a module whose hook points are in `self.hook_points`."""

    hook_points: dict[str, HookPoint]

    def hook_names(self) -> list[str]:
        return list(self.hook_points)

    def hook_point(self, name: str) -> HookPoint:
        hp = self.hook_points.get(canonical(name))
        if hp is None:
            raise KeyError(unknown_name(name, self.hook_points))
        return hp

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Iterable[tuple[str | Callable[[str], bool], HookFn]] = ()):
        """Attach `(name or name-predicate, fn)` pairs for the block; removed however it exits.

        They belong to this thread (or asyncio task): another thread's forward on the same model
        does not run them (see gemma3_lab.model.hook_point)."""
        before = LOCAL_HOOKS.get()
        added: dict[HookPoint, tuple] = dict(before)
        for name, fn in fwd_hooks:
            for hp in self._targets(name):
                added[hp] = (*added.get(hp, ()), _wrap(fn))
        LOCAL_HOOKS.set(added)
        try:
            yield self
        finally:
            LOCAL_HOOKS.set(before)

    def add_hook(self, name: str | Callable[[str], bool], fn: HookFn) -> None:
        """Attach `fn(tensor, hook)` to a hook point (or every one whose name passes the
        predicate) until `reset_hooks()`, as TransformerLens' `add_hook`; `hooks()` is the
        scoped form that removes them itself."""
        for hp in self._targets(name):
            hp.register_forward_hook(_wrap(fn))

    def _targets(self, name: str | Callable[[str], bool]) -> list[HookPoint]:
        if isinstance(name, str):
            return [self.hook_point(name)]
        return [hp for n, hp in self.hook_points.items() if name(n)]

    def reset_hooks(self) -> None:
        """Remove model-wide hooks, and this context's hooks on this model."""
        for hp in self.hook_points.values():
            hp._forward_hooks.clear()
        mine = set(self.hook_points.values())
        LOCAL_HOOKS.set({hp: fns for hp, fns in LOCAL_HOOKS.get().items() if hp not in mine})

    def run_with_hooks(self, inputs, fwd_hooks=(), **kwargs):
        """Forward with the given hooks attached; returns the model output's logits."""
        with self.hooks(fwd_hooks):
            return self(inputs, **kwargs).logits

    # ------------------------------------------------------------------ capture
    def select_hook_names(self, names_filter: NamesFilter = None, layers: Iterable[int] | None = None) -> list[str]:
        """Hook names passing `names_filter` (names, globs or a predicate); `layers` limits
        decoder-block names to those layers (negative counts from the end)."""
        match = _matcher(names_filter, self.hook_names())
        keep = None
        if layers is not None:
            n = self.config.text.num_layers
            keep = {i + n if i < 0 else i for i in ([layers] if isinstance(layers, int) else layers)}
        return [nm for nm in self.hook_points if match(nm) and (keep is None or _layer_of(nm) in (None, *keep))]

    def estimate_cache_bytes(self, inputs, names_filter: NamesFilter = None, *, layers=None, heads=None,
                             positions=None, dtype=None, full_logits: bool = False, top_k: int = 10,
                             return_logits: bool = True) -> CacheEstimate:
        """Bytes `run_with_cache` with the same arguments would hold, from shapes alone (nothing runs)."""
        x = self.to_inputs(inputs)
        names = self._capture_names(names_filter, layers, full_logits)
        pos = _positions(positions, x.input_ids.shape[1])
        return estimate(self, x, names, heads=heads, n_positions=None if pos is None else len(pos), dtype=dtype,
                        top_k=top_k, return_logits=return_logits)

    def _capture_names(self, names_filter, layers, full_logits: bool) -> list[str]:
        names = self.select_hook_names(names_filter, layers)
        return names if full_logits else [n for n in names if n != "hook_logits"]

    def run_with_cache(self, inputs, names_filter: NamesFilter = None, *, layers=None, heads=None, positions=None,
                       dtype=None, device=None, max_bytes: int | None = None, full_logits: bool = False,
                       top_k: int = 10, return_logits: bool = True, **kwargs):
        """(logits, ActivationCache) of every hook point matching `names_filter`.

        `layers` limits decoder-block hook points to those layers; `heads` keeps those query
        heads (k/v: the kv heads they read); `positions` keeps those query positions; `dtype`
        and `device` say how to store (patterns are then built in `dtype` directly, the
        output still computed at full precision). The cache holds per-position `top_k`
        logits (`cache.top_logits`), the full (B, S, V) only with `full_logits=True`.
        `return_logits=False` computes the head on the last position alone and returns
        those (B, 1, V) logits. Above `max_bytes` (default: 80% of the free memory) the
        run is refused before it starts, with the largest parts named.
        """
        x = self.to_inputs(inputs)
        S = x.input_ids.shape[1]
        names = self._capture_names(names_filter, layers, full_logits)
        pos = _positions(positions, S)
        heads = [heads] if isinstance(heads, int) else (list(heads) if heads is not None else None)
        est = estimate(self, x, names, heads=heads, n_positions=None if pos is None else len(pos), dtype=dtype,
                       top_k=top_k, return_logits=return_logits or full_logits)
        check_budget(est, max_bytes if max_bytes is not None else default_budget(device or self.device))

        n_rep = self.config.text.n_rep
        store: dict = {}
        done: dict[tuple, tuple] = {}  # (id, layout) -> (weakref, stored): shared tensors stored once

        def save(name):
            def fn(t, hook):
                key = (id(t), layout(name))
                hit = done.get(key)
                if hit is not None and hit[0]() is t:
                    store[name] = hit[1]
                    return
                kept = select(name, t.detach(), heads, pos, n_rep)
                kept = kept.to(device=device, dtype=dtype if dtype is not None and _floating(kept) else None)
                done[key] = (weakref.ref(t), kept)
                store[name] = kept

            return fn

        attns = _store_dtype_sites(self, names) if dtype is not None else []
        try:
            for a in attns:
                a.store_dtype = dtype
            with self.hooks([(n, save(n)) for n in names]), torch.no_grad():
                keep_last = None if (return_logits or full_logits) else 1
                out = self(x, return_hidden=top_k > 0 and keep_last is not None, logits_to_keep=keep_last, **kwargs)
        finally:
            for a in attns:
                a.store_dtype = None
        done.clear()
        top = None
        if top_k > 0:
            top = self._top_logits(out, pos, top_k)
            if device is not None:
                top = top.to(device)
        cache = ActivationCache(store, self, input_ids=x.input_ids, positions=pos, heads=heads, top_logits=top)
        return out.logits, cache

    def _top_logits(self, out, pos: Tensor | None, k: int) -> TopLogits:
        """Top-k per position (`pos`, None: all), from the full logits if computed, else from
        the final hidden state."""
        src = out.logits if out.hidden is None else out.hidden
        if pos is not None:  # indexing copies: only when positions were asked for
            src = src[:, pos.to(src.device)]
        if out.hidden is None:
            vals, ids = torch.topk(src, k, dim=-1)
        else:
            vals, ids = top_logits(self, src, k)
        return TopLogits(vals, ids, pos if pos is not None else torch.arange(src.shape[1]))


def _floating(x) -> bool:
    return x.dtype.is_floating_point


def _store_dtype_sites(model, names: list[str]) -> list:
    """Attention modules whose pattern or scores are captured: they can build them in the storage dtype."""
    out = []
    for n in names:
        if n.endswith(("attn.hook_pattern", "attn.hook_attn_scores")):
            mod = model.get_submodule(n.rsplit(".", 1)[0])
            if hasattr(mod, "store_dtype") and mod not in out:
                out.append(mod)
    return out


def _wrap(fn: HookFn):
    def hook(module: HookPoint, args, output):
        return fn(output, hook=module)

    return hook
