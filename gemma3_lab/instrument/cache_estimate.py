"""How many bytes a `run_with_cache` will hold, worked out from shapes before anything runs,
and the budget check that refuses a capture that would not fit (saying what to filter)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from gemma3_lab.config import kv_heads_of
from gemma3_lab.instrument.activation_cache import layout


class CacheBudgetError(MemoryError):
    """The requested capture is estimated to exceed `max_bytes`."""


@dataclass
class CacheEstimate:
    """Bytes per hook name (an upper bound: a tensor two hook points share is counted twice)."""

    by_name: dict[str, int] = field(default_factory=dict)
    tokens: int = 0

    @property
    def total(self) -> int:
        return sum(self.by_name.values())

    def __int__(self) -> int:
        return self.total

    def groups(self) -> dict[str, int]:
        """Bytes per hook kind across layers (`blocks.*.attn.hook_pattern`), largest first."""
        out: dict[str, int] = {}
        for name, n in self.by_name.items():
            key = re.sub(r"blocks\.\d+\.", "blocks.*.", name)
            out[key] = out.get(key, 0) + n
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def summary(self, n: int = 5) -> str:
        return "\n".join(f"  {k:<42} {_gib(v)}" for k, v in list(self.groups().items())[:n])


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def estimate(model, x, names: list[str], *, heads=None, n_positions: int | None = None, dtype=None,
             top_k: int = 0, return_logits: bool = True) -> CacheEstimate:
    """Bytes `run_with_cache` would keep for Inputs `x` and the chosen hook `names`."""
    cfg = model.config.text
    B, S = x.input_ids.shape
    rows = B * (n_positions if n_positions is not None else S)
    n_img = 0 if x.pixel_values is None else x.pixel_values.shape[0]
    fwd = model.config.mm_tokens_per_image - 1 if n_img else 0  # an image token sees its image's later tokens
    kinds = {t: cfg.window_for(t) for t in cfg.layer_types}
    N = len(heads) if heads is not None else cfg.num_heads
    K = len(kv_heads_of(heads, cfg.n_rep)) if heads is not None else cfg.num_kv_heads
    model_item = torch.finfo(model.dtype).bits // 8

    def item(native: int) -> int:
        return torch.finfo(dtype).bits // 8 if dtype is not None else native

    est = CacheEstimate(tokens=S)
    for name in names:
        lay = layout(name)
        if lay.seq is None:
            est.by_name[name] = n_img and n_img * _vision_numel(name, model) * item(4 if "hook_scale" in name else model_item)
            continue
        if name == "hook_slots":
            est.by_name[name] = (rows // B) * 8
            continue
        if lay.keys:
            layer = int(name.split(".")[1])
            w = kinds[cfg.layer_types[layer]]
            keys = S if w is None else min(w, S) + fwd
            if name.endswith("hook_mask"):
                est.by_name[name] = rows * S  # bool, dense for every layer
            else:
                est.by_name[name] = rows * N * keys * item(model_item)
            continue
        width = {
            "hook_logits": cfg.vocab_size, "mlp.hook_pre": cfg.intermediate_size,
            "mlp.hook_pre_linear": cfg.intermediate_size, "mlp.hook_post": cfg.intermediate_size,
        }
        per_row = next((v for k, v in width.items() if name.endswith(k)), cfg.hidden_size)
        if lay.head is not None:
            per_row = (K if lay.kv_heads else N) * (1 if name.endswith("hook_scale") else cfg.head_dim)
        elif name.endswith("hook_scale"):
            per_row = 1
        est.by_name[name] = rows * per_row * item(4 if name.endswith("hook_scale") else model_item)
    if top_k:
        est.by_name["top-k logits"] = rows * top_k * (model_item + 8)
    if return_logits:
        est.by_name["returned logits"] = B * S * cfg.vocab_size * model_item
    return est


def _vision_numel(name: str, model) -> int:
    """Elements per image of a vision-tower or projector hook point."""
    vc, tokens = model.config.vision, model.config.mm_tokens_per_image
    P, C = vc.num_patches, vc.hidden_size
    if name.startswith("projector.") or name == "hook_image_features":
        width = model.config.text.hidden_size if name in ("projector.hook_out", "hook_image_features") else C
        return tokens * (1 if name.endswith("hook_scale") else width)
    if name.endswith(("hook_pattern", "hook_attn_scores")):
        return vc.num_heads * P * P
    if name.endswith("mlp.hook_post"):
        return P * vc.intermediate_size
    return P * C


def default_budget(device) -> int | None:
    """80% of the memory free now on `device` (None where it cannot be read)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * 0.8)
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(int(info["MemAvailable"].split()[0]) * 1024 * 0.8)
    except (OSError, KeyError, ValueError):
        return None


def check_budget(est: CacheEstimate, max_bytes: int | None) -> None:
    if max_bytes is None or est.total <= max_bytes:
        return
    raise CacheBudgetError(
        f"run_with_cache would hold about {_gib(est.total)} for {est.tokens:,} tokens, above the budget of "
        f"{_gib(max_bytes)} (max_bytes; by default 80% of the memory available now). Largest parts:\n"
        f"{est.summary()}\n"
        "Capture less: names_filter=[...] (e.g. 'blocks.*.hook_resid_post'), layers=[...], heads=[...], "
        "positions=[...]; store in dtype=torch.bfloat16; return_logits=False (per-position top-k logits "
        "stay in cache.top_logits); or raise max_bytes."
    )
