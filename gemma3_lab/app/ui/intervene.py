"""A column's optional intervention, as the page asks for it, turned into the hook pairs of
`gemma3_lab.instrument.interventions` (head ablation, a steering vector, patching from the other column)."""

from __future__ import annotations

from dataclasses import dataclass

from gemma3_lab.analysis.tour import steering_vector
from gemma3_lab.app.ui.checks import SettingsError, check_head, check_layer, number, whole_list
from gemma3_lab.instrument import interventions as iv
from gemma3_lab.instrument.activation_cache import act_name

KINDS = ("none", "ablate heads", "steer", "patch from other column")
PATCH_SITES = ("resid_post", "resid_pre", "attn_out", "mlp_out", "z")
# the order of a column's intervention settings in the `generate` endpoint (after COLUMN_FIELDS)
FIELDS = ("intervention", "layer", "heads", "steer_positive", "steer_negative", "steer_scale", "patch_site",
          "patch_positions")


@dataclass(frozen=True)
class InterventionSpec:
    kind: str
    layer: int
    heads: tuple[int, ...] | None = None
    positive: str = ""
    negative: str = ""
    scale: float = 4.0
    site: str = "resid_post"
    positions: tuple[int, ...] | None = None

    def describe(self) -> str:
        if self.kind == "ablate heads":
            return f"heads {', '.join(map(str, self.heads))} of layer {self.layer} zeroed (hook_z)"
        if self.kind == "steer":
            return (f"steering: {self.scale:g} × (resid_post L{self.layer} of {self.positive!r} − of "
                    f"{self.negative!r}, last token) added at layer {self.layer}")
        where = "every prompt position" if self.positions is None else f"positions {list(self.positions)}"
        heads = "" if self.heads is None else f", heads {list(self.heads)}"
        return f"{self.site} of layer {self.layer} patched from the other column at {where}{heads}"

    # ------------------------------------------------------------------ hooks
    def hooks(self, model, session, col: str, registry) -> list:
        """The hook pairs for `model`; a patch reads the other column's run (already prepared)."""
        check_layer(model.config, self.layer)
        for h in self.heads or ():
            check_head(model.config, h)
        if self.kind == "ablate heads":
            return iv.ablate_heads(self.layer, list(self.heads), mode="zero")
        if self.kind == "steer":
            vector = steering_vector(model, self.layer, self.positive, self.negative)
            return iv.steer(f"blocks.{self.layer}.hook_resid_post", vector, scale=self.scale)
        return iv.patch(self._source(model, session, col, registry), _site(self.site, self.layer), self.positions,
                        self.heads)

    def _source(self, model, session, col: str, registry):
        other = session.runs["B" if col == "A" else "A"]
        mine = session.runs[col]
        if other.spec.intervention is not None and other.spec.intervention.kind == "patch from other column":
            raise ValueError("both columns patch from each other: let one of them run without patching")
        if other.inputs is None or not other.inputs.input_ids.equal(mine.inputs.input_ids):
            raise ValueError("patching needs both columns to see the same prompt tokens (same tokenizer and "
                             "pan-and-scan setting)")
        src = registry.get(other.spec.model)
        src_cfg = src.model.config.text
        if (src_cfg.num_layers, src_cfg.hidden_size, src_cfg.num_heads) != (
                model.config.text.num_layers, model.config.text.hidden_size, model.config.text.num_heads):
            raise ValueError(f"cannot patch between {src.model.config.name} and {model.config.name}: their shapes differ")
        n = mine.n_prompt
        for p in self.positions or ():
            if not 0 <= p < n:
                raise ValueError(f"patch position {p} is outside the prompt (positions 0–{n - 1})")
        with src.lock, src.model.hooks(other.hooks):
            _, cache = src.model.run_with_cache(other.inputs, names_filter=[_site(self.site, self.layer)], top_k=0,
                                                return_logits=False)
        return cache


def _site(site: str, layer: int) -> str:
    return act_name(site, layer)


def parse_intervention(col: str, v: dict) -> InterventionSpec | None:
    """Checked settings of one column (`v`: field -> value, FIELDS), None for no intervention."""
    kind = v.get("intervention") or "none"
    if kind not in KINDS:
        raise SettingsError(f"column {col}: intervention must be one of {', '.join(KINDS)}, not {kind!r}")
    if kind == "none":
        return None
    where = f"column {col}: {kind}"
    layer = whole_list(f"{where}: layer", v.get("layer"))
    if layer is None or len(layer) != 1 or layer[0] < 0:
        raise SettingsError(f"{where}: give one layer number (e.g. 5)")
    # each kind reads only its own fields: the page keeps the others' values when the kind
    # changes, and a leftover (heads typed for an ablation) must not fail a steer or a patch
    if kind == "ablate heads":
        heads = whole_list(f"{where}: heads", v.get("heads"))
        if not heads:
            raise SettingsError(f"{where}: list the heads to ablate (e.g. 0, 2)")
        return InterventionSpec(kind, layer[0], tuple(heads))
    if kind == "steer":
        pos, neg = (v.get("steer_positive") or "").strip(), (v.get("steer_negative") or "").strip()
        if not pos or not neg:
            raise SettingsError(f"{where}: give both texts of the contrast pair (e.g. 'Love' and 'Hate')")
        scale = number(f"{where}: scale", v.get("steer_scale"))
        return InterventionSpec(kind, layer[0], None, pos, neg, scale)
    site = v.get("patch_site") or "resid_post"
    if site not in PATCH_SITES:
        raise SettingsError(f"{where}: site must be one of {', '.join(PATCH_SITES)}, not {site!r}")
    # heads pick slices of the per-head site z only; at any other site the field is not this patch's
    heads = whole_list(f"{where}: heads", v.get("heads")) if site == "z" else None
    positions = whole_list(f"{where}: positions", v.get("patch_positions"))
    return InterventionSpec(kind, layer[0], tuple(heads) if heads else None, site=site,
                            positions=tuple(positions) if positions else None)
