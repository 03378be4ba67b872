"""The Compare tab: the two columns' loaded variants (model and precision, e.g. float32 vs
int4) on column A's prompt, measured by `gemma3_lab.analysis.compare`: the residual stream's relative
error after every layer and the KL between their next-token distributions."""

from __future__ import annotations

import gradio as gr

from gemma3_lab.analysis.compare import compare
from gemma3_lab.app.ui.checks import TOAST_SECONDS
from gemma3_lab.app.ui.registry import ModelRegistry, holding
from gemma3_lab.app.ui.session import Session


def build_compare_tab() -> dict:
    w = {}
    gr.Markdown(
        "How far apart are the two columns' models on the same prompt? Set column B's **precision** (say int4) "
        "against A's float32, press **Generate both**, then **Compare**. Interventions are not applied here: "
        "this measures the loaded variants themselves (text tokens of the prompt)."
    )
    w["run"] = gr.Button("Compare A and B on the prompt", elem_id="compare-run")
    w["summary"] = gr.Markdown(elem_id="compare-summary")
    with gr.Row(equal_height=False):
        w["layers"] = gr.Dataframe(headers=["residual after", "relative error ‖B − A‖ / ‖A‖"], interactive=False,
                                   label="residual stream, every position and feature", elem_id="compare-layers")
        w["positions"] = gr.Dataframe(
            headers=["position", "token", "KL(A ‖ B) nats", "A's top-1", "B's top-1"], interactive=False,
            label="next-token distribution after each prompt position", elem_id="compare-positions")
    return w


def make_compare(registry: ModelRegistry):
    def compare_columns(session: Session):
        """Per-layer residual relative error and per-position KL of column B's model against A's."""
        try:
            a, b = session.run("A"), session.run("B")
        except LookupError as e:
            raise gr.Error(str(e.args[0]), duration=TOAST_SECONDS) from None
        if a.inputs is None or b.inputs is None:
            raise gr.Error("press Generate first: the comparison runs on the processed prompt",
                           duration=TOAST_SECONDS)
        ea, eb = registry.get(a.spec.model), registry.get(b.spec.model)
        try:
            with holding(ea, eb):
                c = compare(ea.model, eb.model, a.inputs.input_ids, labels=(f"A: {a.spec.model}", f"B: {b.spec.model}"))
        except ValueError as e:
            raise gr.Error(f"cannot compare {a.spec.model} with {b.spec.model}: {e}",
                           duration=TOAST_SECONDS) from None
        tok = ea.model.tokenizer
        summary = c.summary(by_layer=False) + "."
        layers = [[s, float(e)] for s, e in zip(c.sites, c.resid_rel_error)]
        positions = [[i, t, float(k), tok.id_to_token(int(x)), tok.id_to_token(int(y))]
                     for i, (t, k, x, y) in enumerate(zip(c.tokens, c.kl, c.top1_a, c.top1_b))]
        return summary, layers, positions

    return compare_columns


def wire_compare_tab(w: dict, registry: ModelRegistry, session) -> None:
    w["run"].click(make_compare(registry), inputs=[session], outputs=[w["summary"], w["layers"], w["positions"]],
                   api_name="compare", concurrency_id="inspect")
