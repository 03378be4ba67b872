"""The vision tower, the projector and the whole image path equal transformers'
Gemma3ForConditionalGeneration on tiny random checkpoints it saved, in both key layouts:
two images in one prompt, a left-padded batch, an out-of-vocabulary soft-token id."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from gemma3_lab.load import build
from gemma3_lab.loading.hf import load_hf_state_dict
from gemma3_lab.prompt.inputs import Inputs
from gemma3_lab.prompt.processor import pad_left

pytestmark = pytest.mark.oracle

TEXT = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=7, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, sliding_window=6, query_pre_attn_scalar=24)
# 28 px / patch 7 = 4×4 patches, pooled 2×2 to 4 tokens per image (the real 64×64 -> 16×16 in miniature)
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=28,
              patch_size=7, vision_use_head=False)
BOI, EOI = 297, 298


def _hf_model(image_token: int):
    import transformers

    cfg = transformers.Gemma3Config(text_config=TEXT, vision_config=VISION, mm_tokens_per_image=4,
                                    boi_token_index=BOI, eoi_token_index=EOI, image_token_index=image_token)
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # norms and the projection start at zero: randomise them
        for n, p in hf.named_parameters():
            if "norm" in n or "mm_input_projection" in n:
                p.normal_(0.0, 0.3)
    return hf


def _save(hf, folder, layout: str):
    """Write the checkpoint as the Hub files have it, or in transformers 5's own names."""
    if layout == "current":
        hf.save_pretrained(folder, save_original_format=False)
        keys = load_file(folder / "model.safetensors").keys()
        assert "model.language_model.layers.0.self_attn.q_proj.weight" in keys
        assert "model.vision_tower.encoder.layers.0.self_attn.q_proj.weight" in keys
        return folder
    hf.save_pretrained(folder)
    # a model built from scratch saves vision_tower.encoder.*; Hub files nest vision_model.
    path = folder / "model.safetensors"
    state = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in load_file(path).items()}
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in state
    save_file(state, path, metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module", params=["original_hub", "current"])
def pair(request, tmp_path_factory):
    hf = _hf_model(image_token=299)
    folder = _save(hf, tmp_path_factory.mktemp(request.param), request.param)
    config, state = load_hf_state_dict(folder, progress=False)
    return hf, build(config, state)


def _prompt(n_text_before: int, n_images: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    ids = [2] + torch.randint(5, 290, (n_text_before,), generator=g).tolist()
    for _ in range(n_images):
        ids += [BOI] + [299] * 4 + [EOI] + torch.randint(5, 290, (3,), generator=g).tolist()
    return ids


def _batch(rows: list[list[int]], image_token: int = 299):
    """(ids, attention_mask, token_types), left-padded as the processor does."""
    x = pad_left([[image_token if i == 299 else i for i in r] for r in rows], 0)
    return x.input_ids, x.attention_mask, (x.input_ids == image_token).long()


def _hf_logits(hf, ids, mask, types, pixels, impl):
    hf.config._attn_implementation = impl
    for sub in (hf.config.text_config, hf.config.vision_config):
        sub._attn_implementation = impl
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, token_type_ids=types, pixel_values=pixels,
                  position_ids=pos).logits


def _ours(model, ids, mask, types, pixels, path):
    model.set_attention_path(path)
    try:
        with torch.no_grad():
            return model(Inputs(ids, mask, types, pixels)).logits
    finally:
        model.set_attention_path("sdpa")


PATHS = [("explicit", "eager"), ("sdpa", "sdpa")]


@pytest.mark.parametrize("path,impl", PATHS)
def test_tower_and_projector_match(pair, path, impl):
    hf, ours = pair
    pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    hf.config.vision_config._attn_implementation = impl
    ours.vision.set_attention_path(path)
    with torch.no_grad():
        ref = hf.model.vision_tower(pixel_values=pixels).last_hidden_state
        got = ours.vision(pixels)
        ref_p, got_p = hf.model.multi_modal_projector(ref), ours.projector(got)
    ours.vision.set_attention_path("sdpa")
    assert got.shape == (3, 16, 32) and got_p.shape == (3, 4, 64)
    assert (got - ref).abs().max() <= 1e-5
    assert (got_p - ref_p).abs().max() <= 1e-5


@pytest.mark.parametrize("path,impl", PATHS)
def test_two_images_in_one_prompt(pair, path, impl):
    hf, ours = pair
    ids, mask, types = _batch([_prompt(5, 2, seed=2)])
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    got = _ours(ours, ids, mask, types, pixels, path)
    ref = _hf_logits(hf, ids, mask, types, pixels, impl)
    assert (got - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("path,impl", PATHS)
def test_left_padded_batch_of_two(pair, path, impl):
    hf, ours = pair
    # row 0: one image, padded on the left; row 1: two images. Pixels in (batch, prompt) order.
    ids, mask, types = _batch([_prompt(2, 1, seed=4), _prompt(6, 2, seed=5)])
    assert mask[0, 0] == 0
    pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(6))
    got = _ours(ours, ids, mask, types, pixels, path)
    ref = _hf_logits(hf, ids, mask, types, pixels, impl)
    real = mask.bool()  # padded query rows carry no meaning (docs/gemma3.md §3.4)
    assert (got - ref)[real].abs().max() <= 1e-5


@pytest.mark.parametrize("path,impl", PATHS)
def test_bfloat16_image_features_are_exact(tmp_path, path, impl):
    """In bfloat16 the tower, pool, norm and projection round exactly as transformers does."""
    hf = _hf_model(image_token=299)
    config, state = load_hf_state_dict(_save(hf, tmp_path, "current"), dtype=torch.bfloat16, progress=False)
    ours = build(config, state)
    hf = hf.to(torch.bfloat16)
    hf.config.vision_config._attn_implementation = impl
    ours.set_attention_path(path)
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(11))
    ids, mask, types = _batch([_prompt(3, 2, seed=12)])
    with torch.no_grad():
        ref = hf.model.get_image_features(pixel_values=pixels.to(torch.bfloat16)).pooler_output
        _, cache = ours.run_with_cache(Inputs(ids, mask, types, pixels), names_filter="hook_image_features")
    assert cache["hook_image_features"].dtype == torch.bfloat16
    assert torch.equal(cache["hook_image_features"], ref)


def test_soft_token_outside_the_vocabulary(tmp_path):
    """262144 is past a 262144-row vocabulary (the 270M's): the slot looks up <pad> and is overwritten."""
    hf = _hf_model(image_token=300)
    config, state = load_hf_state_dict(_save(hf, tmp_path, "current"), progress=False)
    ours = build(config, state)
    ids, mask, types = _batch([_prompt(4, 2, seed=7)], image_token=300)
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(8))
    got = _ours(ours, ids, mask, types, pixels, "sdpa")
    ref = _hf_logits(hf, ids, mask, types, pixels, "sdpa")
    assert (got - ref).abs().max() <= 1e-5


def test_vision_hook_points(pair):
    _, ours = pair
    names = set(ours.hook_names())
    expected = {
        "vision.hook_patch_embed", "vision.hook_embed", "vision.blocks.0.hook_resid_pre",
        "vision.blocks.1.hook_resid_post", "vision.blocks.0.attn.hook_pattern", "vision.hook_post_layernorm",
        "projector.hook_pooled", "projector.hook_out", "hook_image_features",
    }
    assert expected <= names
    ids, mask, types = _batch([_prompt(3, 1, seed=9)])
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(10))
    logits, cache = ours.run_with_cache(Inputs(ids, mask, types, pixels),
                                        names_filter=lambda n: n.startswith(("vision.", "projector.")))
    pattern = cache["vision.blocks.1.attn.hook_pattern"]
    assert pattern.shape == (1, 4, 16, 16)  # (images, heads, patches, patches): no mask, every patch sees all
    assert torch.allclose(pattern.sum(-1), torch.ones(1, 4, 16))
    pooled = cache["projector.hook_pooled"]  # (images, 4, C): token (r, c) is the mean of its 2×2 patch block
    patches = cache["vision.hook_post_layernorm"].view(1, 4, 4, 32)  # (images, row, col, C)
    assert torch.allclose(pooled[0, 1], patches[0, 0:2, 2:4].mean((0, 1)), atol=1e-6)
    with torch.no_grad():
        plain = ours(Inputs(ids, mask, types, pixels)).logits
    assert (logits - plain).abs().max() <= 1e-5  # the hooked (explicit) path is the same model


def test_wrong_pixel_size_is_refused(pair):
    _, ours = pair
    with pytest.raises(ValueError, match=r"28×28"):
        ours.vision(torch.zeros(1, 3, 32, 32))


@pytest.mark.real
def test_load_folder_and_generate_with_an_image(tmp_path, real_folder):
    """A 4B-style folder (262208-row vocabulary, tokenizer with <image_soft_token>) through
    gl.load and model.generate, greedy tokens equal to transformers' generate."""

    import numpy as np
    import transformers
    from PIL import Image
    from tokenizers import AddedToken

    import gemma3_lab as gl
    from gemma3_lab.prompt.tokenizer import Tokenizer

    cfg = transformers.Gemma3Config(
        text_config={**TEXT, "vocab_size": 262208}, vision_config=VISION, mm_tokens_per_image=4)
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n or "mm_input_projection" in n:
                p.normal_(0.0, 0.3)
    hf.save_pretrained(tmp_path)
    tok = Tokenizer.from_file(real_folder / "tokenizer.json")
    tok.backend.add_special_tokens([AddedToken("<image_soft_token>", normalized=False, special=True)])
    tok.save(tmp_path)
    model = gl.load(tmp_path, progress=False)
    assert model.config.is_multimodal and model.tokenizer.image_token_id == 262144
    yy, xx = np.mgrid[0:50, 0:70]
    picture = Image.fromarray(np.stack([xx * 3, yy * 5, (xx + yy) % 256], -1).astype(np.uint8))
    messages = [{"role": "user", "content": [{"type": "image", "image": picture}, {"type": "text", "text": "Hi"}]}]
    res = model.generate(messages, max_new_tokens=5)
    x = res.inputs
    assert x.pixel_values.shape == (1, 3, 28, 28) and int(x.token_types.sum()) == 4
    with torch.no_grad():
        ref = hf.generate(input_ids=x.input_ids, attention_mask=x.attention_mask, token_type_ids=x.token_types,
                          pixel_values=x.pixel_values, max_new_tokens=len(res.token_ids), do_sample=False)
    assert ref[0, x.input_ids.shape[1]:].tolist() == res.token_ids
