"""Links that open the page set up: query parameters named as the `generate` endpoint's
(`?prompt=The+capital+of&a_model=gemma-3-270m&b_precision=int4&b_intervention=steer`) fill
those fields when the page loads. A value a field cannot take is left out and named in one
warning line; the page still opens."""

from __future__ import annotations

import gradio as gr

TRUE, FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _choices(component) -> list | None:
    ch = getattr(component, "choices", None)
    if not ch:
        return None
    return [c[1] if isinstance(c, (tuple, list)) else c for c in ch]


def convert(name: str, component, raw: str):
    """The value `raw` (a query-string text) as field `name` takes it, or ValueError saying why."""
    if isinstance(component, gr.Checkbox):
        low = raw.strip().lower()
        if low not in TRUE | FALSE:
            raise ValueError(f"{name}={raw!r}: expected true or false")
        return low in TRUE
    if isinstance(component, gr.Number):
        try:
            x = float(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r}: expected a number") from None
        if getattr(component, "precision", None) == 0:
            if x != int(x):
                raise ValueError(f"{name}={raw!r}: expected a whole number")
            return int(x)
        return x
    choices = _choices(component)
    if choices is not None and not getattr(component, "allow_custom_value", False) and raw not in choices:
        raise ValueError(f"{name}={raw!r}: expected one of {', '.join(map(str, choices))}")
    return raw


def make_prefill(fields: dict):
    """A page-load handler filling `fields` ({query name: component}) from the URL."""

    def prefill(request: gr.Request):
        params = dict(request.query_params) if request is not None else {}
        out, problems = [], []
        for name, component in fields.items():
            if name not in params:
                out.append(gr.skip())
                continue
            try:
                out.append(convert(name, component, params[name]))
            except ValueError as e:
                problems.append(str(e))
                out.append(gr.skip())
        unknown = sorted(set(params) - set(fields) - {"__theme", "view"})
        if unknown:
            problems.append(f"unknown link parameter(s) {', '.join(unknown)} (they name the generate endpoint's "
                            "fields, such as prompt, a_model, b_intervention)")
        if problems:
            gr.Warning("link ignored " + "; ".join(problems), duration=10)
        return out

    return prefill
