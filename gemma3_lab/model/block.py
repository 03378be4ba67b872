"""One Gemma 3 decoder layer: sandwich-normed attention and gated-GELU MLP (docs/gemma3.md §2.5–2.6)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from gemma3_lab.config import AttentionType, TextConfig
from gemma3_lab.model.attention import Attention, MaskPlan
from gemma3_lab.model.hook_point import HookPoint
from gemma3_lab.model.kernels import Projection
from gemma3_lab.model.norm import RMSNorm


class MLP(nn.Module):
    """down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.gate_proj = Projection(cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = Projection(cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = Projection(cfg.intermediate_size, cfg.hidden_size)
        self.hook_pre = HookPoint()  # (B, S, I) gate_proj output, before the GELU
        self.hook_pre_linear = HookPoint()  # (B, S, I) up_proj output
        self.hook_post = HookPoint()  # (B, S, I) gelu(gate) * up, into down_proj

    def forward(self, x: Tensor) -> Tensor:
        gate = self.hook_pre(self.gate_proj(x))
        up = self.hook_pre_linear(self.up_proj(x))
        return self.down_proj(self.hook_post(F.gelu(gate, approximate="tanh") * up))


class Block(nn.Module):
    """
        x ─┬─ pre_attention_norm ─ attn ─ post_attention_norm ─(+)─┬─ pre_ffw_norm ─ mlp ─ post_ffw_norm ─(+)─▶
           └───────────────────────────────────────────────────────┘└───────────────────────────────────────┘
       resid_pre                                              resid_mid                                  resid_post
    """

    def __init__(self, cfg: TextConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.attention_type: AttentionType = cfg.layer_types[layer]
        self.pre_attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.pre_ffw_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.post_ffw_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hook_resid_pre = HookPoint()  # (B, S, D)
        self.hook_attn_out = HookPoint()  # (B, S, D) what attention adds to the residual
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()  # (B, S, D) what the MLP adds to the residual
        self.hook_resid_post = HookPoint()

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, plan: MaskPlan, cache=None) -> Tensor:
        x = self.hook_resid_pre(x)
        a = self.post_attention_norm(self.attn(self.pre_attention_norm(x), cos, sin, plan, cache))
        x = self.hook_resid_mid(x + self.hook_attn_out(a))
        m = self.post_ffw_norm(self.mlp(self.pre_ffw_norm(x)))
        return self.hook_resid_post(x + self.hook_mlp_out(m))

    def projections(self) -> tuple[nn.Module, ...]:
        """q, k, v, o, gate, up, down: the order in which the decode steps (compiled graph,
        native C step) are passed a layer's weights."""
        a, m = self.attn, self.mlp
        return a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj

    def norms(self) -> tuple[RMSNorm, ...]:
        """pre-attention, q, k, post-attention, pre-ffw, post-ffw: likewise."""
        a = self.attn
        return self.pre_attention_norm, a.q_norm, a.k_norm, self.post_attention_norm, self.pre_ffw_norm, self.post_ffw_norm
