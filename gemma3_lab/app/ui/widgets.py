"""Small widget helpers shared by the page's sections."""

from __future__ import annotations

import gradio as gr


def figure_slot(elem_id: str, caption: str, height: int | None = None) -> gr.Image:
    """A read-only image for a visualizer's figure, its caption above it (a Gradio label
    would sit on top of the figure's own title). PNG, so its download button saves the exact
    pixels shown (the default, WebP, is lossy)."""
    gr.Markdown(f"**{caption}**", elem_classes=["g3-caption"])
    return gr.Image(type="pil", interactive=False, show_label=False, elem_id=elem_id, height=height, format="png",
                    buttons=["download", "fullscreen"])


def head_choices(config) -> list[tuple[str, int]]:
    """A head selector's choices for `config`'s model: all heads (-1, their mean), then each."""
    return [("all heads", -1)] + [(f"head {h}", h) for h in range(config.text.num_heads)]
