"""The identity module that every instrumented site passes through (TransformerLens' HookPoint).

A hook point's name is its module path (`blocks.3.attn.hook_pattern`), filled in by the
model once it is built, so names can never drift from the code.
"""

from __future__ import annotations

from torch import Tensor, nn


class HookPoint(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.name: str = ""

    @property
    def active(self) -> bool:
        """Any hook attached? Sites that cost extra work (patterns, masks) compute only then."""
        return bool(self._forward_hooks)

    def forward(self, x: Tensor) -> Tensor:
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
