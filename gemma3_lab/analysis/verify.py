"""Compare a loaded model with transformers on the same checkpoint: max |Δlogit| and greedy
agreement. transformers is optional and imported only here, only when asked for."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch


@dataclass
class VerifyReport:
    prompt_tokens: int
    max_abs_diff: float
    mean_abs_diff: float
    same_argmax: float  # fraction of positions where the top token agrees
    ours: list[int]  # greedy continuation ids
    theirs: list[int]

    @property
    def greedy_agree(self) -> bool:
        return self.ours == self.theirs

    def __str__(self) -> str:
        return (
            f"prompt tokens: {self.prompt_tokens}\n"
            f"max |Δlogit|: {self.max_abs_diff:.3g}   mean: {self.mean_abs_diff:.3g}   "
            f"same argmax: {self.same_argmax:.1%}\n"
            f"greedy continuation identical: {self.greedy_agree} ({len(self.ours)} tokens)"
        )


def load_reference(folder, dtype=torch.float32, attn_implementation: str = "eager"):
    """transformers' own model for a folder (raises ImportError with advice if not installed)."""
    try:
        tf = importlib.import_module("transformers")  # optional: only `verify` needs it
    except ImportError:
        raise ImportError("verify needs transformers: pip install -r requirements-dev.txt") from None
    cfg = tf.AutoConfig.from_pretrained(folder)
    cls = tf.Gemma3ForConditionalGeneration if cfg.model_type == "gemma3" else tf.AutoModelForCausalLM
    return cls.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation).eval()


@torch.no_grad()
def verify(model, reference, prompt: str, new_tokens: int = 16, explicit: bool = True) -> VerifyReport:
    """Run both on `prompt` (our explicit path vs their eager, like with like)."""
    ids = model.to_inputs(prompt).input_ids
    if explicit:
        model.set_attention_path("explicit")
    try:
        ours = model(ids).logits.float()
        theirs = reference(input_ids=ids).logits.float()
        greedy = model.generate(ids, max_new_tokens=new_tokens, stop_ids=()).token_ids
    finally:
        model.set_attention_path("sdpa")
    ref_ids = reference.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, top_k=None, top_p=None, pad_token_id=0,
    )[0, ids.shape[1]:].tolist()
    d = (ours - theirs).abs()
    return VerifyReport(
        prompt_tokens=ids.shape[1],
        max_abs_diff=float(d.max()),
        mean_abs_diff=float(d.mean()),
        same_argmax=float((ours.argmax(-1) == theirs.argmax(-1)).float().mean()),
        ours=greedy,
        theirs=ref_ids,
    )
