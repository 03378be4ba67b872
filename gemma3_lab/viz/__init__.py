"""Visuals of Gemma 3 internals: attention masks (terminal, matplotlib, HTML), the mask atlas,
attention heatmaps, image-token placement and text→image attention, and the logit lens.

matplotlib is imported only inside the functions that draw figures.
"""

from .mask_visualizer import AttentionMaskVisualizer, MaskView

__all__ = ["AttentionMaskVisualizer", "MaskView"]
