"""The page's widgets: the shared prompt, one settings panel per column, the token strips,
the inspector and the atlas / image tabs. Only layout here; handlers live in `events`."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from gemma3_lab.app.ui.compare_tab import build_compare_tab
from gemma3_lab.app.ui.explain import BUTTON as EXPLAIN_BUTTON
from gemma3_lab.app.ui.explain import DEFAULT_STEPS, explain_headers
from gemma3_lab.app.ui.explain import TOOLTIP as EXPLAIN_NOTE
from gemma3_lab.app.ui.images_tab import build_images_tab
from gemma3_lab.app.ui.intervene import FIELDS as INTERVENTION_FIELDS
from gemma3_lab.app.ui.intervene import KINDS, PATCH_SITES
from gemma3_lab.app.ui.registry import PRECISIONS
from gemma3_lab.app.ui.render import CLICK_JS, CSS, LEGEND, TOPK_CSS, tokens_html, topk_html
from gemma3_lab.app.ui.settings import DECODING, MAX_NEW_TOKENS
from gemma3_lab.app.ui.widgets import figure_slot, head_choices
from gemma3_lab.config import BUNDLED, PRESETS

# the order of one column's settings in the `generate` endpoint, after prompt/chat/images;
# the API names are these prefixed with "a_" / "b_"
COLUMN_FIELDS = ("model", "precision", "decoding", "temperature", "top_k", "top_p", "seed", "max_new_tokens", "pan_and_scan",
                 *INTERVENTION_FIELDS)


@dataclass
class ColumnWidgets:
    name: str
    settings: dict  # field -> component, in COLUMN_FIELDS order (plus intervention fields)
    status: gr.Markdown
    tokens: gr.HTML

    def inputs(self) -> list:
        return list(self.settings.values())


def column_settings(name: str, model_choices: list[str], default_model: str = BUNDLED) -> dict:
    s = {}
    s["model"] = gr.Dropdown(
        model_choices, value=default_model, allow_custom_value=True, label=f"{name}: model",
        info="bundled, demo-multimodal (untrained vision), or a folder under the allowed root",
        elem_id=f"model-{name}",
    )
    s["precision"] = gr.Radio(list(PRECISIONS), value="float32", label="precision",
                              info="int8 / int4: weight-only quantized projections, float32 activations",
                              elem_id=f"precision-{name}")
    with gr.Row():
        s["decoding"] = gr.Radio(list(DECODING), value="greedy", label="decoding", elem_id=f"decoding-{name}")
        s["max_new_tokens"] = gr.Number(24, label=f"max new tokens (1–{MAX_NEW_TOKENS})", precision=0,
                                        elem_id=f"max-{name}")
    with gr.Row():
        s["temperature"] = gr.Number(1.0, label="temperature", min_width=80, elem_id=f"temperature-{name}")
        s["top_k"] = gr.Number(0, label="top-k (0 = off)", precision=0, min_width=80, elem_id=f"topk-{name}")
        s["top_p"] = gr.Number(1.0, label="top-p (1 = off)", min_width=80, elem_id=f"topp-{name}")
        s["seed"] = gr.Number(0, label="seed", precision=0, min_width=80, elem_id=f"seed-{name}")
    s["pan_and_scan"] = gr.Checkbox(False, label="pan-and-scan (crops of large images)", elem_id=f"pas-{name}")
    with gr.Accordion(f"{name}: intervention", open=False, elem_id=f"intervention-{name}"):
        s["intervention"] = gr.Radio(list(KINDS), value="none", show_label=False, elem_id=f"kind-{name}")
        with gr.Row():
            s["layer"] = gr.Number(5, precision=0, label="layer", min_width=80, elem_id=f"layer-{name}")
            s["heads"] = gr.Textbox("", label="heads (ablate; patch site z)", placeholder="0, 2", min_width=120,
                                    elem_id=f"heads-{name}")
        with gr.Row():
            s["steer_positive"] = gr.Textbox("", label="steer: toward", placeholder="Love", min_width=100,
                                             elem_id=f"steer-pos-{name}")
            s["steer_negative"] = gr.Textbox("", label="steer: away from", placeholder="Hate", min_width=100,
                                             elem_id=f"steer-neg-{name}")
            s["steer_scale"] = gr.Number(4.0, label="steer: scale", min_width=80, elem_id=f"steer-scale-{name}")
        with gr.Row():
            s["patch_site"] = gr.Dropdown(list(PATCH_SITES), value="resid_post", label="patch: site", min_width=100,
                                          elem_id=f"patch-site-{name}")
            s["patch_positions"] = gr.Textbox("", label="patch: prompt positions (empty = all)", placeholder="3, 4",
                                              min_width=120, elem_id=f"patch-pos-{name}")
        gr.Markdown("Ablate: zero those heads' outputs (hook_z). Steer: add scale × (residual after the layer at the "
                    "last token of 'toward' − of 'away from') at every position. Patch: copy the other column's "
                    "activation (its model and intervention, same prompt) at that site.")
    return {f: s[f] for f in COLUMN_FIELDS}


def token_strip(name: str) -> gr.HTML:
    return gr.HTML(tokens_html(None, name), js_on_load=CLICK_JS, css_template=CSS, elem_id=f"tokens-{name}",
                   min_height=60)


@dataclass
class Page:
    prompt: gr.Textbox
    chat: gr.Checkbox
    images: gr.File
    columns: dict  # "A" | "B" -> ColumnWidgets
    generate: gr.Button
    stop: gr.Button
    divergence: gr.Markdown
    results: gr.JSON
    inspector: dict  # name -> component
    atlas: dict
    images_tab: dict
    compare_tab: dict


def build_page(model_choices: list[str]) -> Page:
    gr.Markdown(
        "# gemma3_lab · side by side\n"
        "One prompt, two generations. Set each column's model, decoding and intervention, press "
        "**Generate**, then click any generated token to see why it came out."
    )
    with gr.Row():
        with gr.Column(scale=3):
            prompt = gr.Textbox(label="prompt", lines=3, placeholder="The capital of France is", elem_id="prompt")
        with gr.Column(scale=1, min_width=200):
            chat = gr.Checkbox(False, label="chat mode (one user turn in Gemma's chat format)", elem_id="chat")
            images = gr.File([], label="images (optional)", file_count="multiple", type="filepath", elem_id="images",
                             height=110)
    with gr.Row():
        generate = gr.Button("Generate both", variant="primary", elem_id="generate")
        stop = gr.Button("Stop", variant="stop", elem_id="stop")
    with gr.Tabs():
        with gr.Tab("Generate & inspect", id="main"):
            columns = {}
            with gr.Row(equal_height=False):
                for name in ("A", "B"):
                    with gr.Column(min_width=320):
                        with gr.Accordion(f"column {name} settings", open=True):
                            settings = column_settings(name, model_choices)
                        status = gr.Markdown(elem_id=f"status-{name}")
                        tokens = token_strip(name)
                        columns[name] = ColumnWidgets(name, settings, status, tokens)
            gr.HTML(LEGEND, css_template=CSS, js_on_load=None)
            divergence = gr.Markdown(elem_id="divergence")
            inspector = build_inspector()
            with gr.Accordion("results as JSON (what the `generate` endpoint returns)", open=False):
                results = gr.JSON(elem_id="results")
        with gr.Tab("Mask atlas", id="atlas"):
            atlas = build_atlas_tab()
        with gr.Tab("Images", id="images"):
            images_tab = build_images_tab()
        with gr.Tab("Compare A and B", id="compare"):
            compare_tab = build_compare_tab()
    return Page(prompt, chat, images, columns, generate, stop, divergence, results, inspector, atlas, images_tab,
                compare_tab)


def layer_choices(config) -> list[tuple[str, int]]:
    t = config.text
    return [(f"L{i} {t.layer_types[i].short}", i) for i in range(t.num_layers)]


def build_inspector(config=None) -> dict:
    """The inspector panel; its layer/head choices follow the model of the clicked column."""
    config = config or PRESETS[BUNDLED]
    w = {}
    gr.Markdown("## Inspector")
    w["header"] = gr.Markdown("Click a generated token to see its candidates and where it attended.",
                              elem_id="insp-header")
    w["column"] = gr.Textbox(visible=False, label="column")
    w["index"] = gr.Number(visible=False, label="index", precision=0)
    w["position"] = gr.Number(None, visible=False, label="position", precision=0)
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=280):
            gr.Markdown("**Top candidates** (the probability the model gave each; chosen token highlighted)")
            w["top_k"] = gr.HTML(topk_html(None), css_template=TOPK_CSS, js_on_load=None, elem_id="insp-topk")
            w["attended"] = gr.Dataframe(
                headers=["position", "token", "attention weight"], interactive=False, elem_id="insp-attended",
                label="attended most by that query (the chosen head, or the mean over heads)")
        with gr.Column(scale=3, min_width=360):
            with gr.Row():
                w["layer"] = gr.Dropdown(layer_choices(config), value=config.text.global_layers[0], label="layer",
                                         allow_custom_value=True, elem_id="insp-layer")
                w["head"] = gr.Dropdown(head_choices(config), value=-1, label="head", allow_custom_value=True,
                                        elem_id="insp-head")
            w["mask"] = figure_slot("insp-mask", "The mask this layer used (its hook_mask)", 340)
    w["heatmap"] = figure_slot("insp-heatmap", "Where it attended: the layer's attention, the producing query's row "
                               "marked", 440)
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=360):
            w["lens"] = figure_slot("insp-lens", "Logit lens: the top next token read off the residual after each "
                                    "layer (last column: the producing position)", 600)
        with gr.Column(scale=2, min_width=280):
            w["lens_table"] = gr.Dataframe(
                headers=["after", "top-1", "p", "top-2", "p", "top-3", "p"], interactive=False, max_height=620,
                label="logit lens at the producing position (exact probabilities)", elem_id="insp-lens-table")
    with gr.Accordion("inspection as JSON (what the `inspect` endpoint returns)", open=False):
        w["json"] = gr.JSON(elem_id="insp-json")
    build_explain(w)
    return w


def build_explain(w: dict) -> None:
    """"Who wrote this token?": an explicit action, since unlike the views above it runs the model."""
    gr.Markdown("### Who wrote this token?")
    with gr.Row():
        w["explain"] = gr.Button(EXPLAIN_BUTTON, elem_id="insp-explain", scale=3)
        w["explain_steps"] = gr.Number(DEFAULT_STEPS, precision=0, label="integrated-gradient steps", min_width=120,
                                       elem_id="insp-explain-steps", scale=1)
        w["explain_ig"] = gr.Checkbox(True, label="input attribution (integrated gradients)", min_width=120,
                                      elem_id="insp-explain-ig", scale=1)
    gr.Markdown(EXPLAIN_NOTE, elem_classes=["g3-caption"])
    w["explain_header"] = gr.Markdown(elem_id="explain-header")
    w["explain_dla"] = figure_slot("explain-dla", "Direct logit attribution: embedding, each layer's attention and "
                                   "MLP, and the heads that wrote most", 420)
    w["explain_inputs"] = figure_slot("explain-inputs", "The prompt coloured by input attribution (red: raised the "
                                      "logit, blue: lowered it)")
    w["explain_table"] = gr.Dataframe(headers=explain_headers(PRESETS[BUNDLED].text.num_heads), interactive=False,
                                      label="direct logit attribution, as gemma3_lab.analysis.who_wrote returns it",
                                      elem_id="explain-table", max_height=520)
    with gr.Accordion("explanation as JSON (what the `explain` endpoint returns)", open=False):
        w["explain_json"] = gr.JSON(elem_id="explain-json")


def build_atlas_tab() -> dict:
    w = {}
    gr.Markdown("Every layer's attention mask over a column's prompt and generated tokens: local sliding-window "
                "layers and global layers, image tokens attending both ways inside their image.")
    with gr.Row():
        w["column"] = gr.Radio(["A", "B"], value="A", label="column", elem_id="atlas-column")
        w["draw"] = gr.Button("Draw the mask atlas", elem_id="atlas-draw")
    w["image"] = figure_slot("atlas-image", "Mask atlas")
    return w
