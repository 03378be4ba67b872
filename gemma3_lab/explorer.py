"""`Gemma3`: the network plus its tokenizer, processor, hook API and generation — the object
`gl.load()` returns and every notebook, visualizer and the app work with."""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from gemma3_lab.config import Gemma3Config
from gemma3_lab.errors import Gemma3LabError
from gemma3_lab.generate import generate
from gemma3_lab.instrument.hooks import HookedMixin
from gemma3_lab.instrument.tl_compat import TransformerLensMixin, per_token_loss
from gemma3_lab.loading.quantize import weight_counts
from gemma3_lab.model import compiled_decode
from gemma3_lab.model.network import Gemma3Network
from gemma3_lab.prompt.chat import apply_chat_template
from gemma3_lab.prompt.inputs import Inputs
from gemma3_lab.prompt.processor import Processor

_RETURN_TYPES = ("output", "logits", "loss", "both", None)


class Gemma3(HookedMixin, TransformerLensMixin, Gemma3Network):
    def __init__(self, config: Gemma3Config, tokenizer=None) -> None:
        super().__init__(config)
        self.tokenizer = tokenizer
        self.source = ""  # the folder or .gguf the weights came from (`verify` reads it); a description for the demo

    @property
    def tokenizer(self):
        """The Tokenizer, or None. `gl.load` defers parsing tokenizer.json to this first use:
        the `tokenizers` library takes 2-3 s over Gemma's 262k pieces and 515k merges, five times
        longer than mapping the 270M's weights, and a model run on token ids never needs it."""
        tok = self.__dict__.get("_tokenizer")
        if isinstance(tok, partial):
            tok = self.__dict__["_tokenizer"] = tok()
        return tok

    @tokenizer.setter
    def tokenizer(self, value) -> None:  # a Tokenizer, None, or a functools.partial that makes one
        self.__dict__["_tokenizer"] = value

    # ------------------------------------------------------------------ inputs
    @property
    def processor(self) -> Processor:
        return Processor(self.tokenizer, self.config)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        return apply_chat_template(messages, add_generation_prompt=add_generation_prompt)

    def to_inputs(self, x) -> Inputs:
        """Text, chat messages, a list of ids, a (B, T) tensor or Inputs -> Inputs."""
        if isinstance(x, Inputs):
            return x
        if isinstance(x, Tensor):
            ids = x[None] if x.dim() == 1 else x
            ones = torch.ones_like(ids)
            return Inputs(ids, ones, torch.zeros_like(ids))
        if isinstance(x, (list, tuple)) and not x:
            raise Gemma3LabError("token ids must hold at least one token, got an empty list")
        if isinstance(x, (list, tuple)) and all(isinstance(i, int) for i in x):
            return self.to_inputs(torch.tensor(x))
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass token ids")
        return self.processor(x)

    # ------------------------------------------------------------------ running
    def forward(self, inputs, *, return_type: str | None = "output", loss_per_token: bool = False, **kwargs):
        """model(input_ids) or model(Inputs) or model("text"); kwargs as Gemma3Network.forward.

        `return_type` as TransformerLens: "logits" (B, S, V), "loss" (mean next-token
        cross-entropy; `loss_per_token=True`: (B, S-1)), "both" (logits, loss), None (nothing);
        the default "output" returns the `ModelOutput`."""
        if return_type not in _RETURN_TYPES:
            raise Gemma3LabError(f"return_type must be one of {sorted(map(str, _RETURN_TYPES))}, not {return_type!r}")
        if isinstance(inputs, Tensor):
            ids, mask = (inputs[None] if inputs.dim() == 1 else inputs).to(self.device), None
            out = super().forward(ids, **kwargs)
        else:
            x = self.to_inputs(inputs).to(self.device)
            ids, mask = x.input_ids, x.attention_mask
            out = super().forward(ids, **{**x.model_kwargs(), **kwargs})
        if return_type in ("output", "logits", None):
            return {"output": out, "logits": out.logits, None: None}[return_type]
        loss = per_token_loss(out.logits, ids, mask)
        if not loss_per_token:
            loss = loss.sum() / (loss.numel() if mask is None else (mask[:, 1:] * mask[:, :-1]).sum())
        return loss if return_type == "loss" else (out.logits, loss)

    def generate(self, prompt, images=None, **kwargs):
        return generate(self, prompt, images=images, **kwargs)

    def compile_decode(self, background: bool = True, announce=None) -> "compiled_decode.CompileStatus":
        """Compile the decode step with torch.compile (half a minute to a minute, once per
        process): in a background thread by default, after which `generate`'s unhooked steps
        take it. Returns the status (`.describe()` says it in words); CPU models with float32
        activations (float32, or int8/int4 weights with packed kernels), or bfloat16 ones where
        the CPU has native bfloat16 products, only; anything else reports why not and keeps the
        eager lean step. Where the native C step runs the model (float32, int8/int4 or
        bfloat16, on AVX-512 or AVX2: `model.native_decode`), nothing is compiled and the
        status says "native". `announce(status)` is called when the
        compile ends."""
        return compiled_decode.start(self, background, announce)

    @property
    def compile_status(self) -> "compiled_decode.CompileStatus":
        return compiled_decode.status(self)

    # ------------------------------------------------------------------ facts
    @property
    def device(self) -> torch.device:
        return self.final_norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.final_norm.weight.dtype

    def num_parameters(self) -> int:
        """Weights the network computes with; a quantized projection or table counts its
        logical in × out (its codes are buffers, not parameters)."""
        return sum(n for _, n in weight_counts(self))

    def describe(self) -> str:
        """One line saying what this model is; notes such as "untrained vision" always shown."""
        cfg = self.config
        parts = [
            cfg.name,
            f"{self.num_parameters() / 1e6:.0f}M params",
            f"{cfg.text.num_layers} layers ({len(cfg.text.local_layers)} local / {len(cfg.text.global_layers)} global)",
            str(self.dtype).removeprefix("torch."),
            "text+vision" if cfg.is_multimodal else "text-only",
        ]
        if getattr(self, "quantization", None):
            parts.insert(4, f"{self.quantization} weight-only")
        return " · ".join(parts + list(cfg.notes))

    def __repr__(self) -> str:
        return f"<gemma3_lab.Gemma3 {self.describe()}>"
