"""Generation: sampling warpers equal transformers', seeds reproduce, steps are truthful,
streaming and stopping behave."""

from __future__ import annotations

import pytest
import torch

from gemma3_lab.generate import sample_next, warp


@pytest.mark.oracle
@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, None, None), (1.0, 50, None), (1.3, None, 0.9), (0.8, 40, 0.95), (1.0, 1, None)])
def test_warp_equals_transformers_processors(temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(0)) * 3
    ref = logits.clone()
    ids = torch.zeros(1, 1, dtype=torch.long)
    ref = TemperatureLogitsWarper(temperature)(ids, ref)
    if top_k:
        ref = TopKLogitsWarper(top_k)(ids, ref)
    if top_p:
        ref = TopPLogitsWarper(top_p)(ids, ref)
    got = warp(logits[0], temperature, top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(ref[0]))
    assert torch.allclose(got[~torch.isinf(got)], ref[0][~torch.isinf(ref[0])])


def test_bad_sampling_settings_raise():
    logits = torch.randn(10)
    for kw in (dict(temperature=0.0), dict(top_p=1.5), dict(top_k=-1)):
        with pytest.raises(ValueError):
            sample_next(logits, do_sample=True, **kw)


@pytest.mark.real
def test_greedy_steps_are_truthful(real_model):
    res = real_model.generate("The capital of France is", max_new_tokens=6)
    with torch.no_grad():
        logits = real_model(torch.tensor([res.prompt_ids + res.token_ids])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    n = len(res.prompt_ids)
    for s in res.steps:
        row = logp[n - 1 + s.index]
        assert s.token_id == int(row.argmax()) == s.top_k_ids[0]
        assert s.logprob == pytest.approx(float(row[s.token_id]), abs=1e-4)
        assert s.position == n + s.index
        assert s.token == real_model.tokenizer.id_to_token(s.token_id)
    assert "".join(s.text for s in res.steps) == res.text == real_model.tokenizer.decode(res.token_ids)


@pytest.mark.real
def test_seeded_sampling_reproduces_and_streams(real_model):
    seen = []
    kw = dict(max_new_tokens=12, do_sample=True, temperature=0.9, top_k=40, top_p=0.95, stop_ids=())
    a = real_model.generate("Once upon a time", seed=7, on_token=seen.append, **kw)
    b = real_model.generate("Once upon a time", seed=7, **kw)
    c = real_model.generate("Once upon a time", seed=8, **kw)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    assert [s.token_id for s in seen] == a.token_ids
    assert a.first_divergence(b) is None and a.first_divergence(c) is not None
    for s in a.steps:  # every sampled token was inside the top-40
        assert s.logprob > -30


@pytest.mark.real
def test_stops_on_end_of_turn_and_when_asked(real_model):
    eot = real_model.tokenizer.end_of_turn_id
    res = real_model.generate("Hello", max_new_tokens=5, stop_ids=(real_model.generate("Hello", max_new_tokens=1).token_ids[0], eot))
    assert res.stop_reason == "eos" and len(res.token_ids) == 1
    calls = []
    res = real_model.generate("Hello", max_new_tokens=20, should_stop=lambda: len(calls.append(1) or calls) >= 3)
    assert res.stop_reason == "stopped" and len(res.token_ids) == 3


@pytest.mark.real
def test_prompt_errors(real_model):
    with pytest.raises(ValueError, match="empty"):
        real_model.generate("")
    with pytest.raises(ValueError, match="context"):
        real_model.generate("hi", max_new_tokens=real_model.config.text.max_position_embeddings)


# <end_of_turn> as the first new token and <eos> as the fourth, forced by the same logit bias in
# both libraries; the two tokens between are each model's own greedy choice.
FORCED = {0: 106, 3: 1}
BIAS = 1e4


def _force_ours():
    calls = []

    def hook(logits, hook):
        n = len(calls)  # forward n chooses new token n (0 is the prefill)
        calls.append(n)
        if n in FORCED:
            logits = logits.clone()
            logits[:, -1, FORCED[n]] += BIAS
        return logits

    return hook


@pytest.fixture(scope="module")
def transformers_gguf_eos():
    """The eos ids of the generation config transformers builds when it reads the bundled GGUF."""
    from transformers import AutoConfig, GenerationConfig

    from gemma3_lab.load import bundled_gguf_path

    gguf = bundled_gguf_path()
    return GenerationConfig.from_model_config(AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)).eos_token_id


@pytest.mark.real
@pytest.mark.oracle
def test_stop_at_end_of_turn_false_stops_where_transformers_does(real_model, hf_eager, transformers_gguf_eos):
    from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

    ids = real_model.to_inputs("The recipe is simple:").input_ids

    class Force(LogitsProcessor):
        def __call__(self, input_ids, scores):
            n = input_ids.shape[1] - ids.shape[1]
            if n in FORCED:
                scores = scores.clone()
                scores[:, FORCED[n]] += BIAS
            return scores

    config = GenerationConfig(eos_token_id=transformers_gguf_eos, do_sample=False, max_new_tokens=8, pad_token_id=0)
    with torch.no_grad():
        theirs = hf_eager.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config,
                                   logits_processor=LogitsProcessorList([Force()]))[0, ids.shape[1]:].tolist()
    runs = {}
    for stop_at_end_of_turn in (True, False):
        with real_model.hooks([("hook_logits", _force_ours())]):
            runs[stop_at_end_of_turn] = real_model.generate(ids, max_new_tokens=8,
                                                            stop_at_end_of_turn=stop_at_end_of_turn)
    assert runs[False].token_ids == theirs and runs[False].stop_reason == "eos"
    assert len(theirs) == 4 and theirs[0] == 106 and theirs[-1] == 1  # ran on past <end_of_turn>, stopped at <eos>
    assert runs[True].token_ids == [106] and runs[True].stop_reason == "eos"  # the default ends with the turn


@pytest.mark.parametrize("k", [0, 1, 5, 8, 9, 64])
@pytest.mark.parametrize("n", [262144, 300, 65536 + 256 * 3, 65536 + 64 * 3])
def test_top_few_is_torch_topk(k, n):
    """The two-round top-k of a step record and the int4 screen: the same values and (with no
    ties) the same ids."""
    from gemma3_lab.generate import top_few

    x = torch.randn(n, generator=torch.Generator().manual_seed(n + k)) * 3
    x[n // 3] = 50.0  # the winner in a late block, the runner-up in the last
    x[-1] = 49.0
    x[7:7 + 40] = 48.0 - torch.arange(40.0) / 64  # many of the top in one block
    values, ids = top_few(x, k)
    ref = torch.topk(x, k)
    assert torch.equal(values, ref.values) and torch.equal(ids, ref.indices)


@pytest.mark.parametrize("k", [5, 64])
def test_top_few_with_ties_keeps_torch_topks_values(k):
    """Logits on a coarse grid (many ties, the k-th value shared across blocks): the same
    values as torch.topk, each at an index that holds it, none twice."""
    from gemma3_lab.generate import top_few

    x = torch.randint(0, 40, (262144,), generator=torch.Generator().manual_seed(k)).float()
    values, ids = top_few(x, k)
    assert torch.equal(values, torch.topk(x, k).values)
    assert torch.equal(x[ids], values) and len(set(ids.tolist())) == k
