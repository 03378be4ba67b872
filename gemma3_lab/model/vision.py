"""The SigLIP vision tower and the Gemma 3 projector that turn an 896×896 image into 256
soft tokens in the decoder's width (docs/gemma3.md §4.1–4.4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gemma3_lab.config import Gemma3Config, VisionConfig
from gemma3_lab.model.attention import use_attention_path
from gemma3_lab.model.hook_point import HookPoint
from gemma3_lab.model.norm import RMSNorm


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention over all patches of one image, no mask, biased projections.

    SDPA when nothing is captured; the explicit softmax path (taken when `hook_pattern` or
    `hook_attn_scores` is hooked, or `explicit` is set) mirrors transformers' eager path.
    A full-size pattern is (N_img, 16, 4096, 4096): 1 GiB per image per layer in float32.
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        C = cfg.hidden_size
        self.n_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        if self.n_heads * self.head_dim != C:
            raise ValueError(f"vision hidden_size {C} is not a multiple of num_heads {self.n_heads}")
        self.scale = self.head_dim**-0.5  # SigLIP scales by head_dim, unlike the decoder
        self.q_proj = nn.Linear(C, C)
        self.k_proj = nn.Linear(C, C)
        self.v_proj = nn.Linear(C, C)
        self.out_proj = nn.Linear(C, C)
        self.explicit = False
        self.hook_q = HookPoint()  # (B, P, N, H)
        self.hook_k = HookPoint()  # (B, P, N, H)
        self.hook_v = HookPoint()  # (B, P, N, H)
        self.hook_attn_scores = HookPoint()  # (B, N, P, P) scaled scores
        self.hook_pattern = HookPoint()  # (B, N, P, P) softmax
        self.hook_z = HookPoint()  # (B, P, N, H) per-head output before out_proj

    def forward(self, x: Tensor) -> Tensor:
        B, P, C = x.shape
        N, H = self.n_heads, self.head_dim
        q = self.hook_q(self.q_proj(x).view(B, P, N, H)).transpose(1, 2)  # (B, N, P, H)
        k = self.hook_k(self.k_proj(x).view(B, P, N, H)).transpose(1, 2)
        v = self.hook_v(self.v_proj(x).view(B, P, N, H)).transpose(1, 2)
        if self.explicit or self.hook_pattern.active or self.hook_attn_scores.active:
            scores = self.hook_attn_scores(torch.matmul(q, k.transpose(2, 3)) * self.scale)  # (B, N, P, P)
            # float32 softmax cast back to the model dtype, as transformers' eager path
            pattern = self.hook_pattern(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype))
            z = torch.matmul(pattern, v)  # (B, N, P, H)
        else:
            z = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        z = self.hook_z(z.transpose(1, 2))  # (B, P, N, H)
        return self.out_proj(z.reshape(B, P, C))


class VisionMLP(nn.Module):
    """fc2(gelu_tanh(fc1(x))), both linears biased."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.hook_post = HookPoint()  # (B, P, I) after the GELU

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.hook_post(F.gelu(self.fc1(x), approximate="tanh")))


class VisionBlock(nn.Module):
    """
        x ─┬─ layer_norm1 ─ attn ─(+)─┬─ layer_norm2 ─ mlp ─(+)─▶
           └──────────────────────┘   └─────────────────────┘
       resid_pre              resid_mid                 resid_post
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)
        self.hook_resid_pre = HookPoint()  # (B, P, C)
        self.hook_attn_out = HookPoint()  # (B, P, C)
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()  # (B, P, C)
        self.hook_resid_post = HookPoint()

    def forward(self, x: Tensor) -> Tensor:
        x = self.hook_resid_pre(x)
        x = self.hook_resid_mid(x + self.hook_attn_out(self.attn(self.layer_norm1(x))))
        return self.hook_resid_post(x + self.hook_mlp_out(self.mlp(self.layer_norm2(x))))


class VisionTower(nn.Module):
    """SigLIP encoder: 14×14 conv patches (row-major, patch = row·64 + col), learned absolute
    positions, pre-LN blocks, a final LayerNorm. No CLS token, no pooling head (docs/gemma3.md §4.3)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.config = cfg
        C, p = cfg.hidden_size, cfg.patch_size
        self.patch_embedding = nn.Conv2d(cfg.num_channels, C, kernel_size=p, stride=p)
        self.position_embedding = nn.Embedding(cfg.num_patches, C)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_layers))
        self.post_layernorm = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.hook_patch_embed = HookPoint()  # (B, P, C) conv output, before positions
        self.hook_embed = HookPoint()  # (B, P, C) with positions: what enters block 0
        self.hook_post_layernorm = HookPoint()  # (B, P, C) the tower's output

    def forward(self, pixel_values: Tensor) -> Tensor:
        """pixel_values (B, 3, S, S) -> (B, P, C) with P = (S / patch)²."""
        cfg = self.config
        if pixel_values.shape[-2:] != (cfg.image_size, cfg.image_size):
            raise ValueError(
                f"pixel_values are {tuple(pixel_values.shape[-2:])} but this tower takes "
                f"{cfg.image_size}×{cfg.image_size} images (the processor resizes them)"
            )
        w = self.patch_embedding.weight
        x = self.patch_embedding(pixel_values.to(w.dtype))  # (B, C, 64, 64)
        x = self.hook_patch_embed(x.flatten(2).transpose(1, 2))  # (B, P, C), P = row * 64 + col
        x = self.hook_embed(x + self.position_embedding.weight[None])
        for block in self.blocks:
            x = block(x)
        return self.hook_post_layernorm(self.post_layernorm(x))

    def set_attention_path(self, path: str) -> None:
        use_attention_path(self.blocks, path)


class Projector(nn.Module):
    """Average-pool the patch grid to a √256 = 16 square, RMSNorm (1 + w), then `x @ W`
    into the decoder's width. W is a bare (C, D) matrix, not an nn.Linear (docs/gemma3.md §4.4)."""

    def __init__(self, config: Gemma3Config) -> None:
        super().__init__()
        vc = config.vision
        self.patches_per_side = vc.patches_per_side
        self.tokens_per_side = int(config.mm_tokens_per_image**0.5)
        if self.tokens_per_side**2 != config.mm_tokens_per_image or self.patches_per_side % self.tokens_per_side:
            raise ValueError(
                f"{config.mm_tokens_per_image} tokens per image do not tile a "
                f"{self.patches_per_side}×{self.patches_per_side} patch grid"
            )
        self.kernel = self.patches_per_side // self.tokens_per_side
        self.mm_soft_emb_norm = RMSNorm(vc.hidden_size, vc.layer_norm_eps)
        self.mm_input_projection_weight = nn.Parameter(torch.zeros(vc.hidden_size, config.text.hidden_size))
        self.hook_pooled = HookPoint()  # (B, 256, C) mean of each kernel×kernel patch block
        self.hook_out = HookPoint()  # (B, 256, D) the image's soft-token embeddings

    def forward(self, patches: Tensor) -> Tensor:
        """patches (B, P, C) -> (B, 256, D); token t comes from grid cell divmod(t, 16)."""
        B, P, C = patches.shape
        g = self.patches_per_side
        x = patches.transpose(1, 2).reshape(B, C, g, g).contiguous()  # (B, C, 64, 64)
        x = F.avg_pool2d(x, kernel_size=self.kernel, stride=self.kernel)  # (B, C, 16, 16)
        x = self.hook_pooled(x.flatten(2).transpose(1, 2))  # (B, 256, C), token = row * 16 + col
        x = torch.matmul(self.mm_soft_emb_norm(x), self.mm_input_projection_weight)
        return self.hook_out(x.type_as(patches))
