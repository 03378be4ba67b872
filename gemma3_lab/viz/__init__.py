"""Visuals of Gemma 3 internals: attention masks (terminal, matplotlib, HTML), the mask atlas,
attention heatmaps, image-token placement and text→image attention, and the logit lens.

matplotlib is imported only inside the functions that draw figures;
`python scripts/gallery.py OUT_DIR` draws every one of them for a fixed example.
"""

from gemma3_lab.viz.atlas import mask_atlas
from gemma3_lab.viz.attention import attention_heatmap, head_grid, token_view
from gemma3_lab.viz.images import image_attention, overlay_array, picture_grid, token_boxes, token_strip
from gemma3_lab.viz.lens import logit_lens_grid, residual_norms, surprisal_bits, surprisal_html, surprisal_text
from gemma3_lab.viz.mask_visualizer import AttentionMaskVisualizer, MaskView

__all__ = [
    "AttentionMaskVisualizer", "MaskView", "mask_atlas", "attention_heatmap", "head_grid", "token_view",
    "token_strip", "picture_grid", "image_attention", "token_boxes", "overlay_array", "logit_lens_grid",
    "residual_norms", "surprisal_bits", "surprisal_text", "surprisal_html",
]
