"""The page's widgets: the shared prompt, one settings panel per column, the token strips,
the inspector and the atlas / image tabs. Only layout here; handlers live in `events`."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from gemma3_lab.app.ui.attention_view import attention_view, logit_lens_view
from gemma3_lab.app.ui.compare_tab import build_compare_tab
from gemma3_lab.app.ui.explain import BUTTON as EXPLAIN_BUTTON
from gemma3_lab.app.ui.explain import DEFAULT_STEPS, explain_headers
from gemma3_lab.app.ui.explain import TOOLTIP as EXPLAIN_NOTE
from gemma3_lab.app.ui.images_tab import build_images_tab
from gemma3_lab.app.ui.intervene import FIELDS as INTERVENTION_FIELDS
from gemma3_lab.app.ui.intervene import KINDS, PATCH_SITES
from gemma3_lab.app.ui.lens_table import BUTTON as LENS_BUTTON
from gemma3_lab.app.ui.registry import PRECISIONS
from gemma3_lab.app.ui.render import CLICK_JS, CSS, KEYS_HTML, KEYS_JS, LEGEND, TOPK_CSS, tokens_html, topk_html
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
                              info="int8 / int4: weight-only quantized projections and embedding table (int4 ranks the vocabulary through an int4 copy of the head), float32 activations",
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
    files: dict  # the session's save / load widgets


def build_page(model_choices: list[str]) -> Page:
    """Results first: the prompt and Generate on one line, then A's and B's tokens side by side
    on aligned rows, their settings folded below them, then the inspector."""
    gr.HTML(KEYS_HTML, js_on_load=KEYS_JS, apply_default_css=False, elem_id="g3-keys")
    with gr.Row(equal_height=True):
        # the buttons on the left: messages appear top right and must not cover Generate
        with gr.Column(scale=1, min_width=160):
            generate = gr.Button("Generate both", variant="primary", elem_id="generate", size="md")
            stop = gr.Button("Stop", variant="stop", elem_id="stop", size="sm")
        with gr.Column(scale=5, min_width=300):
            prompt = gr.Textbox(show_label=False, lines=2, max_lines=8, elem_id="prompt",
                                placeholder="prompt, e.g. The capital of France is   (Ctrl+Enter generates)")
    with gr.Tabs():
        with gr.Tab("Inspect", id="main"):
            columns = {}
            cells = {}
            # status lines on one row, token strips on the next: the strips start level whatever
            # the length of each status
            with gr.Row(equal_height=True, elem_id="statuses"):
                status = {name: gr.Markdown(elem_id=f"status-{name}", elem_classes=["g3-status"], min_height=0)
                          for name in ("A", "B")}
            with gr.Row(equal_height=True, elem_id="strips"):
                for name in ("A", "B"):
                    cells[name] = (status[name], token_strip(name))
            gr.HTML(LEGEND, css_template=CSS, js_on_load=None)
            divergence = gr.Markdown(elem_id="divergence")
            with gr.Row(equal_height=False):
                for name in ("A", "B"):
                    with gr.Column(min_width=300):
                        with gr.Accordion(f"{name} settings", open=False, elem_id=f"settings-{name}"):
                            settings = column_settings(name, model_choices)
                        columns[name] = ColumnWidgets(name, settings, *cells[name])
            with gr.Accordion("prompt options: chat mode, images", open=False, elem_id="prompt-options"):
                with gr.Row():
                    chat = gr.Checkbox(False, label="chat mode (one user turn in Gemma's chat format)",
                                       elem_id="chat")
                    images = gr.File([], label="images (optional)", file_count="multiple", type="filepath",
                                     elem_id="images", height=110)
            inspector = build_inspector()
            files = build_session_files()
            with gr.Accordion("results as JSON (what the `generate` endpoint returns)", open=False):
                results = gr.JSON(elem_id="results")
        with gr.Tab("Masks", id="atlas"):
            atlas = build_atlas_tab()
        with gr.Tab("Images", id="images"):
            images_tab = build_images_tab()
        with gr.Tab("Compare", id="compare"):
            compare_tab = build_compare_tab()
    return Page(prompt, chat, images, columns, generate, stop, divergence, results, inspector, atlas, images_tab,
                compare_tab, files)


def build_session_files() -> dict:
    """Save the session (prompt, settings, both generations, their captures) and load one back."""
    w = {}
    with gr.Accordion("save or load this session", open=False, elem_id="session-files"):
        gr.Markdown("A session file is a .zip: the prompt, both columns' settings, their step records and "
                    "everything the views read (captured arrays as .npz). Loading one shows the same page; "
                    "in Python, `gemma3_lab.analysis.session_file.load_session(path)` reads it.")
        with gr.Row():
            w["save"] = gr.Button("Save session", elem_id="session-save", scale=1)
            w["file"] = gr.File(label="session file", interactive=False, elem_id="session-file", scale=2, height=80)
            w["load"] = gr.UploadButton("Load session…", file_types=[".zip"], elem_id="session-load", scale=1)
    return w


def layer_choices(config) -> list[tuple[str, int]]:
    t = config.text
    return [(f"L{i} {t.layer_types[i].short}", i) for i in range(t.num_layers)]


def build_inspector(config=None) -> dict:
    """The inspector panel; its layer/head choices follow the model of the clicked column.
    The attention view and the lens table are drawn in the browser from the look's numbers;
    the figures below them are drawn on request, to download."""
    config = config or PRESETS[BUNDLED]
    w = {}
    w["header"] = gr.Markdown("Click a token (grey: the prompt) to see its candidates and where it attended; "
                              "arrow keys move along the tokens.", elem_id="insp-header")
    w["column"] = gr.Textbox(visible=False, label="column")
    w["index"] = gr.Number(visible=False, label="index", precision=0)
    w["position"] = gr.Number(None, visible=False, label="position", precision=0)
    with gr.Row(equal_height=False):  # side by side from ~1000 px; stacked below (the tables need the width)
        with gr.Column(scale=2, min_width=380):
            gr.Markdown("**Top candidates** (the probability the model gave each; chosen token highlighted)")
            w["top_k"] = gr.HTML(topk_html(None), css_template=TOPK_CSS, js_on_load=None, elem_id="insp-topk")
            w["attended"] = gr.Dataframe(
                headers=["position", "token", "attention weight"], interactive=False, elem_id="insp-attended",
                label="attended most by that query (the chosen head, or the mean over heads)")
            with gr.Row():
                w["layer"] = gr.Dropdown(layer_choices(config), value=config.text.global_layers[0], label="layer",
                                         allow_custom_value=True, elem_id="insp-layer")
                w["head"] = gr.Dropdown(head_choices(config), value=-1, label="head", allow_custom_value=True,
                                        elem_id="insp-head")
        with gr.Column(scale=3, min_width=440):
            gr.Markdown("**Where each token attended**: hover or focus a token, click to pin; switch layer and "
                        "head above the strips (drawn in your browser)", elem_classes=["g3-caption"])
            w["attention"] = attention_view(elem_id="insp-attention")
    gr.Markdown("**Logit lens**: the top next token read off the residual after each layer, at every slot looked "
                "at so far (hover a cell for its top 3); fill the table for the whole sequence",
                elem_classes=["g3-caption"])
    with gr.Row():
        w["lens_all"] = gr.Button(LENS_BUTTON, elem_id="insp-lens-all", size="sm", scale=0, min_width=240)
        w["lens_stop"] = gr.Button("stop filling", elem_id="insp-lens-stop", size="sm", scale=0, min_width=120)
        w["lens_status"] = gr.Markdown("one pass over the head per slot and layer: about 19 per slot",
                                       elem_id="insp-lens-status")
    w["lens_view"] = logit_lens_view(elem_id="insp-lens-view")
    with gr.Accordion("logit lens at the inspected slot as a table (exact probabilities)", open=False):
        w["lens_table"] = gr.Dataframe(
            headers=["after", "top-1", "p", "top-2", "p", "top-3", "p"], interactive=False, max_height=620,
            show_label=False, elem_id="insp-lens-table")
    with gr.Accordion("figures to download (PNG, SVG) and tables (CSV)", open=False, elem_id="insp-figures"):
        w["draw_figures"] = gr.Button("Draw this look's figures", elem_id="insp-draw-figures")
        w["downloads"] = gr.File(label="downloads: each figure as PNG and SVG, each table as CSV",
                                 file_count="multiple", interactive=False, elem_id="insp-downloads")
        w["mask"] = figure_slot("insp-mask", "The mask this layer used (its hook_mask)", 340)
        w["heatmap"] = figure_slot("insp-heatmap", "The layer's attention, the inspected query's row marked", 440)
        w["lens"] = figure_slot("insp-lens", "Logit lens (last column: the inspected slot)", 600)
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
