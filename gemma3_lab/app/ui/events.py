"""Event handlers: generate both columns (streaming), stop, and the wiring of the page.

A setting the user can fix raises `gr.Error`: the page shows it as a message and a
`gradio_client` script gets it as the exception text; the app keeps serving.
"""

from __future__ import annotations

import inspect as pyinspect

import gradio as gr

from gemma3_lab.app.ui import session_io
from gemma3_lab.app.ui.checks import TOAST_SECONDS
from gemma3_lab.app.ui.columns import parse_columns
from gemma3_lab.app.ui.compare_tab import wire_compare_tab
from gemma3_lab.app.ui.explain import make_explain
from gemma3_lab.app.ui.figures import to_image
from gemma3_lab.app.ui.images_tab import wire_images_tab
from gemma3_lab.app.ui.inspect_figures import make_figures
from gemma3_lab.app.ui.inspect_views import attention_view_value, lens_view_value
from gemma3_lab.app.ui.inspector import all_labels, lens_rows, look, sequence_inputs
from gemma3_lab.app.ui.layout import COLUMN_FIELDS, Page, layer_choices
from gemma3_lab.app.ui.lens_table import wire_lens_table
from gemma3_lab.app.ui.prefill import make_prefill
from gemma3_lab.app.ui.registry import ModelRegistry
from gemma3_lab.app.ui.render import divergence_md, results_json, status_md, tokens_html, topk_html
from gemma3_lab.app.ui.runner import prepare, run_all
from gemma3_lab.app.ui.session import COLUMNS, Session
from gemma3_lab.app.ui.settings import SettingsError, build_prompt, uploaded_images
from gemma3_lab.app.ui.widgets import head_choices
from gemma3_lab.errors import Gemma3LabError
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
                session.settings = {k: v for k, v in values.items() if k != "images"}
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


def wire(page: Page, registry: ModelRegistry, session: gr.State, max_prompt: int | None = None, demo=None) -> None:
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
    wire_session_files(page, registry, session, inputs, outputs)
    fields = {name: c for name, c in zip(GENERATE_PARAMS, inputs) if name != "images"}
    if demo is not None:  # a link's query parameters fill the page as it opens
        # queued: only a queued event can send the page its warning about a bad link value
        demo.load(make_prefill(fields), inputs=None, outputs=list(fields.values()), api_visibility="private")
    a = page.atlas
    a["draw"].click(make_atlas(registry), inputs=[a["column"], session], outputs=[a["image"]], api_name="mask_atlas",
                    concurrency_id="inspect")


def wire_session_files(page: Page, registry: ModelRegistry, session: gr.State, inputs: list, outputs: list) -> None:
    """Save: the session as a file to download. Load: the file's settings back on the page and
    its columns shown as they were (statuses, tokens, results)."""
    f = page.files

    def save_session(session: Session):
        """The session (prompt, settings, both generations and their captures) as a .zip."""
        try:
            return str(session_io.save(session))
        except SettingsError as e:
            raise gr.Error(str(e), duration=TOAST_SECONDS) from None

    def load_session(path, session: Session):
        """Load a saved session: its settings on the page, its columns as they were."""
        try:
            fields = session_io.load(registry, session, path)
        except (SettingsError, Gemma3LabError) as e:
            raise gr.Error(str(e.args[0] if e.args else e), duration=TOAST_SECONDS) from None
        values = [gr.skip() if name == "images" else fields.get(name, gr.skip()) for name in GENERATE_PARAMS]
        return (*values, *outputs_of(session))

    f["save"].click(save_session, inputs=[session], outputs=[f["file"]], api_name="save_session",
                    concurrency_id="inspect")
    f["load"].upload(load_session, inputs=[f["load"], session], outputs=inputs + outputs, api_name="load_session",
                     concurrency_id="model")


def make_inspect(registry: ModelRegistry):
    def inspect(column, index, layer, head, session: Session, position=None):
        """Inspect column "A" or "B" at generated step `index` (0 = first generated) or at slot
        `position` (absolute, prompt included), at a layer and head (-1 = all heads); read
        from the generation's capture. The attention view and the lens table come back as the
        numbers the page draws (figures to download: `inspect_figures`)."""
        try:
            ins, run, model, lens = look(registry, session, column, index, layer, head, position)
            view = attention_view_value(run.capture, model.config, all_labels(model, run), ins.query, run.n_prompt,
                                        ins.layer, ins.head)
        except (LookupError, SettingsError, Gemma3LabError) as e:
            raise gr.Error(str(e.args[0] if e.args else e), duration=TOAST_SECONDS) from None
        config = model.config
        data = {
            "column": column, "index": ins.index, "position": ins.query if ins.index is None else None,
            "layer": ins.layer, "head": ins.head, "layer_type": ins.layer_kind, "query_position": ins.query,
            "top_k": ins.top_k, "attended": ins.attended, "logit_lens": lens_rows(lens, ins.query),
        }
        return (
            column, ins.index, data["position"], ins.header, topk_html(ins.step), ins.attended,
            gr.Dropdown(choices=layer_choices(config), value=ins.layer),
            gr.Dropdown(choices=head_choices(config), value=ins.head),
            view, lens_view_value(lens, ins.query), data["logit_lens"], data,
        )

    return named(inspect, ("column", "index", "layer", "head", "session"), optional=("position",))


def wire_inspector(page: Page, registry: ModelRegistry, session: gr.State) -> None:
    w = page.inspector
    inspect = make_inspect(registry)
    outputs = [w[k] for k in ("column", "index", "position", "header", "top_k", "attended", "layer", "head",
                              "attention", "lens_view", "lens_table", "json")]
    # the selectors are outputs too (their choices follow the column's model), but an error's
    # badge must not cover them: progress and errors show on the panels only
    panels = [w[k] for k in ("header", "top_k", "attention", "lens_view")]
    common = dict(outputs=outputs, concurrency_id="inspect", show_progress="minimal", show_progress_on=panels)
    where = [w["column"], w["index"], w["layer"], w["head"], session, w["position"]]
    gr.on([w["layer"].input, w["head"].input], inspect, inputs=where, api_name="inspect", **common)
    for col in COLUMNS:
        def clicked(layer, head, session, evt: gr.SelectData, col=col):
            # a generated token sends its step index; a prompt token (value "A:12") its slot
            if isinstance(evt.value, str) and ":" in evt.value:
                return inspect(col, None, layer, head, session, int(evt.value.split(":")[1]))
            return inspect(col, evt.index, layer, head, session)

        page.columns[col].tokens.select(clicked, inputs=[w["layer"], w["head"], session], api_visibility="private",
                                        **common)
    wire_lens_table(w, registry, session)
    w["draw_figures"].click(make_figures(registry), inputs=where,
                            outputs=[w[k] for k in ("heatmap", "mask", "lens", "downloads")],
                            api_name="inspect_figures", concurrency_id="inspect", show_progress="minimal")
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
            raise gr.Error(str(e.args[0]), duration=TOAST_SECONDS) from None
        if run.inputs is None:
            raise gr.Error(f"column {column} has no processed prompt yet: press Generate first", duration=TOAST_SECONDS)
        model = registry.get(run.spec.model).model
        return to_image(draw(model, sequence_inputs(run, upto=len(run.steps))))

    return mask_atlas
