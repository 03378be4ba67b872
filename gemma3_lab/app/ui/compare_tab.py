"""The Compare tab: what the two columns computed on their shared prompt (model, precision and
intervention as they ran), read from their captures and measured by
`gemma3_lab.analysis.compare.compare_residuals`: the residual stream's relative error after
every layer and the KL between their next-token distributions. Only the two heads run."""

from __future__ import annotations

import gradio as gr

from gemma3_lab.analysis.compare import Comparison, compare_residuals, next_token_kl_from_residuals
from gemma3_lab.app.ui.checks import TOAST_SECONDS
from gemma3_lab.app.ui.inspector import captured
from gemma3_lab.app.ui.registry import ModelRegistry
from gemma3_lab.app.ui.session import Session


def build_compare_tab() -> dict:
    w = {}
    gr.Markdown(
        "How far apart did the two columns compute the same prompt? Give B another **precision** (say int4) or "
        "an **intervention**, press **Generate both**, then **Compare**. Read from both generations' captures "
        "(nothing runs again but the two heads): each column's model, precision and intervention as it ran."
    )
    w["run"] = gr.Button("Compare A and B on the prompt", elem_id="compare-run")
    w["summary"] = gr.Markdown(elem_id="compare-summary")
    with gr.Row(equal_height=False):
        w["layers"] = gr.Dataframe(headers=["residual after", "relative error ‖B − A‖ / ‖A‖"], interactive=False,
                                   label="residual stream, every prompt position and feature",
                                   elem_id="compare-layers")
        w["positions"] = gr.Dataframe(
            headers=["position", "token", "KL(A ‖ B) nats", "A's top-1", "B's top-1"], interactive=False,
            label="next-token distribution after each prompt position", elem_id="compare-positions")
    return w


def compare_runs(registry: ModelRegistry, session: Session) -> Comparison:
    """`compare_residuals` of the two columns' captures over the prompt's slots."""
    a, b = session.run("A"), session.run("B")
    ca, cb = captured(a, "A"), captured(b, "B")
    S = a.n_prompt
    if b.n_prompt != S or not ca.input_ids[:, :S].equal(cb.input_ids[:, :S]):
        raise LookupError("A and B saw different prompt tokens (their tokenizers differ): nothing to line up")
    ea, eb = registry.get(a.spec.model), registry.get(b.spec.model)
    if ea.model.config.text != eb.model.config.text:
        raise LookupError(f"cannot compare {a.spec.model} with {b.spec.model}: two variants of one model are "
                          "compared (their text configs differ)")
    kl = next_token_kl_from_residuals(ea.model, eb.model, ca.resid[-1, :S], cb.resid[-1, :S])
    return compare_residuals(ca.resid[:, :S], cb.resid[:, :S], *kl, ca.input_ids[0, :S].tolist(), ea.model.tokenizer,
                             labels=(f"A: {a.spec.model}", f"B: {b.spec.model}"))


def make_compare(registry: ModelRegistry):
    def compare_columns(session: Session):
        """Per-layer residual relative error and per-position KL of column B's run against A's,
        from both captures over the prompt."""
        try:
            c = compare_runs(registry, session)
        except LookupError as e:
            raise gr.Error(str(e.args[0]), duration=TOAST_SECONDS) from None
        tok = registry.get(session.run("A").spec.model).model.tokenizer
        summary = c.summary(by_layer=False) + "."
        layers = [[s, float(e)] for s, e in zip(c.sites, c.resid_rel_error)]
        positions = [[i, t, float(k), tok.id_to_token(int(x)), tok.id_to_token(int(y))]
                     for i, (t, k, x, y) in enumerate(zip(c.tokens, c.kl, c.top1_a, c.top1_b))]
        return summary, layers, positions

    return compare_columns


def wire_compare_tab(w: dict, registry: ModelRegistry, session) -> None:
    w["run"].click(make_compare(registry), inputs=[session], outputs=[w["summary"], w["layers"], w["positions"]],
                   api_name="compare", concurrency_id="inspect")
