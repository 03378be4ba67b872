"""The page's widgets: the shared prompt, one settings panel per column, the token strips,
the inspector and the atlas / image tabs. Only layout here; handlers live in `events`."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from ..load import BUNDLED
from .render import CLICK_JS, CSS, LEGEND, tokens_html
from .settings import DECODING, MAX_NEW_TOKENS

# the order of one column's settings in the `generate` endpoint, after prompt/chat/images;
# the API names are these prefixed with "a_" / "b_"
COLUMN_FIELDS = ("model", "decoding", "temperature", "top_k", "top_p", "seed", "max_new_tokens", "pan_and_scan")


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
    with gr.Row():
        s["decoding"] = gr.Radio(list(DECODING), value="greedy", label="decoding", elem_id=f"decoding-{name}")
        s["max_new_tokens"] = gr.Slider(1, MAX_NEW_TOKENS, value=24, step=1, label="max new tokens",
                                        elem_id=f"max-{name}")
    with gr.Row():
        s["temperature"] = gr.Number(1.0, label="temperature", min_width=80, elem_id=f"temperature-{name}")
        s["top_k"] = gr.Number(0, label="top-k (0 = off)", precision=0, min_width=80, elem_id=f"topk-{name}")
        s["top_p"] = gr.Number(1.0, label="top-p (1 = off)", min_width=80, elem_id=f"topp-{name}")
        s["seed"] = gr.Number(0, label="seed", precision=0, min_width=80, elem_id=f"seed-{name}")
    s["pan_and_scan"] = gr.Checkbox(False, label="pan-and-scan (crops of large images)", elem_id=f"pas-{name}")
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
            images = gr.File(label="images (optional)", file_count="multiple", type="filepath", elem_id="images",
                             height=110)
    with gr.Row():
        generate = gr.Button("Generate A and B", variant="primary", elem_id="generate")
        stop = gr.Button("Stop", variant="stop", elem_id="stop")
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
    with gr.Accordion("results as JSON (what the `generate` endpoint returns)", open=False):
        results = gr.JSON(elem_id="results")
    return Page(prompt, chat, images, columns, generate, stop, divergence, results, {})
