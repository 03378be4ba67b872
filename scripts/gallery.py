"""`python scripts/gallery.py OUT_DIR`: every visual of `gemma3_lab.viz` for one fixed
example, as PNG files (plus the terminal and HTML mask renderings): the real 270M for text,
`demo-multimodal` (untrained vision, labelled so) for images."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from gemma3_lab.viz.scene import scene

TEXT_PROMPT = "The capital of France is Paris. The capital of Italy is"
IMAGE_PROMPT = "<start_of_image> Where is the sun in this picture?"
TEXT_NAMES = ["blocks.*.attn.hook_pattern", "blocks.*.attn.hook_mask", "blocks.0.hook_resid_pre",
              "blocks.*.hook_resid_post"]
IMAGE_NAMES = ["blocks.*.attn.hook_pattern", "blocks.*.attn.hook_mask"]


class Writer:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.written: list[Path] = []

    def png(self, name: str, fig) -> None:
        import matplotlib.pyplot as plt

        path = self.out / f"{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        self._done(path)

    def text(self, name: str, text: str) -> None:
        path = self.out / name
        path.write_text(text + "\n", encoding="utf-8")
        self._done(path)

    def _done(self, path: Path) -> None:
        self.written.append(path)
        print(f"  wrote {path}", flush=True)


def text_visuals(w: Writer, long_prompt: str | None = None) -> None:
    import gemma3_lab as gl
    from gemma3_lab.viz import attention as A
    from gemma3_lab.viz import lens as LV
    from gemma3_lab.viz.atlas import mask_atlas
    from gemma3_lab.viz.common import token_labels
    from gemma3_lab.viz.mask_visualizer import AttentionMaskVisualizer

    model = gl.load(progress=False)
    vis = AttentionMaskVisualizer(model, window=4)
    view = vis.view(TEXT_PROMPT)
    w.text("01_masks_terminal.txt", view.text(width=110))
    w.text("01_masks_terminal.html", view._repr_html_())
    w.png("01_masks_window4", view.figure())
    w.png("02_mask_atlas_window4", mask_atlas(view.masks))
    w.png("03_masks_real_window", AttentionMaskVisualizer(model).view(TEXT_PROMPT).figure())
    if long_prompt:
        long_view = AttentionMaskVisualizer(model).view(long_prompt)
        w.text("04_masks_long_terminal.txt", long_view.text(width=110))
        w.png("04_masks_long", long_view.figure())

    inputs = model.processor(TEXT_PROMPT)
    logits, cache = model.run_with_cache(inputs, names_filter=TEXT_NAMES)
    tokens = token_labels(model.tokenizer, inputs.input_ids, model.config)
    w.png("05_attention_L5_H0", A.attention_heatmap(cache, 5, 0, tokens))
    w.png("06_attention_L3_all_heads", A.head_grid(cache, 3, tokens))
    w.png("07_where_does_last_token_look", A.token_view(cache, len(tokens) - 1, tokens))
    w.png("08_logit_lens", LV.logit_lens_grid(cache.logit_lens(5), config=model.config))
    w.png("09_residual_norms", LV.residual_norms(cache, tokens))
    bits = LV.surprisal_bits(logits, inputs.input_ids)
    w.png("10_surprisal", LV.surprisal_text(tokens, bits, config=model.config))
    w.text("10_surprisal.html", LV.surprisal_html(tokens, bits))


def image_visuals(w: Writer) -> None:
    import gemma3_lab as gl
    from gemma3_lab.viz import images as I
    from gemma3_lab.viz.mask_visualizer import AttentionMaskVisualizer

    model = gl.load("demo-multimodal", progress=False)
    img = scene()
    inputs = model.processor(IMAGE_PROMPT, images=[img], pan_and_scan=True)
    view = AttentionMaskVisualizer(model).view(inputs)
    w.text("11_image_masks_terminal.txt", view.text(width=110))
    w.png("11_image_masks", view.figure())
    w.png("12_token_strip", I.token_strip(inputs, model.tokenizer, model.config))
    w.png("13_picture_crops_grid", I.picture_grid(inputs, config=model.config))
    _, cache = model.run_with_cache(inputs, names_filter=IMAGE_NAMES)
    t = model.config.text
    w.png("14_image_attention_global_mean", I.image_attention(cache, inputs, layers=t.global_layers))
    w.png("15_image_attention_L3_H0", I.image_attention(cache, inputs, layers=[3], heads=[0]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gemma3_lab.viz.gallery", description=__doc__)
    ap.add_argument("out_dir", help="folder for the PNG files (created if missing)")
    ap.add_argument("--only", choices=["text", "images"], default=None, help="draw one half of the gallery")
    ap.add_argument("--long-prompt", default=None, help="a text file drawn as a long, elided mask too")
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    w = Writer(out)
    t0 = time.time()
    if args.only in (None, "text"):
        print("text visuals (gemma-3-270m):", flush=True)
        long_prompt = Path(args.long_prompt).read_text(encoding="utf-8") if args.long_prompt else None
        text_visuals(w, long_prompt)
    if args.only in (None, "images"):
        print("image visuals (demo-multimodal, untrained vision):", flush=True)
        image_visuals(w)
    print(f"{len(w.written)} files in {out} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
