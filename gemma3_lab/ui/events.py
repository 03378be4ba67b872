"""Event handlers: generate both columns (streaming), stop, and the wiring of the page.

A setting the user can fix raises `gr.Error`: the page shows it as a message and a
`gradio_client` script gets it as the exception text; the app keeps serving.
"""

from __future__ import annotations

import inspect as pyinspect

import gradio as gr

from .layout import COLUMN_FIELDS, Page
from .registry import ModelRegistry
from .render import divergence_md, results_json, status_md, tokens_html
from .runner import prepare, run_all
from .session import COLUMNS, Session
from .settings import ColumnSpec, SettingsError, build_prompt, parse_decoding, uploaded_images

GENERATE_PARAMS = ("prompt", "chat", "images") + tuple(f"{c.lower()}_{f}" for c in COLUMNS for f in COLUMN_FIELDS)


def named(fn, params: tuple[str, ...], extra: tuple[str, ...] = ()):
    """Give `fn(*values)` a signature with these parameter names: gradio_client scripts call
    the endpoint with them as keywords (`client.predict(prompt=..., a_model=...)`)."""
    P = pyinspect.Parameter
    fn.__signature__ = pyinspect.Signature([P(n, P.POSITIONAL_OR_KEYWORD) for n in params + extra])
    return fn


def parse_columns(registry: ModelRegistry, values: dict) -> list[ColumnSpec]:
    specs = []
    for col in COLUMNS:
        v = {f: values[f"{col.lower()}_{f}"] for f in COLUMN_FIELDS}
        try:
            key = registry.resolve(v["model"])
        except ValueError as e:
            raise SettingsError(f"column {col}: {e}") from None
        decoding = parse_decoding(col, v["decoding"], v["temperature"], v["top_k"], v["top_p"], v["seed"],
                                  v["max_new_tokens"])
        specs.append(ColumnSpec(col, key, decoding, bool(v["pan_and_scan"])))
    return specs


def outputs_of(session: Session) -> tuple:
    d = session.first_divergence()
    out = []
    for col in COLUMNS:
        run = session.runs.get(col)
        out += [status_md(run), tokens_html(run, col, divergence=d)]
    return (*out, divergence_md(session), results_json(session))


def make_generate(registry: ModelRegistry):
    def generate(*args):
        *values, session = args
        values = dict(zip(GENERATE_PARAMS, values))
        try:
            images = uploaded_images(values["images"])
            prompt = build_prompt(values["prompt"], bool(values["chat"]), len(images))
            specs = parse_columns(registry, values)
            for _ in prepare(registry, session, specs, prompt, images):
                yield outputs_of(session)
        except SettingsError as e:
            session.runs = {}
            raise gr.Error(str(e), duration=None) from None
        for _ in run_all(registry, session):
            yield outputs_of(session)

    return named(generate, GENERATE_PARAMS, ("session",))


def stop(session: Session) -> str:
    session.stop.set()
    return "stop requested: the generation ends after the current token"


def wire(page: Page, registry: ModelRegistry, session: gr.State) -> None:
    inputs = [page.prompt, page.chat, page.images]
    for col in COLUMNS:
        inputs += page.columns[col].inputs()
    outputs = []
    for col in COLUMNS:
        outputs += [page.columns[col].status, page.columns[col].tokens]
    outputs += [page.divergence, page.results]
    gen = dict(fn=make_generate(registry), inputs=inputs + [session], outputs=outputs, api_name="generate",
               concurrency_id="model", show_progress="minimal")
    page.generate.click(**gen)
    page.prompt.submit(**{**gen, "api_visibility": "private"})
    page.stop.click(stop, inputs=[session], outputs=[page.divergence], api_name="stop", queue=False)
