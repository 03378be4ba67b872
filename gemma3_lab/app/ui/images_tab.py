"""The Images tab: where each image's soft tokens sit in the sequence, the picture with its
crop boxes and token grid, and one token's attention to the image laid over the picture —
all drawn by `gemma3_lab.viz.images` from the column's real inputs and its generation's capture."""

from __future__ import annotations

import gradio as gr

from gemma3_lab.app.ui.checks import ALL_HEADS, TOAST_SECONDS, SettingsError, check_head, check_layer, whole
from gemma3_lab.app.ui.figures import to_image
from gemma3_lab.app.ui.inspector import captured, sequence_inputs
from gemma3_lab.app.ui.registry import ModelRegistry
from gemma3_lab.app.ui.session import Session
from gemma3_lab.app.ui.widgets import figure_slot, head_choices
from gemma3_lab.config import BUNDLED, PRESETS
from gemma3_lab.viz.common import token_labels
from gemma3_lab.viz.images import image_attention as draw_attention
from gemma3_lab.viz.images import picture_grid, token_strip

LAYER_SETS = ("global layers", "all layers")


def layer_options(n_layers: int = 18) -> list[str]:
    return list(LAYER_SETS) + [f"L{i}" for i in range(n_layers)]


def build_images_tab() -> dict:
    w = {}
    gr.Markdown(
        "Where the image tokens go and what a text token sees of the picture. Upload an image, pick "
        "`demo-multimodal` (or a multimodal folder) for a column and press **Generate both**; the demo's vision "
        "tower is untrained, so its image tokens carry no meaning — the placement and masks are real."
    )
    with gr.Row():
        w["column"] = gr.Radio(["A", "B"], value="A", label="column", elem_id="img-column")
        w["index"] = gr.Number(-1, precision=0, label="token: generated step (-1 = the last prompt token)",
                               elem_id="img-index")
        w["image"] = gr.Number(0, precision=0, label="image (0 = first)", elem_id="img-image")
        w["layers"] = gr.Dropdown(layer_options(), value="global layers", label="layers (averaged)",
                                  allow_custom_value=True, elem_id="img-layers")
        w["head"] = gr.Dropdown(head_choices(PRESETS[BUNDLED]), value=-1,
                                label="heads (averaged)", allow_custom_value=True, elem_id="img-head")
    w["show"] = gr.Button("Show image tokens and attention", elem_id="img-show")
    w["note"] = gr.Markdown(elem_id="img-note")
    w["strip"] = figure_slot("img-strip", "Token strip: every slot of the sequence, each image or crop a block")
    w["grid"] = figure_slot("img-grid", "The picture, its crop boxes and the 16×16 token grid")
    w["attention"] = figure_slot("img-attention", "Text → image attention on the picture")
    return w


def parse_layers(choice, config) -> list[int]:
    t = config.text
    choice = str(choice or "global layers").strip()
    if choice == "global layers":
        return list(t.global_layers)
    if choice == "all layers":
        return list(range(t.num_layers))
    return [check_layer(config, choice.removeprefix("L"))]


def make_image_attention(registry: ModelRegistry):
    def image_attention(column, index, image, layers, head, session: Session):
        """Token strip, picture grid and text→image attention for column A or B's sequence;
        `index` is a generated step (its producing query is used) or -1 for the last prompt token."""
        try:
            run = session.run(column)
            if run.result is None:
                raise LookupError(f"column {column} is still generating: wait until it has finished")
            x = sequence_inputs(run)
            if not x.image_spans:
                raise LookupError(f"column {column}'s prompt holds no image: upload one and choose a multimodal model")
            model = registry.get(run.spec.model).model
            cfg = model.config
            index = whole("token", index)
            if index == -1:
                query = run.n_prompt - 1
            elif 0 <= index < len(run.steps):
                query = run.steps[index].position - 1
            else:
                raise LookupError(f"column {column} has {len(run.steps)} generated tokens; there is no token {index}")
            image = whole("image", image)
            n_images = len({s.image for s in x.image_spans})
            if not 0 <= image < n_images:
                raise LookupError(f"image {image} does not exist: the prompt holds {n_images} image(s)")
            chosen = parse_layers(layers, cfg)
            head = check_head(cfg, head, allow_all=True)
            cache = captured(run, column).cache(model, chosen)  # the generation's patterns: no forward
        except (LookupError, SettingsError) as e:
            raise gr.Error(str(e.args[0] if e.args else e), duration=TOAST_SECONDS) from None
        labels = token_labels(model.tokenizer, x.input_ids, cfg, x.image_spans)
        heads = None if head == ALL_HEADS else [head]
        note = (f"Column {column}: {len(x.image_spans)} image block(s) in {x.input_ids.shape[1]} slots. Attention "
                f"from slot {query} ({labels[query]!r}) — the query that produced "
                + ("the first generated token" if index == -1 else f"step {index}") + f", layers {chosen}, "
                + ("all heads" if heads is None else f"head {head}") + " (mean). " + " · ".join(cfg.notes))
        return (
            note,
            to_image(token_strip(x, model.tokenizer, cfg)),
            to_image(picture_grid(x, image, config=cfg)),
            to_image(draw_attention(cache, x, query, chosen, heads, image, tokens=labels, config=cfg)),
            # the selectors now list this column's model (the page starts with the 270M's 18 × 4)
            gr.Dropdown(choices=layer_options(cfg.text.num_layers), value=layers),
            gr.Dropdown(choices=head_choices(cfg), value=head),
        )

    return image_attention


def wire_images_tab(w: dict, registry: ModelRegistry, session) -> None:
    # progress and an error's "Error" badge only on the figures: on the selectors (outputs too, to
    # follow the column's model) the badge sits over the dropdown and takes its clicks
    w["show"].click(make_image_attention(registry),
                    inputs=[w["column"], w["index"], w["image"], w["layers"], w["head"], session],
                    outputs=[w["note"], w["strip"], w["grid"], w["attention"], w["layers"], w["head"]],
                    show_progress_on=[w["note"], w["strip"], w["grid"], w["attention"]],
                    api_name="image_attention",
                    concurrency_id="inspect")
