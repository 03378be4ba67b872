"""Serve the gemma3_lab side-by-side explorer on http://127.0.0.1:7860 (GRADIO_SERVER_PORT
overrides the port) with the bundled Gemma 3 270M; local checkpoint folders are allowed
under $GEMMA3_LAB_MODELS_ROOT. No network is needed at run time."""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from gemma3_lab.app.ui import launch  # noqa: E402

if __name__ == "__main__":
    launch()
