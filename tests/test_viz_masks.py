"""The attention-mask visualizer: golden terminal renderings (short prompt with window=3, an
image prompt on a tiny config, a long prompt that is elided), every panel equal to the
`hook_mask` its layers really use, colour rules, and no weights read.

Set UPDATE_GOLDEN=1 to rewrite the golden files after an intended change.
"""

from __future__ import annotations

import copy
import inspect
import io
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from gemma3_lab.config import Gemma3Config, TextConfig, VisionConfig, pattern_layer_types
from gemma3_lab.explorer import Gemma3
from gemma3_lab.viz.mask_visualizer import AttentionMaskVisualizer
from gemma3_lab.viz.maskset import CUT, IMAGE
from gemma3_lab.viz.terminal import shown_indices

GOLDEN = Path(__file__).parent / "golden"
SHORT = "The quick brown fox jumps over the lazy dog"


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text + "\n", encoding="utf-8")
    assert text + "\n" == path.read_text(encoding="utf-8"), f"{name} changed; UPDATE_GOLDEN=1 rewrites it"


def tiny_config() -> Gemma3Config:
    """4 layers (local, global, local, global), window 3, images of 4 soft tokens (a 2×2 grid)."""
    text = TextConfig(vocab_size=262_144, hidden_size=16, intermediate_size=32, num_layers=4, num_heads=2,
                      num_kv_heads=1, head_dim=8, query_pre_attn_scalar=8, sliding_window=3,
                      layer_types=pattern_layer_types(4, 2))
    vision = VisionConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, image_size=28, patch_size=7)
    return Gemma3Config(text, vision, name="tiny-mm", mm_tokens_per_image=4)


def picture(w: int = 40, h: int = 30) -> Image.Image:
    return Image.new("RGB", (w, h), (200, 60, 40))


def hook_masks(model, inputs) -> list[torch.Tensor]:
    # one logit row is enough: the masks are what is compared, and 844 × 262k logits are slow
    # (the hooks API of issue 4 says so with return_logits=False, the earlier one logits_to_keep)
    params = inspect.signature(model.run_with_cache).parameters
    fast = {"return_logits": False} if "return_logits" in params else {"logits_to_keep": 1}
    _, cache = model.run_with_cache(inputs, names_filter="*hook_mask", **fast)
    return [cache["mask", i] for i in range(model.config.text.num_layers)]


def assert_panels_are_hook_masks(view, masks) -> None:
    """Every layer sits in exactly one panel, and that panel's cells are its hook_mask."""
    seen = []
    for p in view.panels:
        for i in p.layers:
            m = masks[i]
            assert m.shape[:2] == (1, 1)
            assert torch.equal(p.mask, m[0, 0]), f"panel {p.title!r} differs from layer {i}'s hook_mask"
            seen.append(i)
    assert sorted(seen) == list(range(len(masks)))


# ------------------------------------------------------------------------- goldens
def test_golden_short_window3(real_model):
    vis = AttentionMaskVisualizer(real_model, window=3, color=False, width=100)
    view = vis.view(SHORT)
    check_golden("masks_short_window3.txt", view.text(width=100))
    titles = [p.title.split(" · ")[0] for p in view.panels]
    assert titles == ["local ×15: L0–4, L6–10, L12–16", "global ×3: L5, L11, L17"]
    assert view.masks.labels[0] == "<bos>"  # transformers' visualizer drops it (docs/gemma3.md §8)


def test_golden_image_tiny_config(real_model):
    vis = AttentionMaskVisualizer(tiny_config(), tokenizer=real_model.tokenizer, color=False, width=100)
    view = vis.view("Look: <start_of_image> What is it?", images=[picture()])
    check_golden("masks_image_tiny.txt", view.text(width=100))
    s = view.masks.spans()[0]
    assert view.masks.labels[s.start:s.end] == ["img0·0", "img0·1", "img0·2", "img0·3"]
    assert view.masks.labels[s.start - 1] == "<start_of_image>"
    assert view.masks.labels[s.end] == "<end_of_image>"
    local = view.panels[0].classes
    # soft tokens see later soft tokens of their image, in a local layer too (docs/gemma3.md §3.3)
    assert local[s.start, s.end - 1] == IMAGE and local[s.end - 1, s.start] == CUT


def test_golden_long_prompt_elided(real_model, long_prompt):
    vis = AttentionMaskVisualizer(real_model, color=False, width=100)
    view = vis.view(long_prompt)
    text = view.text(width=100)
    check_golden("masks_long_elided.txt", text)
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "⋯" in text and "⋮" in text


def test_elision_keeps_first_and_last():
    assert shown_indices(10, 20, 100) == list(range(10))
    idx = shown_indices(900, 20, 100)
    assert idx[0] == 0 and idx[-1] == 899 and idx.count(-1) == 1
    assert 20 + 2 * len(idx) - 1 <= 100


# ------------------------------------------------------------------------- truth
def test_panels_equal_hook_mask_window3(real_model):
    """The real 270M run with its sliding window set to 3 uses exactly the drawn masks."""
    model = copy.copy(real_model)  # shares the weights; only the config (window) differs
    model.config = model.config.replace(text=model.config.text.replace(sliding_window=3))
    view = AttentionMaskVisualizer(real_model, window=3).view(SHORT)
    assert_panels_are_hook_masks(view, hook_masks(model, view.masks.inputs))


def test_panels_equal_hook_mask_window_cuts(real_model, long_prompt):
    """A prompt longer than the window (160 tokens, window 64 — 844 tokens through the real
    512 would cost a minute of CPU for the same code path): the local panel cuts, and still
    equals every local layer's mask."""
    model = copy.copy(real_model)
    model.config = model.config.replace(text=model.config.text.replace(sliding_window=64))
    ids = real_model.tokenizer.encode(long_prompt)[:160]
    view = AttentionMaskVisualizer(real_model, window=64).view(real_model.tokenizer.decode(ids[1:]))
    assert view.panels[0].window_cuts and view.masks.n_tokens > 64
    assert_panels_are_hook_masks(view, hook_masks(model, view.masks.inputs))


def test_panels_equal_hook_mask_images(real_model):
    """Two images, one with pan-and-scan crops: every block bidirectional, as the model runs it."""
    cfg = tiny_config()
    torch.manual_seed(0)
    model = Gemma3(cfg, real_model.tokenizer).eval()
    vis = AttentionMaskVisualizer(model)
    view = vis.view("A <start_of_image> and B <start_of_image> done", images=[picture(), picture(900, 300)],
                    pan_and_scan=True)
    assert len(view.masks.spans()) == 1 + 1 + 3  # image 0, image 1 and its three crops
    assert_panels_are_hook_masks(view, hook_masks(model, view.masks.inputs))


# ------------------------------------------------------------------------- sources, colour, HTML
def test_text_only_tokenizer_still_shows_soft_tokens():
    """The name "gemma-3-4b" alone: its preset config, the bundled 270M tokenizer (which has no
    <image_soft_token>), no weights, and no picture given."""
    vis = AttentionMaskVisualizer("gemma-3-4b")
    assert vis.source.tokenizer.image_token_id is None
    view = vis.view("<img>What is this?")
    assert view.masks.placeholder_images
    s = view.masks.spans()[0]
    assert s.end - s.start == 256 and view.masks.labels[s.start] == "img0·0"
    assert int(view.masks.inputs.token_types.sum()) == 256


def test_from_folder_reads_no_weights(real_folder, monkeypatch):
    import gemma3_lab.loading.hf as hf

    def refuse(*a, **k):
        raise AssertionError("the visualizer must not load weights")

    monkeypatch.setattr(hf, "load_hf_state_dict", refuse)
    vis = AttentionMaskVisualizer(str(real_folder), window=3, color=False, width=100)
    golden = (GOLDEN / "masks_short_window3.txt").read_text(encoding="utf-8").splitlines()
    assert vis.view(SHORT).text(width=100).splitlines()[1:] == golden[1:]  # line 0 names the source


def test_colour_rules(real_model, monkeypatch):
    out = io.StringIO()
    AttentionMaskVisualizer(real_model, window=3, stream=out)(SHORT)  # not a TTY: plain
    assert "\033[" not in out.getvalue() and "■" in out.getvalue()

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    AttentionMaskVisualizer(real_model, window=3, stream=tty)(SHORT)
    assert "\033[92m■" in tty.getvalue()  # the diagonal in green
    monkeypatch.setenv("NO_COLOR", "1")
    tty = Tty()
    AttentionMaskVisualizer(real_model, window=3, stream=tty)(SHORT)
    assert "\033[" not in tty.getvalue()


def test_html_repr(real_model):
    view = AttentionMaskVisualizer(real_model, window=3).view(SHORT)
    h = view._repr_html_()
    assert h.startswith("<pre") and "local ×15" in h and "&lt;bos&gt;" in h and "color:" in h


def test_bad_arguments(real_model):
    vis = AttentionMaskVisualizer(real_model)
    with pytest.raises(ValueError, match="one prompt"):
        vis.view(["a", "b"])
    with pytest.raises(ValueError, match="positive"):
        vis.view("a", window=0)
    with pytest.raises(FileNotFoundError, match="preset"):
        AttentionMaskVisualizer("no-such-model")
