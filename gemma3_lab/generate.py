"""Prefill + one-token decode steps over a KV cache, with every step recorded.

Sampling follows transformers' order: temperature, then top-k, then top-p. Each step keeps
the chosen token's log-probability and the top candidates under the model's own
(temperature 1, unfiltered) distribution, so two runs can be compared step by step.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from gemma3_lab.errors import Gemma3LabError, number
from gemma3_lab.instrument.capture import Capture, capture_hooks
from gemma3_lab.model import compiled_decode, fast_decode
from gemma3_lab.model.kernels import top_few
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
    # decode steps by the path that ran them: "native" (C), "compiled", "lean" (eager), "plain" (instrumented forward)
    decode_paths: dict[str, int] = field(default_factory=dict)

    @property
    def decode_path(self) -> str:
        """The decode step(s) this generation took, in words: "compiled", or "3 lean, 12 compiled"."""
        if len(self.decode_paths) <= 1:
            return next(iter(self.decode_paths), "none")
        return ", ".join(f"{n} {k}" for k, n in self.decode_paths.items())

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
    if not do_sample:  # max over a dimension: the first maximum as argmax, 3x faster on 262k logits
        return int(logits.max(-1).indices)
    probs = warp(logits, temperature, top_k, top_p).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


PREFILL_CHUNK = 256  # prompt tokens per prefill forward: a stop request waits for one chunk at most


def prefill_chunks(inputs: Inputs, chunk: int | None) -> list[tuple[int, int]]:
    """[(start, end)] slices of the prompt, `chunk` tokens each; the first one reaches past the
    last image, whose soft tokens attend to each other both ways and so must share a forward."""
    S = inputs.input_ids.shape[1]
    if not chunk or chunk >= S:
        return [(0, S)]
    first = max([s.end for s in inputs.image_spans], default=0)
    first = max(chunk, -(-first // chunk) * chunk)
    return [(0, min(first, S))] + [(a, min(a + chunk, S)) for a in range(first, S, chunk)]


def prefill_rows(model, inputs: Inputs, cache: KVCache, chunk: int | None = None,
                 should_stop: Callable[[], bool] | None = None) -> Tensor | None:
    """Run the prompt (B rows) through the model, filling `cache`, in `prefill_chunks`;
    (B, V) float logits for the next token, or None when `should_stop()` said so between chunks."""
    x = inputs.to(model.device)
    out = None
    for a, b in prefill_chunks(x, chunk):
        if out is not None and should_stop is not None and should_stop():
            return None
        out = model(x.input_ids[:, a:b], attention_mask=x.attention_mask[:, :b], token_types=x.token_types[:, a:b],
                    pixel_values=x.pixel_values if a == 0 else None, cache=cache, logits_to_keep=1)
    return out.logits[:, -1].float()


def prefill(model, inputs: Inputs, cache: KVCache, chunk: int | None = None,
            should_stop: Callable[[], bool] | None = None) -> Tensor | None:
    """Run the whole prompt once, filling `cache`; (V,) float logits for the next token
    (None if stopped between chunks, see `prefill_rows`)."""
    logits = prefill_rows(model, inputs, cache, chunk, should_stop)
    return None if logits is None else logits[0]


def decode_rows(model, token_ids: list[int], cache: KVCache, fast: bool | None = None) -> Tensor:
    """Feed one token per row at the cache's next slot; (B, V) float logits for the next ones.

    fast (default: the model's `fast_decode`) takes the lean step where nothing is hooked
    (`gemma3_lab.model.fast_decode`), the compiled one for a single row where it is ready;
    the plain forward runs otherwise."""
    if _fast(model, fast):
        logits = fast_decode.decode_step(model, list(token_ids), cache)
        if logits is not None:
            return logits
    cache.paths["plain"] += 1
    step_ids = torch.tensor([[t] for t in token_ids], device=model.device)
    return model(step_ids, cache=cache, logits_to_keep=1).logits[:, -1].float()


def decode_one(model, token_id: int, cache: KVCache, fast: bool | None = None) -> Tensor:
    """Feed one chosen token at the cache's next slot; (V,) float logits for the one after it
    (the compiled step's own tensor where it ran: `compiled_decode.summary` knows it by identity)."""
    if _fast(model, fast):
        logits = fast_decode.decode_step(model, token_id, cache)
        if logits is not None:
            return logits
    return decode_rows(model, [token_id], cache, fast=False)[0]


def _fast(model, fast: bool | None) -> bool:
    return fast if fast is not None else getattr(model, "fast_decode", False)


def watch_prefill(model, capture, store: dict[str, Capture], cache: KVCache, fast: bool | None,
                  watching: ExitStack) -> KVCache | None:
    """After a prefill recorded into `store` under the hooks `watching` holds: how the decode
    steps are recorded. Where they may run fast (nothing else hooked, a plain text cache), the
    recording hooks come off so that they do, and a copy of the prompt's cache is returned
    for `capture_fed` to compute what they would have recorded, in one forward once the
    tokens are known. Otherwise (None) the hooks stay on and every step is recorded as it runs."""
    if not capture or not _fast(model, fast):
        return None
    watching.close()
    if fast_decode.applies(model, cache):
        return cache.copy()
    watching.enter_context(model.hooks(capture_hooks(model, capture, store)))
    return None


@torch.no_grad()
def capture_fed(model, capture, prompt: dict[str, Capture], cache: KVCache, fed: list[int],
                chunk: int | None = None) -> dict[str, Capture]:
    """The captures of a generation whose decode steps ran unrecorded: `prompt`'s (the
    prefill's own records, shared, not copied), then the `fed` tokens run on from the
    prompt's `cache` (which they advance: pass a copy to keep it) in one forward (chunks of
    `chunk`) under the same recording hooks. It
    equals recording every step as it ran up to float rounding (one product of many rows
    instead of many of one row). It costs a prefill of the fed tokens, a few decode steps'
    time for a few dozen tokens (one read of the weights for them all), while every step of
    the generation itself took the lean or compiled step."""
    store = {name: cap.continued() for name, cap in prompt.items()}
    if not fed:
        return store
    ids = torch.tensor([fed], device=model.device)
    every = any(n == "hook_logits" for n in model.select_hook_names(capture))  # a step recorded its logits
    step = chunk or len(fed)
    with model.hooks(capture_hooks(model, capture, store)):
        for a in range(0, len(fed), step):
            model(ids[:, a:a + step], cache=cache, logits_to_keep=None if every else 1)
    return store


def record_step(tok, ids: list[int], index: int, position: int, logits: Tensor, record_top_k: int,
                added_text: str, lse: Tensor | None = None) -> Step:
    """The step record of the token `ids[-1]`, chosen from `logits`, that added `added_text`.
    `lse`: the logits' logsumexp where already known (log p = logit - lse for the few kept)."""
    next_id = ids[-1]
    if lse is None:
        logp = torch.log_softmax(logits, -1)
        chosen, (values, top_ids) = logp[next_id], top_few(logp, record_top_k)
    else:  # the top of the logits is the top of log p
        values, top_ids = top_few(logits, record_top_k)
        chosen, values = logits[next_id] - lse, values - lse
    piece = tok.id_to_token if tok is not None else str
    return Step(
        index=index,
        position=position,
        token_id=next_id,
        token=piece(next_id),
        text=added_text,
        logprob=float(chosen),
        top_k=[(piece(int(j)), float(p.exp())) for p, j in zip(values, top_ids)],
        top_k_ids=[int(j) for j in top_ids],
    )


def check_length(config, n_prompt: int, max_new_tokens: int, max_prompt: int | None = None,
                 max_prompt_name: str = "the limit", note: str = "") -> None:
    """How long a generation may be: the prompt and every new token fit the model's context
    (`check_context`, the one context rule), and the prompt fits a caller's own `max_prompt` if
    given (the app's, named `max_prompt_name`, `note` appended)."""
    check_context(config, n_prompt + max_new_tokens,
                  f"the prompt ({n_prompt:,} tokens) + max_new_tokens ({max_new_tokens:,})")
    if max_prompt is not None and n_prompt > max_prompt:
        raise Gemma3LabError(f"the prompt is {n_prompt} tokens, past {max_prompt_name} of {max_prompt} prompt "
                             f"tokens{note}")


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
    stop_at_end_of_turn: bool = True,
    prefill_chunk: int | None = PREFILL_CHUNK,
    fast: bool | None = None,
) -> GenerationResult:
    """Generate from one prompt (text, chat messages, ids or Inputs): `prefill`, then
    `decode_one` per token, each choice kept as a `Step` (`record_step`).

    `on_token(step)` is called as each token is chosen (for streaming); `should_stop()` is
    polled between steps and between the prefill's chunks of `prefill_chunk` tokens; `capture`
    (names, globs or a predicate, as `names_filter`) picks
    hook points recorded at every forward: `res.captures[name]` is a `Capture` indexed by
    absolute position, `.tensor()` the whole sequence computed (prompt and all but the last token).

    Stopping: by default generation ends after `<eos>` (id 1) or `<end_of_turn>` (id 106), the
    checkpoint's `config.text.eos_token_ids`, as llama.cpp stops on this GGUF and as the Hub's
    Gemma 3 generation_config lists them, so that a chat reply ends with its turn.
    transformers reading the bundled GGUF itself builds a generation config with
    `eos_token_id = 1` only and runs on past `<end_of_turn>`; `stop_at_end_of_turn=False`
    does the same (it drops the tokenizer's `<end_of_turn>` from the default ids).
    `stop_ids` replaces the default outright (`()`: never stop early). The stop token is
    kept in `token_ids`, and `stop_reason` is "eos".

    `fast` (default: the model's `fast_decode`, True) lets decode steps with nothing hooked
    take the lean step and packed kernels; False runs the plain forward at every step. A
    `capture` does not keep the steps off the fast path: the prompt is recorded as it runs,
    the decoded tokens in one forward after the last step (`capture_fed`).
    """
    number("record_top_k", record_top_k, integer=True, low=0, high=model.config.text.vocab_size)
    check_sampling(temperature, top_k, top_p)  # even when greedy: a NaN setting is a mistake either way
    inputs = _one_prompt(model, prompt, images, pan_and_scan, max_new_tokens)
    n_prompt = inputs.input_ids.shape[1]
    stop_ids = default_stop_ids(model, stop_at_end_of_turn) if stop_ids is None else tuple(stop_ids)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    cache = KVCache(model.config.text)
    captures: dict[str, Capture] = {}

    t0 = time.perf_counter()
    with ExitStack() as watching:
        watching.enter_context(model.hooks(capture_hooks(model, capture, captures)))
        logits = prefill(model, inputs, cache, prefill_chunk, should_stop)
        prompt_cache = watch_prefill(model, capture, captures, cache, fast, watching) if logits is not None else None
        t_first = time.perf_counter()
        run = _Run(n_prompt, record_top_k, stop_ids, on_token, should_stop)
        if logits is None:
            run.reason = "stopped"
        while run.reason is None and len(run.ids) < max_new_tokens:
            # a compiled step has already reduced its logits to their logsumexp and argmax
            known = compiled_decode.summary(cache, logits)
            lse = None if known is None else known[0]
            token = known[1] if known is not None and not do_sample else \
                sample_next(logits, do_sample, temperature, top_k, top_p, gen)
            if run.choose(model.tokenizer, token, logits, lse) and len(run.ids) < max_new_tokens:
                logits = decode_one(model, run.ids[-1], cache, fast)
    t_end = time.perf_counter()
    if prompt_cache is not None:
        captures = capture_fed(model, capture, captures, prompt_cache, run.ids[:-1], prefill_chunk)
    return GenerationResult(text=run.text, token_ids=run.ids, steps=run.steps, prompt_ids=inputs.input_ids[0].tolist(),
                            stop_reason=run.reason or "max_new_tokens", inputs=inputs, prefill_seconds=t_first - t0,
                            decode_seconds=t_end - t_first, captures=captures,
                            decode_paths=dict(cache.paths))


def _one_prompt(model, prompt, images, pan_and_scan: bool, max_new_tokens: int) -> Inputs:
    """The prompt as one row of Inputs that leaves room for `max_new_tokens` in the context."""
    number("max_new_tokens", max_new_tokens, integer=True, low=0)
    inputs = _prompt_inputs(model, prompt, images, pan_and_scan)
    if inputs.input_ids.shape[0] != 1:
        raise Gemma3LabError("generate takes one prompt at a time")
    check_length(model.config, inputs.input_ids.shape[1], max_new_tokens)
    return inputs


@dataclass
class _Run:
    """One generation's growing record: each chosen token becomes a `Step`, then the stop rules."""

    n_prompt: int
    record_top_k: int
    stop_ids: tuple[int, ...]
    on_token: Callable[[Step], None] | None
    should_stop: Callable[[], bool] | None
    ids: list[int] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    text: str = ""
    reason: str | None = None  # set once the run ends early: "eos" | "stopped"

    def choose(self, tok, token_id: int, logits: Tensor, lse: Tensor | None = None) -> bool:
        """Record `token_id`, chosen from `logits` (`lse`: their logsumexp if known); False once
        the run has stopped."""
        self.ids.append(token_id)
        i = len(self.ids) - 1
        # decode the whole sequence: a byte-fallback piece may complete an earlier character
        new_text = tok.decode(self.ids) if tok is not None else ""
        step = record_step(tok, self.ids, i, self.n_prompt + i, logits, self.record_top_k,
                           new_text[len(self.text):], lse)
        self.text = new_text
        self.steps.append(step)
        if self.on_token is not None:
            self.on_token(step)
        if token_id in self.stop_ids:
            self.reason = "eos"
        elif self.should_stop is not None and self.should_stop():
            self.reason = "stopped"
        return self.reason is None


def default_stop_ids(model, stop_at_end_of_turn: bool = True) -> tuple[int, ...]:
    """The ids `generate` stops on when given none (see its docstring)."""
    ids = tuple(model.config.text.eos_token_ids)
    if stop_at_end_of_turn:
        return ids
    if model.tokenizer is None:
        raise Gemma3LabError("stop_at_end_of_turn=False needs the tokenizer to know <end_of_turn>; pass stop_ids instead")
    return tuple(i for i in ids if i != model.tokenizer.end_of_turn_id)


def _prompt_inputs(model, prompt, images, pan_and_scan: bool) -> Inputs:
    if isinstance(prompt, Inputs):
        return prompt
    if isinstance(prompt, str) and not prompt:
        raise ValueError("the prompt is empty")
    if images or pan_and_scan:
        return model.processor(prompt, images=images, pan_and_scan=pan_and_scan)
    return model.to_inputs(prompt)
