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

from gemma3_lab.errors import Gemma3LabError, number
from gemma3_lab.instrument.capture import Capture, capture_hooks
from gemma3_lab.model.checks import check_context
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


def check_sampling(temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None) -> None:
    """temperature a finite number > 0, top_k an integer >= 0, top_p in (0, 1] (NaN and inf refused)."""
    number("temperature", temperature, above=0)
    if top_p is not None:
        number("top_p", top_p, above=0, high=1)
    if top_k is not None:
        number("top_k", top_k, integer=True, low=0)


def warp(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Sampling scores from (V,) logits: temperature, then top-k, then top-p; dropped = -inf."""
    check_sampling(temperature, top_k, top_p)
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
) -> GenerationResult:
    """Generate from one prompt (text, chat messages, ids or Inputs).

    `on_token(step)` is called as each token is chosen (for streaming); `should_stop()` is
    polled between steps; `capture` (names, globs or a predicate, as `names_filter`) picks
    hook points recorded at every forward: `res.captures[name]` is a `Capture` indexed by
    absolute position, `.tensor()` the whole sequence computed (prompt and all but the last token).
    """
    number("max_new_tokens", max_new_tokens, integer=True, low=0)
    number("record_top_k", record_top_k, integer=True, low=0, high=model.config.text.vocab_size)
    check_sampling(temperature, top_k, top_p)  # even when greedy: a NaN setting is a mistake either way
    inputs = _prompt_inputs(model, prompt, images, pan_and_scan)
    if inputs.input_ids.shape[0] != 1:
        raise Gemma3LabError("generate takes one prompt at a time")
    n_prompt = inputs.input_ids.shape[1]
    check_context(model.config, n_prompt + max_new_tokens,
                  f"the prompt ({n_prompt:,} tokens) + max_new_tokens ({max_new_tokens:,})")
    stop_ids = tuple(stop_ids if stop_ids is not None else model.config.text.eos_token_ids)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    tok = model.tokenizer
    cache = KVCache(model.config.text)
    captures: dict[str, Capture] = {}
    hooks = capture_hooks(model, capture, captures)

    ids: list[int] = []
    steps: list[Step] = []
    text = ""
    reason = "max_new_tokens"
    t0 = time.perf_counter()
    t_first = t0
    with model.hooks(hooks):
        x = inputs.to(model.device)
        out = model(x.input_ids, **x.model_kwargs(), cache=cache, logits_to_keep=1)
        t_first = time.perf_counter()
        for i in range(max_new_tokens):
            logits = out.logits[0, -1].float()
            next_id = sample_next(logits, do_sample, temperature, top_k, top_p, gen)
            logp = torch.log_softmax(logits, -1)
            top = torch.topk(logp, record_top_k)
            ids.append(next_id)
            new_text = tok.decode(ids) if tok is not None else ""
            step = Step(
                index=i,
                position=n_prompt + i,
                token_id=next_id,
                token=tok.id_to_token(next_id) if tok is not None else str(next_id),
                text=new_text[len(text):],
                logprob=float(logp[next_id]),
                top_k=[(tok.id_to_token(int(j)) if tok else str(int(j)), float(p.exp())) for p, j in zip(top.values, top.indices)],
                top_k_ids=[int(j) for j in top.indices],
            )
            text = new_text
            steps.append(step)
            if on_token is not None:
                on_token(step)
            if next_id in stop_ids:
                reason = "eos"
                break
            if should_stop is not None and should_stop():
                reason = "stopped"
                break
            if i + 1 < max_new_tokens:
                step_ids = torch.tensor([[next_id]], device=model.device)
                out = model(step_ids, cache=cache, logits_to_keep=1)
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
