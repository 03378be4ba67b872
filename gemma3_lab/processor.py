"""Turns text, chat messages and images into `Inputs` for the model (spec §5)."""

from __future__ import annotations

import torch

from .chat import apply_chat_template, images_in_messages
from .config import Gemma3Config
from .inputs import Inputs


class Processor:
    def __init__(self, tokenizer, config: Gemma3Config) -> None:
        self.tokenizer = tokenizer
        self.config = config

    def __call__(self, text_or_messages, images=None, pan_and_scan: bool = False, add_bos: bool = True) -> Inputs:
        texts = self._texts(text_or_messages)
        if images is None and _is_messages(text_or_messages):
            images = images_in_messages(text_or_messages)
        if images:
            raise ValueError(f"{self.config.name}: image inputs need the vision processor")
        # a chat-rendered prompt already starts with <bos>: never add a second one
        rows = [self.tokenizer.encode(t, add_bos=add_bos and not t.startswith("<bos>")) for t in texts]
        return pad_left(rows, self.tokenizer.pad_id)

    def _texts(self, text_or_messages) -> list[str]:
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


def _is_messages(x) -> bool:
    return isinstance(x, (list, tuple)) and bool(x) and all(isinstance(m, dict) and "role" in m for m in x)


def pad_left(rows: list[list[int]], pad_id: int, token_types: list[list[int]] | None = None) -> Inputs:
    """Left-pad id rows into one batch (Gemma pads on the left so generation appends cleanly)."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    types = torch.zeros((len(rows), T), dtype=torch.long)
    for b, r in enumerate(rows):
        if r:
            ids[b, T - len(r):] = torch.tensor(r)
            mask[b, T - len(r):] = 1
            if token_types is not None:
                types[b, T - len(r):] = torch.tensor(token_types[b])
    return Inputs(ids, mask, types)
