"""What the processor hands the model: token ids, padding, token types, pixels, and
where every image's soft tokens sit in the sequence."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class ImageSpan:
    """The soft tokens of one image (crop 0) or one pan-and-scan crop (crop >= 1).

    Slots [start, end) of row `batch`; token t of the span comes from cell
    (row, col) = divmod(t, grid) of the crop's grid×grid pooled patch grid.
    `box` is the crop's (left, top, right, bottom) in the pixels of `Inputs.images[image]` (the
    picture as decoded: the original, except a huge JPEG decoded at reduced scale).
    """

    batch: int
    image: int  # index among all images of the batch, in prompt order
    crop: int
    start: int
    end: int
    grid: int = 16
    box: tuple[int, int, int, int] | None = None
    pixel_index: int = 0  # row of pixel_values that feeds this span

    def cell(self, slot: int) -> tuple[int, int]:
        return divmod(slot - self.start, self.grid)


@dataclass
class Inputs:
    input_ids: Tensor  # (B, T) long
    attention_mask: Tensor  # (B, T) long, 0 on (left) padding
    token_types: Tensor  # (B, T) long, 1 on image soft tokens
    pixel_values: Tensor | None = None  # (n_images + crops, 3, S, S) float32
    image_spans: list[ImageSpan] = field(default_factory=list)
    images: list = field(default_factory=list)  # the PIL images, original size, in order

    @property
    def shape(self) -> torch.Size:
        return self.input_ids.shape

    def to(self, device) -> "Inputs":
        pv = self.pixel_values.to(device) if self.pixel_values is not None else None
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            token_types=self.token_types.to(device),
            pixel_values=pv,
        )

    def model_kwargs(self) -> dict:
        return {
            "attention_mask": self.attention_mask,
            "token_types": self.token_types,
            "pixel_values": self.pixel_values,
        }
