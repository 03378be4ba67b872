"""The side-by-side web app: `build_app()` returns the Gradio Blocks, `launch()` serves it.

The app imports the library and shows what it returns; it computes no model output itself.
"""

from __future__ import annotations

import os

from gemma3_lab.app.ui.registry import ROOT_ENV, ModelRegistry
from gemma3_lab.config import BUNDLED

DEFAULT_PORT = 7860
CONCURRENCY = 2  # requests that may run models at once (the rest wait in the queue)


def build_app(registry: ModelRegistry | None = None, concurrency: int = CONCURRENCY, max_queue: int = 32,
              max_prompt_tokens: int | None = None):
    """The Gradio Blocks of the app, queued. `registry` holds the (shared, read-only) models;
    by default the bundled names plus folders under $GEMMA3_LAB_MODELS_ROOT. Prompts longer
    than `max_prompt_tokens` (default $GEMMA3_LAB_MAX_PROMPT_TOKENS, else 4096) are refused."""
    # deferred: gradio (and the modules that build with it) only when the app is built
    import gradio as gr

    from gemma3_lab.app.ui.events import wire
    from gemma3_lab.app.ui.layout import build_page
    from gemma3_lab.app.ui.session import Session

    registry = registry or ModelRegistry()
    with gr.Blocks(title="gemma3_lab") as demo:
        session = gr.State(Session())  # deep-copied per tab into a fresh Session
        page = build_page(registry.choices())
        wire(page, registry, session, max_prompt_tokens, demo)
    demo.registry = registry
    demo.queue(default_concurrency_limit=concurrency, max_size=max_queue)
    return demo


def launch(demo=None, host: str = "127.0.0.1", port: int | None = None, preload: bool = True, **kwargs):
    """Serve on host:port (port from $GRADIO_SERVER_PORT, else 7860); the bundled model and
    its tokenizer are loaded first so the first request does not wait for them."""
    demo = demo or build_app()
    if preload:
        demo.registry.get(BUNDLED).model.tokenizer  # gl.load defers the 3 s tokenizer.json parse

    port = port or int(os.environ.get("GRADIO_SERVER_PORT", DEFAULT_PORT))
    return demo.launch(server_name=host, server_port=port, footer_links=["api"], **kwargs)


__all__ = ["build_app", "launch", "ModelRegistry", "ROOT_ENV"]
