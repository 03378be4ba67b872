"""A generate request's per-column settings (`a_model`, `b_top_p`, ...) as `ColumnSpec`s,
each problem one line naming the column and the field."""

from __future__ import annotations

from gemma3_lab.app.ui.intervene import parse_intervention
from gemma3_lab.app.ui.layout import COLUMN_FIELDS
from gemma3_lab.app.ui.registry import PRECISIONS, ModelKey, ModelRegistry
from gemma3_lab.app.ui.session import COLUMNS
from gemma3_lab.app.ui.settings import ColumnSpec, SettingsError, parse_decoding


def parse_columns(registry: ModelRegistry, values: dict) -> list[ColumnSpec]:
    specs = []
    for col in COLUMNS:
        v = {f: values[f"{col.lower()}_{f}"] for f in COLUMN_FIELDS}
        try:
            key = ModelKey(registry.resolve(v["model"]), v["precision"] or "float32")
        except ValueError as e:
            raise SettingsError(f"column {col}: {e}") from None
        if key.precision not in PRECISIONS:
            raise SettingsError(f"column {col}: precision must be one of {', '.join(PRECISIONS)}")
        decoding = parse_decoding(col, v["decoding"], v["temperature"], v["top_k"], v["top_p"], v["seed"],
                                  v["max_new_tokens"])
        specs.append(ColumnSpec(col, key, decoding, bool(v["pan_and_scan"]), parse_intervention(col, v)))
    return specs
