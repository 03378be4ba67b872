"""The identity module that every instrumented site passes through (TransformerLens' HookPoint).

A hook point's name is its module path (`blocks.3.attn.hook_pattern`), filled in by the
model once it is built, so names can never drift from the code.

Hooks attached with `model.hooks(...)` (and so `run_with_hooks`, `run_with_cache`, `generate`'s
captures) belong to the call that attached them: they live in a context variable, so a forward
running at the same time in another thread (or asyncio task) never sees them. Hooks registered
with torch's own `register_forward_hook` stay model-wide, as torch defines them.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Callable, Mapping

from torch import Tensor, nn
from torch.nn.modules import module as _module

# hook point -> the forward hooks `fn(module, args, output)` this context attached to it
LocalHooks = Mapping["HookPoint", tuple[Callable, ...]]
LOCAL_HOOKS: ContextVar[LocalHooks] = ContextVar("gemma3_lab_local_hooks", default={})


def _global_hooks_present() -> bool:
    """torch.nn.modules.module.register_module_forward_hook and friends apply to every module."""
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks)


class HookPoint(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.name: str = ""

    @property
    def active(self) -> bool:
        """Any hook attached? Sites that cost extra work (patterns, masks) compute only then."""
        return bool(self._forward_hooks) or self in LOCAL_HOOKS.get()

    def forward(self, x: Tensor) -> Tensor:
        return x

    def __call__(self, x: Tensor) -> Tensor:
        # A decode step passes ~900 hook points; nn.Module.__call__ costs microseconds each.
        # With no hooks of any kind attached, the identity is all there is to do.
        if (self._forward_hooks or self._forward_pre_hooks or self._backward_hooks or self._backward_pre_hooks
                or _global_hooks_present()):
            x = super().__call__(x)
        local = LOCAL_HOOKS.get()
        if local and self in local:  # this call's own hooks, after the model-wide ones
            for fn in local[self]:
                out = fn(self, (x,), x)
                x = x if out is None else out
        return x

    def extra_repr(self) -> str:
        return self.name


def name_hook_points(root: nn.Module) -> dict[str, HookPoint]:
    """Give each HookPoint its module path as name; return them in forward order."""
    points = {}
    for name, mod in root.named_modules():
        if isinstance(mod, HookPoint):
            mod.name = name
            points[name] = mod
    return points
