"""Turns text, chat messages and images into `Inputs` for the model: every `<start_of_image>`
becomes the image's 256 soft tokens (and its pan-and-scan crops'), with token types and the
place of every soft token recorded (docs/gemma3.md §5)."""

from __future__ import annotations

import torch

from gemma3_lab.config import Gemma3Config
from gemma3_lab.errors import Gemma3LabError
from gemma3_lab.prompt import images as img_ops
from gemma3_lab.prompt.chat import apply_chat_template, images_in_messages
from gemma3_lab.prompt.inputs import ImageSpan, Inputs

START_OF_IMAGE, END_OF_IMAGE = "<start_of_image>", "<end_of_image>"
# transformers' Gemma3Processor text around each image and its crops (PG3 `replace_image_token`)
BEFORE_ORIGINAL = "Here is the original image "
BEFORE_CROPS = " and here are some crops to help you see better "


class Processor:
    """`processor(text_or_messages, images=None, pan_and_scan=False) -> Inputs`.

    text_or_messages: a string, a list of strings (a batch), chat messages, or a list of
    conversations. images: one image, a list for one prompt, or one list per prompt (a flat
    list is split over the prompts by their `<start_of_image>` counts); each a path, bytes,
    a PIL image or a uint8 array. With chat messages and `images=None`, the payloads of the
    `{"type": "image", "image": ...}` items are used; each is read as transformers reads that
    kind of input (see `images.load_image`: paths are made upright and lose alpha, PIL images
    and arrays keep their orientation and have transparency composited over white).

    `image_backend` "pil" (the default) equals transformers' PIL Gemma 3 image processor bit for
    bit on every CPU; "torch" follows its torchvision processor, whose resize arithmetic depends
    on the CPU (see `images.resize`).
    """

    def __init__(self, tokenizer, config: Gemma3Config, image_backend: str = img_ops.DEFAULT_BACKEND) -> None:
        if image_backend not in img_ops.BACKENDS:
            raise Gemma3LabError(f"image_backend must be one of {img_ops.BACKENDS}, not {image_backend!r}")
        self.tokenizer = tokenizer
        self.config = config
        self.image_backend = image_backend
        self.pan_and_scan_min_crop = img_ops.PAS_MIN_CROP
        self.pan_and_scan_max_crops = img_ops.PAS_MAX_CROPS
        self.pan_and_scan_min_ratio = img_ops.PAS_MIN_RATIO

    def __call__(self, text_or_messages=None, images=None, pan_and_scan: bool = False, add_bos: bool = True) -> Inputs:
        texts = self._texts(text_or_messages, images)
        per_sample = self._images_per_sample(text_or_messages, texts, images)
        n_markers = [t.count(START_OF_IMAGE) for t in texts]
        if not any(per_sample) and (not self.config.is_multimodal or not any(n_markers)):
            # a chat-rendered prompt already starts with <bos>: never add a second one
            rows = [self._encode(t, add_bos) for t in texts]
            return pad_left(rows, self.tokenizer.pad_id)
        if not self.config.is_multimodal:
            raise ValueError(
                f"{self.config.name} is a text-only model: it cannot take images "
                "(load a multimodal Gemma 3 folder, or gl.load('demo-multimodal'))"
            )
        counts = [len(s) for s in per_sample]
        if counts != n_markers:
            where = ", ".join(f"prompt {b}: {m} marker(s), {c} image(s)"
                              for b, (m, c) in enumerate(zip(n_markers, counts)) if m != c)
            raise ValueError(
                f"every image needs one {START_OF_IMAGE} marker in the text (a {{'type': 'image'}} item in chat "
                f"messages) and every marker one image; {where}"
            )
        sources = [src for s in per_sample for src in s]
        pil = [img_ops.load_image(src) for src in sources]
        pieces = img_ops.preprocess(
            pil, pan_and_scan, self.config.vision.image_size, self.image_backend,
            self.pan_and_scan_min_crop, self.pan_and_scan_max_crops, self.pan_and_scan_min_ratio,
        )
        return self._assemble(texts, counts, pieces, pil, add_bos)

    # ------------------------------------------------------------------ prompt -> ids
    def _assemble(self, texts: list[str], counts: list[int], pieces: list[list[img_ops.Piece]], pil: list,
                  add_bos: bool) -> Inputs:
        cfg = self.config
        tok_id = self.tokenizer.image_token_id
        if tok_id is not None and tok_id != cfg.image_token_id:
            raise ValueError(f"the tokenizer's <image_soft_token> is {tok_id} but the model expects {cfg.image_token_id}")
        grid = int(cfg.mm_tokens_per_image**0.5)
        rows, spans = [], []
        first = 0
        for b, text in enumerate(texts):
            mine = pieces[first:first + counts[b]]
            ids = [self.tokenizer.bos_id] if add_bos and not text.startswith("<bos>") else []
            for seg in _expand(text, mine):
                if isinstance(seg, str):
                    ids += self.tokenizer.encode(seg, add_bos=False)
                    continue
                start = len(ids)
                ids += [cfg.image_token_id] * cfg.mm_tokens_per_image
                spans.append((b, seg, start))
            rows.append(ids)
            first += counts[b]
        pixel_rows = [p for img in pieces for p in img]
        index = {id(p): i for i, p in enumerate(pixel_rows)}
        # token types come from the ids (as transformers' create_mm_token_type_ids), so a soft
        # token typed into the text is caught by the count check below
        types = [[int(i == cfg.image_token_id) for i in r] for r in rows]
        n_soft = sum(map(sum, types))
        if n_soft != len(pixel_rows) * cfg.mm_tokens_per_image:
            raise ValueError(
                f"the prompt holds {n_soft} {cfg.image_token_id} (<image_soft_token>) ids but {len(pixel_rows)} "
                f"image(s)/crop(s) of {cfg.mm_tokens_per_image} tokens were given; do not write "
                "<image_soft_token> yourself, write <start_of_image>"
            )
        out = pad_left(rows, self.tokenizer.pad_id, types)
        T = out.input_ids.shape[1]
        out.image_spans = [
            ImageSpan(batch=b, image=p.image, crop=p.crop, start=s + T - len(rows[b]),
                      end=s + T - len(rows[b]) + cfg.mm_tokens_per_image, grid=grid, box=p.box,
                      pixel_index=index[id(p)])
            for b, p, s in spans
        ]
        out.pixel_values = torch.stack([p.pixels for p in pixel_rows])  # (n_images + crops, 3, S, S)
        out.images = pil
        return out

    def _encode(self, text: str, add_bos: bool) -> list[int]:
        return self.tokenizer.encode(text, add_bos=add_bos and not text.startswith("<bos>"))

    # ------------------------------------------------------------------ arguments
    def _texts(self, text_or_messages, images) -> list[str]:
        if text_or_messages is None or (isinstance(text_or_messages, str) and not text_or_messages and images):
            # images alone: one marker per image, as transformers' processor does
            n = len(_as_list(images)) if images is not None else 0
            if not n:
                raise ValueError("give a prompt, chat messages, or images")
            return [" ".join([START_OF_IMAGE] * n)]
        if isinstance(text_or_messages, str):
            return [text_or_messages]
        if _is_messages(text_or_messages):
            return [apply_chat_template(text_or_messages)]
        if isinstance(text_or_messages, (list, tuple)) and all(isinstance(t, str) for t in text_or_messages):
            if not text_or_messages:
                raise ValueError("empty batch: give at least one prompt")
            return list(text_or_messages)
        if isinstance(text_or_messages, (list, tuple)) and all(_is_messages(m) for m in text_or_messages):
            return [apply_chat_template(m) for m in text_or_messages]
        raise TypeError("expected a string, a list of strings, or chat messages (a list of {'role','content'} dicts)")

    def _images_per_sample(self, text_or_messages, texts: list[str], images) -> list[list]:
        if images is None:
            if _is_messages(text_or_messages):
                return [images_in_messages(text_or_messages)]
            if isinstance(text_or_messages, (list, tuple)) and text_or_messages and all(
                _is_messages(m) for m in text_or_messages
            ):
                return [images_in_messages(m) for m in text_or_messages]
            return [[] for _ in texts]
        images = _as_list(images)
        if len(texts) == 1:
            if len(images) == 1 and isinstance(images[0], (list, tuple)):
                return [list(images[0])]
            return [images]
        if all(isinstance(x, (list, tuple)) for x in images):
            if len(images) != len(texts):
                raise ValueError(f"{len(texts)} prompts but {len(images)} image lists: give one list per prompt")
            return [list(x) for x in images]
        # a flat list for a batch: share it out by each prompt's marker count
        counts = [t.count(START_OF_IMAGE) for t in texts]
        if sum(counts) != len(images):
            raise ValueError(
                f"the {len(texts)} prompts hold {sum(counts)} {START_OF_IMAGE} marker(s) in all "
                f"({', '.join(map(str, counts))}) but {len(images)} image(s) were given"
            )
        it = iter(images)
        return [[next(it) for _ in range(c)] for c in counts]


def _expand(text: str, images: list[list[img_ops.Piece]]) -> list:
    """Split a prompt into text and image pieces: each `<start_of_image>` becomes
    "\\n\\n<start_of_image>" + soft tokens + "<end_of_image>\\n\\n", and with crops
    "Here is the original image " ... " and here are some crops ..." (docs/gemma3.md §5.3)."""
    parts = text.split(START_OF_IMAGE)
    segs: list = [parts[0]]
    for img, after in zip(images, parts[1:]):
        full = [[f"\n\n{START_OF_IMAGE}", p, f"{END_OF_IMAGE}\n\n"] for p in img]
        if len(img) == 1:
            segs += full[0]
        else:
            segs += [BEFORE_ORIGINAL, *full[0], BEFORE_CROPS]
            for i, f in enumerate(full[1:]):
                segs += ([" "] if i else []) + f
        segs.append(after)
    # neighbouring text pieces are one tokenizer chunk: merge them so BPE sees what transformers sees
    merged: list = []
    for s in segs:
        if isinstance(s, str) and merged and isinstance(merged[-1], str):
            merged[-1] += s
        else:
            merged.append(s)
    return [s for s in merged if not (isinstance(s, str) and not s)]


def _as_list(images) -> list:
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def _is_messages(x) -> bool:
    return isinstance(x, (list, tuple)) and bool(x) and all(isinstance(m, dict) and "role" in m for m in x)


def pad_left(rows: list[list[int]], pad_id: int, token_types: list[list[int]] | None = None) -> Inputs:
    """Left-pad id rows into one batch (Gemma pads on the left so generation appends cleanly)."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    types = torch.zeros((len(rows), T), dtype=torch.long)
    for b, r in enumerate(rows):
        if r:
            ids[b, T - len(r):] = torch.tensor(r)
            mask[b, T - len(r):] = 1
            if token_types is not None:
                types[b, T - len(r):] = torch.tensor(token_types[b])
    return Inputs(ids, mask, types)
