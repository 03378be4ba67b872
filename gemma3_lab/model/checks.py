"""The model's own checks on what it is fed, in one place: token ids against the vocabulary and
the image inputs, and the sequence length against the context. `Gemma3Network.forward` runs them
on every call (so `forward`, `run_with_cache`, `run_with_hooks` and `generate` all get them);
`generate` and the app call `check_context` up front with the tokens they are about to add."""

from __future__ import annotations

import torch
from torch import Tensor

from gemma3_lab.config import Gemma3Config
from gemma3_lab.errors import Gemma3LabError


def check_context(config: Gemma3Config, n_tokens: int, what: str = "the sequence") -> None:
    """Refuse `n_tokens` positions beyond the model's context (max_position_embeddings)."""
    limit = config.text.max_position_embeddings
    if n_tokens > limit:
        raise Gemma3LabError(f"{what}: {n_tokens:,} tokens, more than {config.name or 'the model'}'s context of {limit:,} tokens")


def check_input_ids(config: Gemma3Config, input_ids: Tensor, past: int = 0, image_slots_given: bool = False) -> None:
    """(B, S) integer ids in 0..vocab-1, at least one per row, and past + S within the context.

    Image soft-token ids need pixels or `token_types` with them (`image_slots_given`): token types
    mark the slots as images on purpose, e.g. to study the image masks without a vision tower."""
    if not isinstance(input_ids, Tensor):
        raise Gemma3LabError(f"token ids must be a tensor, got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise Gemma3LabError(f"token ids must be integers, got a {str(input_ids.dtype).removeprefix('torch.')} tensor")
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise Gemma3LabError("token ids must be (batch, tokens) with at least one token, "
                             f"got shape {tuple(input_ids.shape)}")
    check_context(config, past + input_ids.shape[1])
    vocab = config.text.vocab_size
    soft = input_ids == config.image_token_id
    if past == 0 and bool(soft.any()) and not image_slots_given:  # decode steps carry no image slots
        raise Gemma3LabError(f"the ids hold the image soft token {config.image_token_id} (<image_soft_token>) but no "
                             "image was given; write <start_of_image> and pass images=")
    plain = input_ids.masked_fill(soft, 0) if config.is_multimodal or image_slots_given else input_ids
    lo, hi = int(plain.min()), int(plain.max())
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise Gemma3LabError(f"token id {bad} is outside the vocabulary of {config.name} (0..{vocab - 1})")

