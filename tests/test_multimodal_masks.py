"""Image tokens attend to each other both ways within their image and never across images,
text after an image sees all of it, the window still bounds local layers backwards, and
cached generation with an image equals one uncached forward (docs/gemma3.md §3.3, §3.5)."""

from __future__ import annotations

import pytest
import torch

from gemma3_lab.config import Gemma3Config, TextConfig, VisionConfig, pattern_layer_types
from gemma3_lab.explorer import Gemma3
from gemma3_lab.model.kv_cache import KVCache
from gemma3_lab.model.masks import image_block_ids, layer_mask
from gemma3_lab.prompt.inputs import Inputs
from gemma3_lab.prompt.processor import pad_left

BOI, EOI, IMG = 297, 298, 299


def test_written_out_masks():
    """Two 2-token images at slots 1-2 and 4-5; window 2 in the local layer."""
    types = torch.tensor([[0, 1, 1, 0, 1, 1, 0, 0]])
    pos = torch.arange(8)
    blocks = image_block_ids(types)
    full = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],  # image 0 sees its later token ...
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0],  # ... image 1 sees image 0 causally, never the reverse
        [1, 1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 0],  # text after the images sees all of them
        [1, 1, 1, 1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    local = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 0, 0, 0],  # backwards the window still cuts ...
        [0, 0, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 1, 1, 1, 0, 0],  # ... forwards within the image it never does
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(layer_mask(pos, pos, None, blocks)[0, 0], full)
    assert torch.equal(layer_mask(pos, pos, 2, blocks)[0, 0], local)


@pytest.fixture(scope="module")
def tiny():
    text = TextConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=4, num_heads=4,
                      num_kv_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=3,
                      layer_types=pattern_layer_types(4, 2))  # local, global, local, global
    vision = VisionConfig(hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4, image_size=28, patch_size=7)
    config = Gemma3Config(text, vision, name="tiny-mm", mm_tokens_per_image=4, boi_token_id=BOI, eoi_token_id=EOI,
                          image_token_id=IMG)
    torch.manual_seed(0)
    model = Gemma3(config).eval()
    with torch.no_grad():  # norms and the projection start at zero: make every part matter
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def _inputs(rows: list[list[int]], n_pixels: int, seed: int = 0) -> Inputs:
    x = pad_left(rows, 0)
    pixels = torch.randn(n_pixels, 3, 28, 28, generator=torch.Generator().manual_seed(seed))
    return Inputs(x.input_ids, x.attention_mask, (x.input_ids == IMG).long(), pixels)


IMAGE = [BOI, IMG, IMG, IMG, IMG, EOI]
TWO_IMAGES = [2, 10, 11, *IMAGE, 12, *IMAGE, 13, 14]  # soft tokens at 4-7 and 11-14


def test_model_uses_the_image_blocks(tiny):
    x = _inputs([TWO_IMAGES], 2)
    _, cache = tiny.run_with_cache(x, names_filter=lambda n: n.endswith("attn.hook_mask"))
    a, b = slice(4, 8), slice(11, 15)
    for layer in range(4):
        m = cache["mask", layer][0, 0]
        forward = torch.ones(4, 4, dtype=torch.bool).triu()
        assert m[a, a][forward].all() and m[b, b][forward].all()  # later tokens of the own image, always
        assert not m[a, b].any()  # an image never sees a later image
        if layer % 2:  # global: both ways within an image; text after an image sees all of it
            assert m[a, a].all() and m[b, b].all()
            assert m[15:, a].all() and m[15:, b].all() and m[b, a].all()
        else:  # local: the window of 3 bounds every query backwards, image tokens included
            assert not m[7, 4] and not m[15, a].any() and not m[8, 4]


def _perturbed(model, x: Inputs, slot: int) -> torch.Tensor:
    def nudge(t, hook):
        t = t.clone()
        t[:, slot] += 1.0
        return t

    with torch.no_grad():
        return model.run_with_hooks(x, fwd_hooks=[("hook_inputs_embeds", nudge)])


def test_an_image_token_hears_its_own_later_tokens_only(tiny):
    x = _inputs([TWO_IMAGES], 2)
    with torch.no_grad():
        base = tiny(x).logits[0]
    moved = _perturbed(tiny, x, 7)[0] - base  # last soft token of image 0
    assert moved[4].abs().max() > 1e-3  # the first token of the same image hears it
    assert moved[:4].abs().max() == 0  # text before the image does not
    moved = _perturbed(tiny, x, 14)[0] - base  # last soft token of image 1
    assert moved[:11].abs().max() == 0  # image 0 and everything before image 1 do not
    assert moved[11].abs().max() > 1e-3


@pytest.mark.parametrize("path", ["sdpa", "explicit"])
def test_cached_generation_equals_uncached(tiny, path):
    # row 0 is left-padded and holds one image; row 1 two; then 6 decode steps past the window
    x = _inputs([[2, 20, *IMAGE, 21], TWO_IMAGES], 3, seed=1)
    steps = torch.randint(5, 290, (2, 6), generator=torch.Generator().manual_seed(2))
    P = x.input_ids.shape[1]
    full = Inputs(torch.cat((x.input_ids, steps), 1), torch.cat((x.attention_mask, torch.ones_like(steps)), 1),
                  torch.cat((x.token_types, torch.zeros_like(steps)), 1), x.pixel_values)
    tiny.set_attention_path(path)
    try:
        with torch.no_grad():
            ref = tiny(full).logits
            cache = KVCache(tiny.config.text)
            parts = [tiny(x, cache=cache).logits]
            for t in range(steps.shape[1]):  # decode steps carry no token types, as in transformers
                parts.append(tiny(steps[:, t:t + 1], attention_mask=full.attention_mask[:, :P + t + 1],
                                  cache=cache).logits)
    finally:
        tiny.set_attention_path("sdpa")
    got = torch.cat(parts, 1)
    real = full.attention_mask.bool()
    assert (got - ref)[real].abs().max() <= 1e-5


@pytest.mark.real
def test_demo_multimodal_generates_from_an_image():
    import numpy as np
    from PIL import Image

    import gemma3_lab as gl

    yy, xx = np.mgrid[0:480, 0:640]
    picture = Image.fromarray(np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8))
    model = gl.load("demo-multimodal", progress=False)
    assert "untrained vision" in model.describe() and model.config.vision.image_size == 896
    messages = [{"role": "user", "content": [{"type": "image", "image": picture},
                                             {"type": "text", "text": "What is in this image?"}]}]
    res = model.generate(messages, max_new_tokens=4)
    assert len(res.token_ids) >= 1 and res.inputs.pixel_values.shape == (1, 3, 896, 896)
    x = res.inputs
    n = len(res.token_ids)
    ids = torch.cat((x.input_ids, torch.tensor([res.token_ids[:n - 1]], dtype=torch.long)), 1)
    types = torch.cat((x.token_types, torch.zeros(1, n - 1, dtype=torch.long)), 1)
    with torch.no_grad():  # one uncached forward over prompt + generated tokens
        logits = model(Inputs(ids, torch.ones_like(ids), types, x.pixel_values)).logits[0, x.input_ids.shape[1] - 1:]
    assert logits.argmax(-1).tolist() == res.token_ids[:n]
    logp = torch.log_softmax(logits.float(), -1)
    assert max(abs(float(logp[i, t]) - s.logprob) for i, (t, s) in enumerate(zip(res.token_ids, res.steps))) <= 1e-4
