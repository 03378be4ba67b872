"""Serve the gemma3_lab side-by-side explorer on http://127.0.0.1:7860 (GRADIO_SERVER_PORT
overrides the port) with the bundled Gemma 3 270M; local checkpoint folders are allowed
under $GEMMA3_LAB_MODELS_ROOT. No network is needed at run time."""

import argparse
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from gemma3_lab.app.ui import DEFAULT_PORT, ROOT_ENV, launch  # noqa: E402
from gemma3_lab.app.ui.registry import MEMORY_ENV  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python app.py",
        description="Serve the gemma3_lab explorer: two columns, each a model, a precision and an "
        "intervention, with the bundled Gemma 3 270M loaded first. No network is needed at run time.",
        epilog=f"""environment:
  GRADIO_SERVER_PORT           the port when --port is not given (default {DEFAULT_PORT})
  {ROOT_ENV:28s} a folder whose HF checkpoints and .gguf files the page may
                               open (unset: only gemma-3-270m and demo-multimodal)
  {MEMORY_ENV:28s} GB of loaded models kept in memory (default: half the RAM)
  GEMMA3_LAB_CACHE             where converted GGUF files are kept (~/.cache/gemma3_lab)""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=None, help=f"port (default $GRADIO_SERVER_PORT, else {DEFAULT_PORT})")
    return ap.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    launch(host=args.host, port=args.port)
