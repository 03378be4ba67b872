"""Event handlers: generate both columns (streaming), stop, and the wiring of the page.

A setting the user can fix raises `gr.Error`: the page shows it as a message and a
`gradio_client` script gets it as the exception text; the app keeps serving.
"""

from __future__ import annotations

import inspect as pyinspect

import gradio as gr

from gemma3_lab.app.ui.checks import TOAST_SECONDS
from gemma3_lab.app.ui.compare_tab import wire_compare_tab
from gemma3_lab.app.ui.explain import make_explain
from gemma3_lab.app.ui.figures import heatmap_image, layer_mask_image, lens_image, to_image
from gemma3_lab.app.ui.images_tab import wire_images_tab
from gemma3_lab.app.ui.inspector import inspect_token, lens_at, lens_rows, sequence_inputs
from gemma3_lab.app.ui.intervene import parse_intervention
from gemma3_lab.app.ui.layout import COLUMN_FIELDS, Page, layer_choices
from gemma3_lab.app.ui.registry import PRECISIONS, ModelKey, ModelRegistry
from gemma3_lab.app.ui.render import divergence_md, results_json, status_md, tokens_html, topk_html
from gemma3_lab.app.ui.runner import prepare, run_all
from gemma3_lab.app.ui.session import COLUMNS, Session
from gemma3_lab.app.ui.settings import ColumnSpec, SettingsError, build_prompt, parse_decoding, uploaded_images
from gemma3_lab.app.ui.widgets import head_choices
from gemma3_lab.viz.atlas import mask_atlas as draw

GENERATE_PARAMS = ("prompt", "chat", "images") + tuple(f"{c.lower()}_{f}" for c in COLUMNS for f in COLUMN_FIELDS)


def named(fn, params: tuple[str, ...], extra: tuple[str, ...] = (), optional: tuple[str, ...] = ()):
    """Give `fn(*values)` a signature with these parameter names: gradio_client scripts call
    the endpoint with them as keywords (`client.predict(prompt=..., a_model=...)`); the
    `optional` ones default to None (a script may leave them out)."""
    P = pyinspect.Parameter
    fn.__signature__ = pyinspect.Signature([P(n, P.POSITIONAL_OR_KEYWORD) for n in params + extra]
                                           + [P(n, P.POSITIONAL_OR_KEYWORD, default=None) for n in optional])
    return fn


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


def outputs_of(session: Session) -> tuple:
    d = session.first_divergence()
    out = []
    for col in COLUMNS:
        run = session.runs.get(col)
        out += [status_md(run, session.prompt), tokens_html(run, col, divergence=d)]
    return (*out, divergence_md(session), results_json(session))


def make_generate(registry: ModelRegistry, max_prompt: int | None = None):
    def generate(*args):
        """Generate both columns, streaming. A press while this session's previous generation
        runs replaces it: that one is stopped (within one token or prefill chunk) and this one
        starts when it has ended."""
        *values, session = args
        values = dict(zip(GENERATE_PARAMS, values))
        session.generation += 1
        mine = session.generation
        if session.busy.locked():
            session.stop.set()
        with session.busy:
            if session.generation != mine:  # an even newer press replaces this one before it starts
                return
            try:
                images = uploaded_images(values["images"])
                prompt = build_prompt(values["prompt"], bool(values["chat"]), len(images))
                specs = parse_columns(registry, values)
                for _ in prepare(registry, session, specs, prompt, images, max_prompt):
                    yield outputs_of(session)
            except SettingsError as e:
                session.runs = {}
                raise gr.Error(str(e), duration=TOAST_SECONDS) from None
            del images  # the decoded uploads go with this request; the runs keep thumbnails
            for _ in run_all(registry, session):
                yield outputs_of(session)
            if session.generation != mine:
                for run in session.runs.values():
                    run.status += " — replaced by a newer Generate"
                yield outputs_of(session)

    return named(generate, GENERATE_PARAMS, ("session",))


def stop(session: Session) -> str:
    session.stop.set()
    return "stop requested: the generation ends after the current token (or prompt chunk)"


def wire(page: Page, registry: ModelRegistry, session: gr.State, max_prompt: int | None = None) -> None:
    inputs = [page.prompt, page.chat, page.images]
    for col in COLUMNS:
        inputs += page.columns[col].inputs()
    outputs = []
    for col in COLUMNS:
        outputs += [page.columns[col].status, page.columns[col].tokens]
    outputs += [page.divergence, page.results]
    # "multiple": a second press is sent (and replaces the running generation), never dropped
    gen = dict(fn=make_generate(registry, max_prompt), inputs=inputs + [session], outputs=outputs,
               api_name="generate", concurrency_id="model", show_progress="minimal", trigger_mode="multiple")
    page.generate.click(**gen)
    page.stop.click(stop, inputs=[session], outputs=[page.divergence], api_name="stop", queue=False)
    wire_inspector(page, registry, session)
    wire_images_tab(page.images_tab, registry, session)
    wire_compare_tab(page.compare_tab, registry, session)
    a = page.atlas
    a["draw"].click(make_atlas(registry), inputs=[a["column"], session], outputs=[a["image"]], api_name="mask_atlas",
                    concurrency_id="inspect")


def make_inspect(registry: ModelRegistry):
    def inspect(column, index, layer, head, session: Session, position=None):
        """Inspect column "A" or "B" at generated step `index` (0 = first generated) or at slot
        `position` (absolute, prompt included), at a layer and head (-1 = all heads); read
        from the generation's capture."""
        if column not in COLUMNS:
            raise gr.Error(f"column must be A or B, not {column!r}")
        try:
            ins = inspect_token(registry, session, column, index, layer if layer is not None else 0, head, position)
            run = session.run(column)
            model = registry.get(run.spec.model).model
            lens = lens_at(model, run.capture, ins.query)
        except (LookupError, SettingsError) as e:
            raise gr.Error(str(e.args[0] if e.args else e)) from None
        config = model.config
        data = {
            "column": column, "index": ins.index, "position": ins.query if ins.index is None else None,
            "layer": ins.layer, "head": ins.head, "layer_type": ins.layer_kind, "query_position": ins.query,
            "top_k": ins.top_k, "attended": ins.attended, "logit_lens": lens_rows(lens),
        }
        return (
            column, ins.index, data["position"], ins.header, topk_html(ins.step), ins.attended,
            gr.Dropdown(choices=layer_choices(config), value=ins.layer),
            gr.Dropdown(choices=head_choices(config), value=ins.head),
            heatmap_image(ins), layer_mask_image(ins), lens_image(lens, config), data["logit_lens"], data,
        )

    return named(inspect, ("column", "index", "layer", "head", "session"), optional=("position",))


def wire_inspector(page: Page, registry: ModelRegistry, session: gr.State) -> None:
    w = page.inspector
    inspect = make_inspect(registry)
    outputs = [w[k] for k in ("column", "index", "position", "header", "top_k", "attended", "layer", "head", "heatmap", "mask",
                              "lens", "lens_table", "json")]
    common = dict(outputs=outputs, concurrency_id="inspect", show_progress="minimal")
    gr.on([w["layer"].input, w["head"].input], inspect,
          inputs=[w["column"], w["index"], w["layer"], w["head"], session, w["position"]], api_name="inspect", **common)
    for col in COLUMNS:
        def clicked(layer, head, session, evt: gr.SelectData, col=col):
            return inspect(col, evt.index, layer, head, session)

        page.columns[col].tokens.select(clicked, inputs=[w["layer"], w["head"], session], api_visibility="private",
                                        **common)
    explain = named(make_explain(registry), ("column", "index", "session"),
                    optional=("position", "steps", "input_attribution"))
    w["explain"].click(explain, inputs=[w["column"], w["index"], session, w["position"], w["explain_steps"],
                                        w["explain_ig"]],
                       outputs=[w[k] for k in ("explain_header", "explain_dla", "explain_inputs", "explain_table",
                                               "explain_json")],
                       api_name="explain", concurrency_id="model", show_progress="minimal")


def make_atlas(registry: ModelRegistry):
    def mask_atlas(column, session: Session):
        """Every layer's mask over column A's or B's prompt and generated tokens."""
        try:
            run = session.run(column)
        except LookupError as e:
            raise gr.Error(str(e.args[0])) from None
        if run.inputs is None:
            raise gr.Error(f"column {column} has no processed prompt yet: press Generate first")
        model = registry.get(run.spec.model).model
        return to_image(draw(model, sequence_inputs(run, upto=len(run.steps))))

    return mask_atlas
