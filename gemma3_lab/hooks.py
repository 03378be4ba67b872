"""Hook API on top of the named hook points: list, attach (always removed), capture.

TransformerLens-style: `run_with_hooks(fwd_hooks=[(name, fn)])` where `fn(tensor, hook)`
may return a replacement tensor, and `run_with_cache` returning an `ActivationCache`.
"""

from __future__ import annotations

import contextlib
import difflib
import re
from typing import Callable, Iterable, Iterator, Mapping

import torch
from torch import Tensor

from .hook_point import HookPoint

HookFn = Callable[..., Tensor | None]
NamesFilter = None | str | Iterable[str] | Callable[[str], bool]

# TransformerLens' short names, for cache["pattern", 3]-style keys
_SHORT = {
    "resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out",
    "q": "attn.hook_q", "k": "attn.hook_k", "v": "attn.hook_v", "rot_q": "attn.hook_rot_q",
    "rot_k": "attn.hook_rot_k", "z": "attn.hook_z", "pattern": "attn.hook_pattern",
    "attn_scores": "attn.hook_attn_scores", "scores": "attn.hook_attn_scores", "mask": "attn.hook_mask",
    "pre": "mlp.hook_pre", "pre_linear": "mlp.hook_pre_linear", "post": "mlp.hook_post",
}


def act_name(kind: str, layer: int | None = None) -> str:
    """("pattern", 3) -> "blocks.3.attn.hook_pattern"; full names pass through."""
    if layer is None:
        return kind
    return f"blocks.{layer}.{_SHORT.get(kind, kind if kind.startswith('hook_') or '.' in kind else 'hook_' + kind)}"


class ActivationCache(Mapping[str, Tensor]):
    """Captured activations by hook name; `cache["pattern", 3]` is TransformerLens' shorthand."""

    def __init__(self, store: dict[str, Tensor], model=None) -> None:
        self._store = store
        self.model = model

    def __getitem__(self, key) -> Tensor:
        name = act_name(*key) if isinstance(key, tuple) else key
        if name not in self._store:
            raise KeyError(_unknown(name, self._store, "in this cache (was it filtered out?)"))
        return self._store[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._store)

    def __len__(self) -> int:
        return len(self._store)

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._store.values() if isinstance(t, Tensor))

    def to(self, device=None, dtype=None) -> "ActivationCache":
        def move(t):
            if not isinstance(t, Tensor):
                return t
            return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)

        return ActivationCache({k: move(v) for k, v in self._store.items()}, self.model)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} tensors, {self.memory_bytes() / 2**20:.1f} MiB)"


def _unknown(name: str, names: Iterable[str], where: str = "") -> str:
    near = difflib.get_close_matches(name, list(names), n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(near)}?" if near else "; see model.hook_names()"
    return f"unknown hook point {name!r} {where}".rstrip() + hint


def _matcher(names_filter: NamesFilter, all_names: list[str]) -> Callable[[str], bool]:
    if names_filter is None:
        return lambda n: True
    if callable(names_filter):
        return names_filter
    wanted = [names_filter] if isinstance(names_filter, str) else list(names_filter)
    for w in wanted:
        if w not in all_names and not any(c in w for c in "*?[") :
            raise ValueError(_unknown(w, all_names))
    pats = [re.compile(re.escape(w).replace(r"\*", ".*").replace(r"\?", ".") + "$") for w in wanted]
    return lambda n: any(p.match(n) for p in pats)


class HookedMixin:
    """Adds the hook API to a module whose hook points are in `self.hook_points`."""

    hook_points: dict[str, HookPoint]

    def hook_names(self) -> list[str]:
        return list(self.hook_points)

    def hook_point(self, name: str) -> HookPoint:
        try:
            return self.hook_points[name]
        except KeyError:
            raise KeyError(_unknown(name, self.hook_points)) from None

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Iterable[tuple[str | Callable[[str], bool], HookFn]] = ()):
        """Attach `(name or name-predicate, fn)` pairs for the block; removed however it exits."""
        handles = []
        try:
            for name, fn in fwd_hooks:
                targets = [self.hook_point(name)] if isinstance(name, str) else [
                    hp for n, hp in self.hook_points.items() if name(n)
                ]
                for hp in targets:
                    handles.append(hp.register_forward_hook(_wrap(fn)))
            yield self
        finally:
            for h in handles:
                h.remove()

    def reset_hooks(self) -> None:
        for hp in self.hook_points.values():
            hp._forward_hooks.clear()

    def run_with_hooks(self, inputs, fwd_hooks=(), **kwargs):
        """Forward with the given hooks attached; returns the model output's logits."""
        with self.hooks(fwd_hooks):
            return self(inputs, **kwargs).logits

    def run_with_cache(self, inputs, names_filter: NamesFilter = None, *, device=None, dtype=None, **kwargs):
        """(logits, ActivationCache) of every hook point matching `names_filter`."""
        match = _matcher(names_filter, self.hook_names())
        store: dict[str, Tensor] = {}

        def save(name):
            def fn(t, hook):
                store[name] = t.detach().to(device=device, dtype=dtype if dtype and t.is_floating_point() else None)

            return fn

        with self.hooks([(n, save(n)) for n in self.hook_points if match(n)]), torch.no_grad():
            logits = self(inputs, **kwargs).logits
        return logits, ActivationCache(store, self)


def _wrap(fn: HookFn):
    def hook(module: HookPoint, args, output):
        return fn(output, hook=module)

    return hook
