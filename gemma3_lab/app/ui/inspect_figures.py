"""The inspector's figures for download, drawn on request (the views above them are drawn in
the browser): the layer's attention, its mask with a legend and the logit lens, each as a
lossless PNG (the pixels shown) and an SVG (labels as text), with the look's tables as CSV."""

from __future__ import annotations

import gradio as gr

from gemma3_lab.app.ui.checks import TOAST_SECONDS, SettingsError
from gemma3_lab.app.ui.figures import download_folder, heatmap_figure, layer_mask_figure, lens_figure, to_files
from gemma3_lab.app.ui.inspector import lens_long_rows, lens_rows, lens_span, look, topk_rows
from gemma3_lab.app.ui.registry import ModelRegistry
from gemma3_lab.app.ui.session import Session
from gemma3_lab.errors import Gemma3LabError
from gemma3_lab.viz.downloads import table_csv

LENS_HEADER = ("after", "top-1", "p", "top-2", "p", "top-3", "p")


def make_figures(registry: ModelRegistry):
    def inspect_figures(column, index, layer, head, session: Session, position=None):
        """The inspected look's figures (attention, mask, logit lens) and every file to download:
        PNG and SVG of each figure, CSV of the candidates, attended keys and lens table."""
        try:
            ins, run, model, known = look(registry, session, column, index, layer, head, position)
            lens = lens_span(model, run.capture, ins.query)
        except (LookupError, SettingsError, Gemma3LabError) as e:
            raise gr.Error(str(e.args[0] if e.args else e), duration=TOAST_SECONDS) from None
        folder = download_folder(session)
        stem = f"{column}_slot{ins.query}_L{ins.layer}_" + ("all_heads" if ins.head < 0 else f"head{ins.head}")
        heat, files = to_files(heatmap_figure(ins), folder, f"{stem}_attention")
        mask, more = to_files(layer_mask_figure(ins), folder, f"{column}_L{ins.layer}_mask")
        files += more
        lens_img, more = to_files(lens_figure(lens, model.config), folder, f"{column}_slot{ins.query}_logit_lens")
        files += more
        tables = {"candidates": (topk_rows(ins.step), ("token", "id", "p")),
                  "attended": (ins.attended, ("position", "token", "attention weight")),
                  "logit_lens": (lens_rows(lens), LENS_HEADER[: 1 + 2 * lens.top_probs.shape[-1]]),
                  "logit_lens_slots": (lens_long_rows(known), ("slot", "token") + LENS_HEADER)}
        for name, (rows, header) in tables.items():
            path = folder / f"{stem}_{name}.csv"
            path.write_text(table_csv(rows, header), encoding="utf-8")
            files.append(str(path))
        return heat, mask, lens_img, files

    return inspect_figures
