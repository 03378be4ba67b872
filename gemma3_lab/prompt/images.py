"""Image inputs for Gemma 3: open (path, bytes, PIL, array) and convert to RGB as transformers
does for each kind, pan-and-scan, resize to 896×896 and normalize exactly as transformers' Gemma 3
image processor (docs/gemma3.md §5.1–5.2)."""

from __future__ import annotations

import io
import itertools
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from gemma3_lab.errors import Gemma3LabError

# Gemma 3's preprocessor_config.json: bilinear to 896, mean = std = 0.5, rescale 1/255
IMAGE_SIZE = 896
MEAN = STD = 0.5
# transformers' processor defaults for pan-and-scan (PG3 images_kwargs)
PAS_MIN_CROP = 256
PAS_MAX_CROPS = 4
PAS_MIN_RATIO = 1.2
# The decoding budget, checked on the header before any pixel is decoded. Every image becomes
# 896×896 anyway; 2**25 pixels (~5800×5800, ~100 MB as RGB) covers photos and screenshots, and is
# far below PIL's own bomb limit (2 × 89,478,485), which let a 165 KB 13000×13000 palette PNG take
# 5 GB to decode. Up to the budget we decode in full (identical to transformers); above it, JPEGs
# are decoded at a reduced scale (libjpeg's 1/2, 1/4, 1/8, via `Image.draft`) and anything else is
# refused with a clear message (PIL can shrink other formats only after decoding them in full).
MAX_PIXELS = 2**25
# "pil" is the default because it is the one proven equal to its reference (transformers' PIL
# processor, bit for bit) and it gives the same pixels on every CPU; see `resize` for "torch".
BACKENDS = ("pil", "torch")
DEFAULT_BACKEND = "pil"

_open_lock = threading.Lock()


@dataclass
class Piece:
    """One row of pixel_values: the whole image (crop 0) or a pan-and-scan crop."""

    image: int  # index of the source image
    crop: int
    box: tuple[int, int, int, int]  # (left, top, right, bottom) in the source image's pixels
    pixels: Tensor  # (3, S, S) float32, normalized


def load_image(source, name: str | None = None):
    """A PIL RGB image from a path, bytes, a PIL image, or an (H, W[, C]) uint8 array, read the
    way transformers' Gemma 3 processor reads that kind of input:

    ============  ===================================  ==================================
    input         transparency                         EXIF orientation
    ============  ===================================  ==================================
    path, bytes   alpha band dropped; a colour key     applied (the picture made upright)
                  (palette or tRNS) turned white
    PIL image     composited over white                not applied
    uint8 array   (H, W, 4): composited over white     none (arrays carry none)
    ============  ===================================  ==================================

    A path (or the bytes of a file) goes through transformers' `load_image` and then its
    `convert_to_rgb` (see `file_to_rgb`); a PIL image or an array only through `convert_to_rgb`,
    which composites transparency over white and expands palettes. (H, W) and (H, W, 1) arrays
    are grey (transformers refuses a bare (H, W) one). The image returned, kept in
    `Inputs.images`, is the one crop boxes refer to: upright after an EXIF turn. Raises
    `Gemma3LabError` naming the input when it is not an image. Images over `MAX_PIXELS` are
    refused, or for JPEG decoded at reduced scale (boxes then refer to the decoded image).
    """
    from PIL import Image

    if isinstance(source, Image.Image):
        label = name or f"PIL image {source.mode} {source.width}×{source.height}"
        _check_size(source, label)
        return _decoded(to_rgb, source, label)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        label = name or str(path)
        if isinstance(source, str) and source.startswith(("http://", "https://")):
            raise Gemma3LabError(f"{source}: URLs are not fetched (no network); download the image and pass its path")
        if not path.is_file():
            raise FileNotFoundError(f"{label}: no such image file")
        if path.stat().st_size == 0:
            raise Gemma3LabError(f"{label}: the file is empty (0 bytes), not an image")
        return _decoded(file_to_rgb, _open(path, label), label)
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or f"<{len(source)} bytes>"
        if len(source) == 0:
            raise Gemma3LabError(f"{label}: empty bytes, not an image")
        return _decoded(file_to_rgb, _open(io.BytesIO(bytes(source)), label), label)
    if isinstance(source, (np.ndarray, Tensor)):
        arr = source.detach().cpu().numpy() if isinstance(source, Tensor) else source
        label = name or f"array {tuple(arr.shape)}"
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4)):
            raise Gemma3LabError(f"{label}: arrays must be uint8 (H, W) or (H, W, 1|3|4), got {arr.dtype} {arr.shape}")
        img = Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr)
        return _decoded(to_rgb, img, label)
    raise TypeError(f"cannot read an image from {type(source).__name__}: give a path, bytes, a PIL image or a uint8 array")


def _decoded(convert, img, label: str):
    try:
        return convert(img)
    except OSError as e:  # truncated or corrupt data surfaces only when the pixels are decoded
        raise Gemma3LabError(f"{label}: could not decode the image ({e})") from None


def _open(fp, label: str):
    from PIL import Image, UnidentifiedImageError

    # Image.open reads only the header, but raises for "bombs" before we can look at the size;
    # lift PIL's global limit for the header read and apply ours below instead.
    with _open_lock:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            img = Image.open(fp)
        except UnidentifiedImageError:
            raise Gemma3LabError(f"{label}: not an image file PIL can read") from None
        except OSError as e:
            raise Gemma3LabError(f"{label}: could not open the image ({e})") from None
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    w, h = img.size
    if w * h > MAX_PIXELS and img.format == "JPEG":
        # decode at the mildest libjpeg scale that fits the budget, then check again: 1/8 is the
        # most draft can do
        scale = next((k for k in (2, 4, 8) if math.ceil(w / k) * math.ceil(h / k) <= MAX_PIXELS), 8)
        img.draft("RGB", (math.ceil(w / scale), math.ceil(h / scale)))
    _check_size(img, label)
    try:  # decode now, within the budget: a corrupt file fails here, by name
        img.load()
    except Exception as e:  # PIL's decoders raise OSError, ValueError, SyntaxError, EOFError... on bad bytes
        raise Gemma3LabError(f"{label}: could not decode the image ({e})") from None
    return img


def _check_size(img, label: str) -> None:
    w, h = img.size
    if w == 0 or h == 0:
        raise Gemma3LabError(f"{label}: the image has no pixels ({w}×{h})")
    if w * h > MAX_PIXELS:
        raise Gemma3LabError(
            f"{label}: {w}×{h} is {w * h / 1e6:.0f} megapixels, over the {MAX_PIXELS / 1e6:.0f} MP decoding budget "
            "(checked before decoding, so an upload cannot take gigabytes). Downscale it first; JPEG files this "
            "large are decoded at reduced scale automatically."
        )


def to_rgb(img):
    """RGB with any transparency (alpha band, or a palette/tRNS transparent colour) over white,
    as transformers' `convert_to_rgb` treats PIL images and arrays."""
    from PIL import Image

    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def file_to_rgb(img):
    """An image opened from a file, upright and RGB, as transformers makes it: its `load_image`
    applies the EXIF orientation and calls `convert("RGB")`, which drops an alpha band (no
    compositing: the colour stored under transparent pixels shows); the processor then runs
    `convert_to_rgb` on the result, where a transparent colour key that `convert` carried over
    (palette or tRNS transparency) still turns the pixels of that colour white."""
    from PIL import ImageOps

    return to_rgb(ImageOps.exif_transpose(img).convert("RGB"))


def to_uint8_chw(img) -> Tensor:
    """(3, H, W) uint8 from a PIL RGB image."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def pan_and_scan_boxes(
    width: int, height: int, min_crop: int = PAS_MIN_CROP, max_crops: int = PAS_MAX_CROPS,
    min_ratio: float = PAS_MIN_RATIO,
) -> list[tuple[int, int, int, int]]:
    """Crop boxes (left, top, right, bottom) for an image, or [] when it is not elongated enough.

    transformers' arithmetic (IG3 `pan_and_scan_batched`): 2..max_crops crops along the long
    side, about one per aspect-ratio unit, each at least `min_crop` pixels; crops have size
    ceil(side / n), so the last one can be narrower (the slice clamps at the edge).
    """
    if width >= height:
        if width / height < min_ratio:
            return []
        n_w = int(math.floor(width / height + 0.5))  # half rounds up
        n_w = min(max_crops, max(2, min(int(math.floor(width / min_crop)), n_w)))
        n_h = 1
    else:
        if height / width < min_ratio:
            return []
        n_h = int(math.floor(height / width + 0.5))
        n_h = min(max_crops, max(2, min(int(math.floor(height / min_crop)), n_h)))
        n_w = 1
    cw, ch = int(math.ceil(width / n_w)), int(math.ceil(height / n_h))
    if min(cw, ch) < min_crop:
        return []
    return [
        (x, y, min(x + cw, width), min(y + ch, height))
        for y, x in itertools.product([ch * i for i in range(n_h)], [cw * j for j in range(n_w)])
    ]


def resize(img: Tensor, size: int = IMAGE_SIZE, backend: str = DEFAULT_BACKEND) -> Tensor:
    """(3, H, W) uint8 -> (3, size, size) uint8, bilinear with antialiasing, aspect ratio ignored.

    "pil" (the default) is PIL's BILINEAR, as transformers' PIL Gemma 3 processor
    (`Gemma3ImageProcessorPil`, what `Gemma3ImageProcessor` falls back to without torchvision):
    equal to it bit for bit, and the same on every CPU (Pillow's integer arithmetic).

    "torch" follows torchvision's `resize` on uint8 CPU tensors, which transformers' default
    (torchvision) processor calls. torchvision picks its arithmetic from the CPU: when
    `torch.backends.cpu.get_cpu_capability()` names "AVX2" it passes the uint8 tensor to
    `interpolate` (a fixed-point kernel whose bytes are the same on every CPU), otherwise
    ("AVX512", "DEFAULT", ...) it resizes in float32 and rounds. Its pixels, like torchvision's,
    therefore depend on the machine: they differ from "pil" by one level on ~3% of values on
    an AVX2 CPU and on ~19% on an AVX-512 one (real photographs). It is not tested against
    torchvision, which does not install beside the pinned CPU torch.
    """
    if backend == "pil":
        from PIL import Image

        pil = Image.fromarray(img.permute(1, 2, 0).numpy()).resize((size, size), resample=Image.BILINEAR)
        return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)
    if backend != "torch":
        raise Gemma3LabError(f"resize backend must be one of {BACKENDS}, not {backend!r}")
    if tuple(img.shape[-2:]) == (size, size):
        return img  # torchvision returns the input untouched
    x = img[None]  # (1, 3, H, W), strides kept as the caller's (crops are views)
    if "AVX2" in torch.backends.cpu.get_cpu_capability():  # torchvision `_do_native_uint8_resize_on_cpu`
        out = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    else:
        out = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out = out.round_().to(torch.uint8)
    return out[0]


def normalize(img: Tensor, backend: str = DEFAULT_BACKEND) -> Tensor:
    """(3, S, S) uint8 -> float32 in [-1, 1]: (x / 255 - 0.5) / 0.5.

    "pil" rescales in float64 and then normalizes in float32 like transformers' PIL backend;
    "torch" fuses it as (x - 127.5) / 127.5 like the torchvision one (they differ by < 2e-7).
    """
    if backend == "pil":
        x = (img.numpy().astype(np.float64) * (1 / 255)).astype(np.float32)
        return torch.from_numpy((x - np.float32(MEAN)) / np.float32(STD))
    m = MEAN * 255.0
    return (img.float() - m) / (STD * 255.0)


def preprocess(
    images: list, pan_and_scan: bool = False, size: int = IMAGE_SIZE, backend: str = DEFAULT_BACKEND,
    min_crop: int = PAS_MIN_CROP, max_crops: int = PAS_MAX_CROPS, min_ratio: float = PAS_MIN_RATIO,
) -> list[list[Piece]]:
    """For each RGB PIL image: [whole image, crop 1, ..., crop k], each resized and normalized.

    Pan-and-scan works on the original pixels; the whole image and every crop are then
    resized to size×size independently (docs/gemma3.md §5.2).
    """
    out = []
    for i, img in enumerate(images):
        u8 = to_uint8_chw(img)  # (3, H, W)
        H, W = u8.shape[-2:]
        boxes = [(0, 0, W, H)]
        if pan_and_scan:
            boxes += pan_and_scan_boxes(W, H, min_crop, max_crops, min_ratio)
        pieces = []
        for c, (l, t, r, b) in enumerate(boxes):
            crop = u8[:, t:b, l:r]  # (3, h, w) view
            pieces.append(Piece(i, c, (l, t, r, b), normalize(resize(crop, size, backend), backend)))
        out.append(pieces)
    return out
