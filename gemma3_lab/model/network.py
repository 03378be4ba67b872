"""The whole Gemma 3 network: scaled embedding, decoder blocks, final norm, tied head,
and (for multimodal checkpoints) image features scattered in at the soft-token slots."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gemma3_lab.config import AttentionType, Gemma3Config
from gemma3_lab.model import kernels
from gemma3_lab.model.attention import MaskPlan, use_attention_path
from gemma3_lab.model.block import Block
from gemma3_lab.model.checks import check_input_ids
from gemma3_lab.model.hook_point import HookPoint, name_hook_points
from gemma3_lab.model.kv_cache import KVCache
from gemma3_lab.model.masks import image_block_ids
from gemma3_lab.model.norm import RMSNorm
from gemma3_lab.model.rope import inv_freq, rope_tables
from gemma3_lab.model.vision import Projector, VisionTower


@dataclass
class ModelOutput:
    logits: Tensor  # (B, S', V) in the model dtype; S' = positions asked for
    cache: KVCache | None = None
    hidden: Tensor | None = None  # (B, S, D) after the final norm, when asked for


class Gemma3Network(nn.Module):
    """Pure network; the user-facing `Gemma3` adds tokenizer, hooks API and generation."""

    def __init__(self, config: Gemma3Config) -> None:
        super().__init__()
        self.config = config
        cfg = config.text
        self.embed = _embedding(cfg.vocab_size, cfg.hidden_size, cfg.pad_token_id)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Gemma 3 ties the head to the unscaled embedding; an untied config gets its own
        self.lm_head = None if cfg.tie_word_embeddings else kernels.Projection(cfg.hidden_size, cfg.vocab_size)
        self.vision, self.projector = _vision_parts(config)
        # generate's decode steps take `fast_decode.decode_step` (fewer ops, packed kernels)
        # whenever nothing is hooked; False: always the plain, instrumented forward
        self.fast_decode = True
        self.init_buffers()
        self.hook_embed = HookPoint()  # (B, S, D) embedding rows, before the sqrt(D) scale
        self.hook_embed_scaled = HookPoint()  # (B, S, D) after the scale
        self.hook_image_features = HookPoint()  # (n_images, 256, D) projector output
        self.hook_inputs_embeds = HookPoint()  # (B, S, D) what enters block 0 (images scattered in)
        self.hook_logits = HookPoint()  # (B, S', V)
        self.hook_slots = HookPoint()  # (S,) long: the cache slot (absolute position) of each query
        self.hook_points = name_hook_points(self)

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """RoPE frequencies: float32 always (as transformers), rebuilt after a meta-device build."""
        cfg = self.config.text
        for t in AttentionType:
            freqs = inv_freq(cfg.rope_for(t), cfg.head_dim)
            self.register_buffer(f"inv_freq_{t.short}", freqs.to(device) if device else freqs, persistent=False)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        token_types: Tensor | None = None,
        pixel_values: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int | None = None,
        return_hidden: bool = False,
    ) -> ModelOutput:
        """input_ids (B, S). attention_mask (B, S) or (B, past+S), 0 on padding.

        token_types (B, S), 1 on image soft tokens, makes each image's tokens attend to each
        other both ways. logits_to_keep=k computes the head on the last k positions only.
        """
        cfg = self.config.text
        past = cache.length if cache is not None else 0
        check_input_ids(self.config, input_ids, past, pixel_values is not None or token_types is not None)
        B, S = input_ids.shape
        dev = input_ids.device
        # first, so hooks later in this forward can ask where its queries sit (decode steps)
        q_slots = self.hook_slots(torch.arange(past, past + S, device=dev))
        key_valid = _key_valid(attention_mask, cache, B, past, S, dev)
        block_ids = _block_ids(token_types, cache, B, past, S, dev)
        if position_ids is None:
            position_ids = _positions(key_valid, cache, B, past, S, dev)

        h = self._embed(input_ids, pixel_values)
        cos_sin = {t: rope_tables(position_ids, getattr(self, f"inv_freq_{t.short}"), h.dtype) for t in set(cfg.layer_types)}
        plans = {
            t: MaskPlan(
                q_slots,
                cache.kv_slots(t, S).to(dev) if cache is not None else q_slots,
                cfg.window_for(t),
                block_ids,
                key_valid,
            )
            for t in set(cfg.layer_types)
        }
        for i, block in enumerate(self.blocks):
            t = block.attention_type
            h = block(h, *cos_sin[t], plans[t], cache.layers[i] if cache is not None else None)
        if cache is not None:
            cache.advance(S, key_valid, block_ids, position_ids)
        h = self.final_norm(h)
        kept = h if not logits_to_keep else h[:, -logits_to_keep:]
        logits = self.hook_logits(self._unembed(kept))
        return ModelOutput(logits, cache, h if return_hidden else None)

    def _embed(self, input_ids: Tensor, pixel_values: Tensor | None) -> Tensor:
        cfg = self.config
        image_slots = input_ids == cfg.image_token_id
        ids = input_ids
        if cfg.image_token_id >= cfg.text.vocab_size:
            # 262144-row vocabularies have no row for the soft token: look up <pad> there
            # instead; the row is overwritten by image features anyway (docs/gemma3.md §4.5)
            ids = input_ids.masked_fill(image_slots, cfg.text.pad_token_id)
        e = self.hook_embed(self.embed(ids))
        h = self.hook_embed_scaled(e * embed_scale(cfg.text, e.dtype))
        if pixel_values is not None:
            if self.vision is None:
                raise ValueError(f"{cfg.name} is a text-only model: it cannot take images")
            feats = self.hook_image_features(self.projector(self.vision(pixel_values.to(h.dtype))))
            n_slots = int(image_slots.sum())
            if n_slots != feats.shape[0] * feats.shape[1]:
                raise ValueError(
                    f"{n_slots} image-token slots in the prompt but {feats.shape[0]} image(s) of "
                    f"{feats.shape[1]} tokens each were given"
                )
            # features are not scaled by sqrt(D); they fill the slots in (batch, seq) order
            h = h.masked_scatter(image_slots[..., None], feats.to(h.dtype))
        return self.hook_inputs_embeds(h)

    def _unembed(self, h: Tensor, vocab: slice | None = None) -> Tensor:
        """Logits of h; `vocab` computes a slice of the vocabulary only (top-k in one pass over
        the head, whatever the number of positions)."""
        head = self.lm_head
        if vocab is None and head is not None and not isinstance(head, nn.Linear):
            logits = head(h)  # a quantized head brings its own kernel
        elif vocab is not None and hasattr(head, "rows"):  # a quantized table: those rows only
            logits = kernels.rows_times(h, head.rows(vocab))
        else:
            w = head.weight if head is not None else self.embed.weight
            logits = kernels.rows_times(h, w if vocab is None else w[vocab])
        return self.softcap(logits)

    @property
    def final_softcap(self) -> float | None:
        """The final logit softcap, or None where none applies."""
        # transformers applies final softcapping in Gemma3ForCausalLM only, never in the
        # multimodal model; no released Gemma 3 sets it
        return self.config.text.final_logit_softcapping if self.vision is None else None

    def softcap(self, logits: Tensor) -> Tensor:
        """The final logit softcapping, where the config asks for it."""
        return soft_cap(logits, self.final_softcap)

    # ------------------------------------------------------------------ paths
    def set_attention_path(self, path: str) -> None:
        """"sdpa" (fast; explicit only where a pattern is hooked) or "explicit" everywhere."""
        use_attention_path(self.blocks, path)
        if self.vision is not None:
            self.vision.set_attention_path(path)


def _vision_parts(config: Gemma3Config):
    if config.vision is None:
        return None, None

    return VisionTower(config.vision), Projector(config)


def _key_valid(attention_mask: Tensor | None, cache: KVCache | None, B: int, past: int, S: int, dev) -> Tensor | None:
    """(B, past+S) bool over all slots, False on padding; None when nothing is padding."""
    if attention_mask is not None and attention_mask.shape[1] == past + S:
        full = attention_mask.bool()
    else:
        old = cache.key_valid if cache is not None and cache.key_valid is not None else None
        old = old if old is not None else torch.ones(B, past, dtype=torch.bool, device=dev)
        new = attention_mask[:, -S:].bool() if attention_mask is not None else torch.ones(B, S, dtype=torch.bool, device=dev)
        full = torch.cat((old, new), dim=1)
    return None if bool(full.all()) else full


def _block_ids(token_types: Tensor | None, cache: KVCache | None, B: int, past: int, S: int, dev) -> Tensor | None:
    """(B, past+S) image block id of every slot (-1 for text), or None without images."""
    old = cache.block_ids if cache is not None else None
    has_images = token_types is not None and bool((token_types[:, -S:] == 1).any())
    if old is None and not has_images:
        return None
    if old is None:
        old = torch.full((B, past), -1, device=dev)
    if not has_images:  # e.g. decode steps after an image prompt: plain causal text
        return torch.cat((old, torch.full((B, S), -1, device=dev)), dim=1)
    new = image_block_ids(token_types[:, -S:])
    shift = int(old.max()) + 1 if old.numel() else 0  # keep block ids unique across calls
    return torch.cat((old, torch.where(new >= 0, new + max(shift, 0), new)), dim=1)


def _positions(key_valid: Tensor | None, cache: KVCache | None, B: int, past: int, S: int, dev) -> Tensor:
    """RoPE positions: count of real tokens before each slot (pads get 0), as generate does."""
    if cache is not None and cache.next_position is not None:
        return cache.next_position[:, None] + torch.arange(S, device=dev)[None]
    if key_valid is None:
        return torch.arange(past, past + S, device=dev)[None].expand(B, S)
    pos = key_valid.long().cumsum(-1) - 1
    return pos.clamp_min(0)[:, -S:]


def embed_scale(config, dtype: torch.dtype) -> Tensor:
    """sqrt(D), the factor on every embedding row, rounded to the table's dtype before the
    multiply (bf16: 25.25 for D=640), as transformers does."""
    return torch.tensor(config.embed_scale, dtype=dtype)


def soft_cap(logits: Tensor, cap: float | None) -> Tensor:
    """cap * tanh(logits / cap), or the logits as they are where `cap` is None."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


def _embedding(vocab: int, dim: int, pad: int | None) -> nn.Embedding:
    """nn.Embedding, initialised as nn.Embedding does, except on the meta device: there its
    normal_() goes through torch._refs, whose first use imports torch._dynamo (3 s of a warm load)."""
    weight = torch.empty(vocab, dim)
    if not weight.is_meta:
        with torch.no_grad():
            weight.normal_()
            if pad is not None:
                weight[pad].zero_()
    return nn.Embedding(vocab, dim, padding_idx=pad, _weight=nn.Parameter(weight))
