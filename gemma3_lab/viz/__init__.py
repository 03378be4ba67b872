"""Visuals of Gemma 3 internals: attention masks (terminal, matplotlib, HTML), the mask atlas,
attention heatmaps, image-token placement and text→image attention, and the logit lens.

matplotlib is imported only inside the functions that draw figures;
`python -m gemma3_lab.viz.gallery OUT_DIR` draws every one of them for a fixed example.
"""

from .atlas import mask_atlas
from .attention import attention_heatmap, head_grid, token_view
from .images import image_attention, overlay_array, picture_grid, token_boxes, token_strip
from .lens import logit_lens_grid, residual_norms, surprisal_bits, surprisal_html, surprisal_text
from .mask_visualizer import AttentionMaskVisualizer, MaskView

__all__ = [
    "AttentionMaskVisualizer", "MaskView", "mask_atlas", "attention_heatmap", "head_grid", "token_view",
    "token_strip", "picture_grid", "image_attention", "token_boxes", "overlay_array", "logit_lens_grid",
    "residual_norms", "surprisal_bits", "surprisal_text", "surprisal_html",
]
