"""Prefill + one-token decode steps over a KV cache, with every step recorded.

Sampling follows transformers' order: temperature, then top-k, then top-p. Each step keeps
the chosen token's log-probability and the top candidates under the model's own
(temperature 1, unfiltered) distribution, so two runs can be compared step by step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from gemma3_lab.instrument.capture import Capture, capture_hooks
from gemma3_lab.model.fast_decode import decode_step
from gemma3_lab.model.kv_cache import KVCache
from gemma3_lab.prompt.inputs import Inputs


@dataclass
class Step:
    index: int  # 0 for the first generated token
    position: int  # slot of the token in the full sequence
    token_id: int
    token: str  # the token's piece, e.g. "▁Paris"
    text: str  # the text this step added to the decoded output
    logprob: float  # log p(token) under the model's distribution
    top_k: list[tuple[str, float]]  # [(piece, prob), ...] highest first
    top_k_ids: list[int]

    @property
    def prob(self) -> float:
        return float(torch.tensor(self.logprob).exp())


@dataclass
class GenerationResult:
    text: str  # generated text only
    token_ids: list[int]  # generated ids only
    steps: list[Step]
    prompt_ids: list[int]
    stop_reason: str  # "eos" | "max_new_tokens" | "stopped"
    inputs: Inputs | None = None
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    captures: dict[str, Capture] = field(default_factory=dict)  # hook name -> every forward, by position

    @property
    def tokens_per_second(self) -> float:
        n = max(len(self.steps) - 1, 0)  # the first token comes from the prefill
        return n / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    def first_divergence(self, other: "GenerationResult") -> int | None:
        """Index of the first step where the two generations chose different tokens."""
        for i, (a, b) in enumerate(zip(self.token_ids, other.token_ids)):
            if a != b:
                return i
        return None if len(self.token_ids) == len(other.token_ids) else min(len(self.token_ids), len(other.token_ids))


def warp(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Sampling scores from (V,) logits: temperature, then top-k, then top-p; dropped = -inf."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    scores = logits.float() / temperature
    if top_k:
        kth = torch.topk(scores, min(top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # drop the low tail whose total mass is <= 1 - top_p, always keeping the best token
        sorted_scores, order = torch.sort(scores, descending=False)
        drop = sorted_scores.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[-1] = False
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return scores


def sample_next(
    logits: Tensor,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """Choose a token from (V,) logits: argmax, or a draw from the warped distribution."""
    if not do_sample:
        return int(torch.argmax(logits))
    probs = warp(logits, temperature, top_k, top_p).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def prefill(model, inputs: Inputs, cache: KVCache) -> Tensor:
    """Run the whole prompt once, filling `cache`; (V,) float logits for the next token."""
    x = inputs.to(model.device)
    out = model(x.input_ids, **x.model_kwargs(), cache=cache, logits_to_keep=1)
    return out.logits[0, -1].float()


def decode_one(model, token_id: int, cache: KVCache, fast: bool | None = None) -> Tensor:
    """Feed one chosen token at the cache's next slot; (V,) float logits for the one after it.

    fast (default: the model's `fast_decode`) takes the lean step where nothing is hooked
    (`gemma3_lab.model.fast_decode`); the plain forward runs otherwise."""
    if fast if fast is not None else getattr(model, "fast_decode", False):
        logits = decode_step(model, token_id, cache)
        if logits is not None:
            return logits
    step_ids = torch.tensor([[token_id]], device=model.device)
    return model(step_ids, cache=cache, logits_to_keep=1).logits[0, -1].float()


def record_step(tok, ids: list[int], index: int, position: int, logits: Tensor, record_top_k: int,
                added_text: str) -> Step:
    """The step record of the token `ids[-1]`, chosen from `logits`, that added `added_text`."""
    next_id = ids[-1]
    logp = torch.log_softmax(logits, -1)
    top = torch.topk(logp, record_top_k)
    piece = tok.id_to_token if tok is not None else str
    return Step(
        index=index,
        position=position,
        token_id=next_id,
        token=piece(next_id),
        text=added_text,
        logprob=float(logp[next_id]),
        top_k=[(piece(int(j)), float(p.exp())) for p, j in zip(top.values, top.indices)],
        top_k_ids=[int(j) for j in top.indices],
    )


@torch.no_grad()
def generate(
    model,
    prompt,
    images=None,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    on_token: Callable[[Step], None] | None = None,
    capture=None,
    record_top_k: int = 5,
    stop_ids: tuple[int, ...] | None = None,
    pan_and_scan: bool = False,
    should_stop: Callable[[], bool] | None = None,
    fast: bool | None = None,
) -> GenerationResult:
    """Generate from one prompt (text, chat messages, ids or Inputs): `prefill`, then
    `decode_one` per token, each choice kept as a `Step` (`record_step`).

    `on_token(step)` is called as each token is chosen (for streaming); `should_stop()` is
    polled between steps; `capture` (names, globs or a predicate, as `names_filter`) picks
    hook points recorded at every forward: `res.captures[name]` is a `Capture` indexed by
    absolute position, `.tensor()` the whole sequence computed (prompt and all but the last token).
    `fast` (default: the model's `fast_decode`, True) lets decode steps with nothing hooked
    take the lean step and packed kernels; False runs the plain forward at every step.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    inputs = _prompt_inputs(model, prompt, images, pan_and_scan)
    if inputs.input_ids.shape[0] != 1:
        raise ValueError("generate takes one prompt at a time")
    n_prompt = inputs.input_ids.shape[1]
    limit = model.config.text.max_position_embeddings
    if n_prompt + max_new_tokens > limit:
        raise ValueError(f"prompt ({n_prompt} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context of {limit}")
    stop_ids = tuple(stop_ids if stop_ids is not None else model.config.text.eos_token_ids)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    cache = KVCache(model.config.text)
    captures: dict[str, Capture] = {}

    ids: list[int] = []
    steps: list[Step] = []
    text = ""
    reason = "max_new_tokens"
    t0 = time.perf_counter()
    with model.hooks(capture_hooks(model, capture, captures)):
        logits = prefill(model, inputs, cache)
        t_first = time.perf_counter()
        for i in range(max_new_tokens):
            ids.append(sample_next(logits, do_sample, temperature, top_k, top_p, gen))
            # decode the whole sequence: a byte-fallback piece may complete an earlier character
            new_text = model.tokenizer.decode(ids) if model.tokenizer is not None else ""
            step = record_step(model.tokenizer, ids, i, n_prompt + i, logits, record_top_k, new_text[len(text):])
            text = new_text
            steps.append(step)
            if on_token is not None:
                on_token(step)
            if ids[-1] in stop_ids:
                reason = "eos"
                break
            if should_stop is not None and should_stop():
                reason = "stopped"
                break
            if i + 1 < max_new_tokens:
                logits = decode_one(model, ids[-1], cache, fast)
    t_end = time.perf_counter()
    return GenerationResult(
        text=text,
        token_ids=ids,
        steps=steps,
        prompt_ids=inputs.input_ids[0].tolist(),
        stop_reason=reason,
        inputs=inputs,
        prefill_seconds=t_first - t0,
        decode_seconds=t_end - t_first,
        captures=captures,
    )


def _prompt_inputs(model, prompt, images, pan_and_scan: bool) -> Inputs:
    if isinstance(prompt, Inputs):
        return prompt
    if isinstance(prompt, str) and not prompt:
        raise ValueError("the prompt is empty")
    if images or pan_and_scan:
        return model.processor(prompt, images=images, pan_and_scan=pan_and_scan)
    return model.to_inputs(prompt)
