"""The web app driven through `gradio_client`, as a script would: both columns generate, the
numbers it returns are the library's, bad requests come back as messages and the app keeps
answering. The app runs in a thread of this process on a free port."""

from __future__ import annotations

import base64
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

from gemma3_lab.load import BUNDLED  # noqa: E402

pytestmark = pytest.mark.real
PROMPT = "The capital of France is"
N = 5  # new tokens per column: the CPU is shared, keep every call short


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_folder(path: Path, tokenizer_json: Path) -> Path:
    """A 2-layer random Gemma 3 with the real vocabulary and a 64-token context, as an HF folder."""
    from gemma3_lab.config import Gemma3Config, TextConfig, pattern_layer_types
    from gemma3_lab.explorer import Gemma3
    from gemma3_lab.loading.hf import save_hf_folder

    text = TextConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                      query_pre_attn_scalar=16, sliding_window=8, layer_types=pattern_layer_types(2),
                      max_position_embeddings=64)
    cfg = Gemma3Config(text=text, name="tiny")
    torch.manual_seed(0)
    model = Gemma3(cfg)
    model.init_buffers()
    save_hf_folder(cfg, model.state_dict(), path)
    shutil.copy(tokenizer_json, path / "tokenizer.json")
    return path


@pytest.fixture(scope="module")
def app(tmp_path_factory, real_folder):
    from gemma3_lab.app.ui import ModelRegistry, build_app

    root = tmp_path_factory.mktemp("models")
    tiny_folder(root / "tiny", real_folder / "tokenizer.json")
    demo = build_app(ModelRegistry(root=root))
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    demo.url = f"http://127.0.0.1:{port}/"
    demo.root = root
    yield demo
    demo.close()


@pytest.fixture(scope="module")
def model(app):
    return app.registry.get(BUNDLED).model


@pytest.fixture()
def client(app):
    return Client(app.url, verbose=False)


def settings(**changes) -> dict:
    base = {"prompt": PROMPT, "chat": False, "images": []}
    for c in "ab":
        base.update({f"{c}_model": BUNDLED, f"{c}_decoding": "greedy", f"{c}_temperature": 1.0, f"{c}_top_k": 0,
                     f"{c}_top_p": 1.0, f"{c}_seed": 0, f"{c}_max_new_tokens": N, f"{c}_pan_and_scan": False})
    base.update(changes)
    return base


def generate(client, **changes) -> dict:
    """The `generate` endpoint's last output: the results JSON."""
    return client.predict(**settings(**changes), api_name="/generate")[-1]


def test_endpoints_are_named(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/generate", "/stop", "/inspect", "/mask_atlas", "/image_attention", "/compare", "/explain"} <= names


def test_both_columns_generate_and_equal_the_library(client, model):
    out = generate(client, b_decoding="sample", b_temperature=0.8, b_top_k=40, b_seed=7)
    greedy = model.generate(PROMPT, max_new_tokens=N)
    sampled = model.generate(PROMPT, max_new_tokens=N, do_sample=True, temperature=0.8, top_k=40, seed=7)
    a, b = out["A"], out["B"]
    assert a["token_ids"] == greedy.token_ids and a["text"] == greedy.text
    # A and B share a model, so the app decodes them as one batch of two: its float32 rounding
    # differs from a one-row run's in the 6th decimal
    assert a["probs"] == pytest.approx([s.prob for s in greedy.steps], abs=1e-5)
    assert b["token_ids"] == sampled.token_ids and b["stop_reason"] == sampled.stop_reason
    assert out["first_divergence"] == greedy.first_divergence(sampled)
    assert a["done"] and b["done"] and a["prompt_tokens"] == len(greedy.prompt_ids)


def test_columns_decode_fast_and_say_so(client, model):
    """Both columns with no intervention decode as one batch through the lean step, captured
    for the inspector all the same (after the last step, in one forward); an intervention
    in B sends both back to the plain forward, recorded as it runs. Each status names its step."""
    def statuses(outs) -> list[str]:
        return [o for o in outs if isinstance(o, str) and "decode step:" in o]

    from gemma3_lab.model import native_decode

    fast = statuses(client.predict(**settings(), api_name="/generate"))
    rows_step = "native" if native_decode.why_not(model) is None else "lean"  # the lean step in C, where built
    assert len(fast) == 2 and all(f"decode step: {rows_step}" in s for s in fast), fast
    hooked = statuses(client.predict(**settings(b_intervention="ablate heads", b_layer=0, b_heads="0, 1"),
                                     api_name="/generate"))
    assert len(hooked) == 2 and all("decode step: plain" in s for s in hooked), hooked


def test_inspector_numbers_come_from_the_library(client, model):
    generate(client)
    column, index, position, header, topk, attended, layer, head, view, lens_view, lens_table, data = client.predict(
        column="A", index=2, layer=5, head=-1, api_name="/inspect")
    res = model.generate(PROMPT, max_new_tokens=N)
    step = res.steps[2]
    # both columns decode as one batch of two: the same tokens, probabilities to float32 rounding
    assert [row[:2] for row in data["top_k"]] == [[p, i] for (p, _), i in zip(step.top_k, step.top_k_ids)]
    assert [row[2] for row in data["top_k"]] == pytest.approx([q for _, q in step.top_k], abs=1e-5)
    assert data["query_position"] == step.position - 1 and data["layer_type"] == "global"
    ids = torch.tensor([res.prompt_ids + res.token_ids[:-1]])
    _, cache = model.run_with_cache(ids, names_filter=["blocks.5.attn.hook_pattern"])
    row = cache["pattern", 5][0, :, step.position - 1].float().mean(0)
    for pos, _, w in data["attended"]:  # the capture keeps patterns in float16
        assert w == pytest.approx(float(row[pos]), abs=1e-3)
    assert f"p = {step.prob:.4f}" in header
    # the browser's attention view opens pinned at that query, layer and head, with its numbers
    q = step.position - 1
    assert (view["query"], view["layer"], view["head"]) == (q, 5, "all") and q in view["positions"]
    heads = view_row(view, 5, q)  # (N, T) in the view's units
    exact = cache["pattern", 5][0, :, q].double().numpy() * view["scale"]
    T = exact.shape[1]  # keys computed; the view also shows the last generated token, never attended to
    assert np.abs(heads[:, :T] - exact).max() <= 0.5 + 1e-3 * view["scale"] and not heads[:, T:].any()
    assert lens_view["kind"] == "lens" and lens_view["positions"][lens_view["query"]] == q


def view_row(view: dict, layer: int, query: int) -> np.ndarray:
    """(N, T) weights (in units of 10**-decimals) of slot `query` at `layer`, decoded as views.js does."""
    L = next(x for x in view["layers"] if x["layer"] == layer)
    w = np.frombuffer(base64.b64decode(L["data"]), "<u2").reshape(view["n_heads"], -1)
    r = view["positions"].index(query)
    start, lo, n = sum(L["len"][:r]), L["lo"][r], L["len"][r]
    out = np.zeros((view["n_heads"], len(view["tokens"])))
    out[:, lo: lo + n] = w[:, start: start + n]
    return out


class Forwards:
    """Counts forwards of a model (a forward pre-hook on the network)."""

    def __init__(self, *models):
        self.n = 0
        self.handles = [m.register_forward_pre_hook(self.count) for m in models]

    def count(self, module, args):
        self.n += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def test_inspect_any_position_from_the_capture(client, model):
    """A prompt slot: the next-token distribution, attention row and logit lens equal one
    run_with_cache at that slot, and no look runs the model."""
    out = generate(client)
    ids = torch.tensor([out["A"]["token_ids"]])
    seq = torch.cat([model.to_inputs(PROMPT).input_ids, ids[:, :-1]], 1)
    logits, cache = model.run_with_cache(seq, names_filter=["blocks.3.attn.hook_pattern", "blocks.0.hook_resid_pre",
                                                            "blocks.*.hook_resid_post"])
    lens = cache.logit_lens(k=3)
    for column, pos, layer, head in [("A", 2, 3, -1), ("B", 4, 3, 1), ("A", seq.shape[1] - 1, 3, 0)]:
        with Forwards(model) as f:
            *_, lens_table, data = client.predict(column=column, index=None, position=pos, layer=layer, head=head,
                                                  api_name="/inspect")
            client.predict(column=column, api_name="/mask_atlas")
        assert f.n == 0
        assert data["position"] == data["query_position"] == pos and data["index"] is None
        probs = logits[0, pos].float().softmax(-1)
        top = torch.topk(probs, 5)
        assert [i for _, i, _ in data["top_k"]] == top.indices.tolist()
        # the capture ran every layer on the explicit path, run_with_cache only layer 3: float32 rounding
        assert [p for *_, p in data["top_k"]] == pytest.approx(top.values.tolist(), rel=1e-4, abs=1e-6)
        row = cache["pattern", layer].to_dense()[0, :, pos].float()
        row = row.mean(0) if head == -1 else row[head]
        for j, _, w in data["attended"]:
            assert w == pytest.approx(float(row[j]), abs=1e-3)
        for r, got in enumerate(lens_table["data"]):
            assert got[1] == lens.top_tokens[r][pos][0]
            assert got[2] == pytest.approx(float(lens.top_probs[r, pos, 0]), abs=1e-4)
    with pytest.raises(Exception, match="there is no position 99"):
        client.predict(column="A", index=None, position=99, layer=0, head=-1, api_name="/inspect")


def test_the_lens_table_fills_every_slot_from_the_capture(client, model):
    """"Fill the lens table": every slot × every layer, equal to one run_with_cache's
    cache.logit_lens, with a status line per chunk and no forward; later looks show every slot
    with the inspected one marked."""
    from gemma3_lab.viz.common import printable

    out = generate(client)
    ids = torch.tensor([out["A"]["token_ids"]])
    seq = torch.cat([model.to_inputs(PROMPT).input_ids, ids[:, :-1]], 1)
    _, cache = model.run_with_cache(seq, names_filter=["blocks.0.hook_resid_pre", "blocks.*.hook_resid_post"])
    lens = cache.logit_lens(k=3)
    T = seq.shape[1]
    client.predict(column="A", index=None, position=2, layer=0, head=-1, api_name="/inspect")  # a look: slot 2 only
    with Forwards(model) as f:
        job = client.submit(column="A", api_name="/logit_lens_all")
        view, status = job.result()
        *_, lens_view, lens_table, data = client.predict(column="A", index=None, position=3, layer=0, head=-1,
                                                          api_name="/inspect")
    assert f.n == 0
    assert f"all {T} slots" in status and "computed now" in status
    assert any("about" in o[1] and "left" in o[1] for o in job.outputs()[:-1])  # progress before the end
    assert view["positions"] == list(range(T)) and view["layers"] == lens.layer_labels and view["k"] == 3
    got = np.array(view["probs"]) / view["scale"]  # (L+1, T, 3)
    assert np.abs(got - lens.top_probs.numpy()).max() <= 0.5 / view["scale"] + 1e-5
    pieces = [[[view["pieces"][c] for c in cell] for cell in row] for row in view["top"]]
    assert pieces == [[[printable(t) for t in cell] for cell in row] for row in lens.top_tokens]
    assert lens_view["positions"] == list(range(T)) and lens_view["query"] == 3  # a look now shows them all
    assert [r[2] for r in lens_table["data"]] == pytest.approx(lens.top_probs[:, 3, 0].tolist(), abs=1e-4)
    with pytest.raises(Exception, match="column must be A or B"):
        client.predict(column="C", api_name="/logit_lens_all")


def test_dollar_tokens_do_not_blank_the_inspector(client, model):
    """Math-text markers in tokens ($$\\, $x$) are drawn as plain text in every figure."""
    prompt = r"Cost: $$\frac{1}{2}$$ or $5 and $x$"
    out = generate(client, prompt=prompt, a_max_new_tokens=2, b_max_new_tokens=1)
    pieces = [model.tokenizer.id_to_token(i) for i in model.to_inputs(prompt).input_ids[0].tolist()]
    dollars = [i for i, p in enumerate(pieces) if "$" in p]
    assert len(pieces) == out["A"]["prompt_tokens"] and len(dollars) >= 3
    import matplotlib.pyplot as plt

    from gemma3_lab.app.ui.figures import to_image
    from gemma3_lab.viz.common import set_token_ticks

    fig, ax = plt.subplots()
    set_token_ticks(ax, ["$$\\", "$x$", "a $ b $"])  # each alone used to stop the figure (math text)
    assert to_image(fig).size[0] > 100
    for pos in dollars:
        client.predict(column="A", index=None, position=pos, layer=0, head=-1, api_name="/inspect")
        heatmap, mask, lens, files = client.predict(column="A", index=None, position=pos, layer=0, head=-1,
                                                    api_name="/inspect_figures")
        assert all(Path(p).stat().st_size > 5_000 for p in (heatmap, mask, lens))


def test_a_second_generate_replaces_the_running_one(client):
    """Pressed while a generation runs, Generate stops it and runs: never dropped; every status
    names the prompt it belongs to."""
    first = client.submit(**settings(prompt="Once upon a time", a_max_new_tokens=200, b_max_new_tokens=200),
                          api_name="/generate")
    while not first.outputs() or not (first.outputs()[-1][-1].get("A") or {}).get("tokens"):
        assert not first.done(), "finished before the second press"
        time.sleep(0.2)
    second = client.submit(**settings(prompt="Paris is", a_max_new_tokens=3, b_max_new_tokens=3), api_name="/generate")
    old, new = first.result(), second.result()
    assert old[-1]["A"]["stop_reason"] == "stopped" and len(old[-1]["A"]["token_ids"]) < 200
    assert "'Once upon a time'" in old[0] and "replaced by a newer Generate" in old[0]
    assert len(new[-1]["A"]["token_ids"]) == len(new[-1]["B"]["token_ids"]) == 3
    assert "'Paris is'" in new[0] and "'Paris is'" in new[2]


def test_stop_ends_a_long_prefill(client):
    """Stop during the prompt's prefill ends it between chunks: no token is generated."""
    job = client.submit(**settings(prompt="hello " * 3000, a_max_new_tokens=4, b_max_new_tokens=4), api_name="/generate")
    while not job.outputs() or "processing the prompt" not in job.outputs()[-1][0]:
        assert not job.done(), "finished before it could be stopped"
        time.sleep(0.1)
    client.predict(api_name="/stop")
    out = job.result()[-1]
    assert out["A"]["stop_reason"] == out["B"]["stop_reason"] == "stopped"
    assert out["A"]["token_ids"] == [] and out["B"]["token_ids"] == []


def test_ablation_in_b_changes_its_output(client, model):
    from gemma3_lab.instrument.interventions import ablate_heads

    out = generate(client, b_intervention="ablate heads", b_layer=0, b_heads="0, 1, 2, 3")
    assert out["A"]["token_ids"] != out["B"]["token_ids"]
    assert out["B"]["intervention"] == "heads 0, 1, 2, 3 of layer 0 zeroed (hook_z)"
    with model.hooks(ablate_heads(0, [0, 1, 2, 3])):
        assert out["B"]["token_ids"] == model.generate(PROMPT, max_new_tokens=N).token_ids
    assert out["A"]["token_ids"] == model.generate(PROMPT, max_new_tokens=N).token_ids  # hooks left nothing behind


def test_steering_and_patching_run(client):
    out = generate(client, b_intervention="steer", b_layer=6, b_steer_positive="Germany", b_steer_negative="France",
                   b_steer_scale=8.0, a_max_new_tokens=2, b_max_new_tokens=2)
    assert out["A"]["token_ids"] != out["B"]["token_ids"] and out["B"]["error"] is None
    # patching the whole residual from an unchanged column reproduces that column
    out = generate(client, b_intervention="patch from other column", b_layer=17, b_patch_site="resid_post",
                   a_max_new_tokens=2, b_max_new_tokens=2)
    assert out["A"]["token_ids"] == out["B"]["token_ids"]


def test_precision_is_a_column_setting(client, app):
    from gemma3_lab.app.ui.registry import ModelKey

    out = generate(client, b_precision="int4", a_max_new_tokens=3, b_max_new_tokens=3)
    assert (out["A"]["precision"], out["B"]["precision"]) == ("float32", "int4")
    int4 = app.registry.get(ModelKey(BUNDLED, "int4")).model
    assert int4.quantization.startswith("int4")
    assert out["B"]["token_ids"] == int4.generate(PROMPT, max_new_tokens=3).token_ids


def test_compare_tab_is_gemma3_lab_compare(client, app, model):
    from gemma3_lab.analysis.compare import compare
    from gemma3_lab.app.ui.registry import ModelKey

    generate(client, b_precision="int4", a_max_new_tokens=1, b_max_new_tokens=1)
    want = compare(model, app.registry.get(ModelKey(BUNDLED, "int4")).model, PROMPT,
                   labels=(f"A: {BUNDLED}", f"B: {BUNDLED} (int4)"))
    # read from the two captures (the generation's explicit attention path, in prefill chunks),
    # not run again: equal to the library's own run to float32 rounding
    with Forwards(model, app.registry.get(ModelKey(BUNDLED, "int4")).model) as f:
        summary, layers, positions = client.predict(api_name="/compare")
    assert f.n == 0
    assert [row[1] for row in layers["data"]] == pytest.approx(want.resid_rel_error.tolist(), rel=1e-3)
    assert [row[2] for row in positions["data"]] == pytest.approx(want.kl.tolist(), rel=1e-3, abs=1e-5)
    assert [row[3] for row in positions["data"]] == [model.tokenizer.id_to_token(int(i)) for i in want.top1_a]
    assert summary.startswith(f"B: {BUNDLED} (int4) vs A: {BUNDLED} on {len(want.token_ids)} tokens")
    assert "(int4)" in summary
    generate(client, b_model="tiny", a_max_new_tokens=1, b_max_new_tokens=1)
    with pytest.raises(Exception, match="cannot compare gemma-3-270m with"):
        client.predict(api_name="/compare")


def test_compare_measures_an_intervention(client, model):
    """Same model, B steered: the residual is equal before the steered layer and apart after."""
    generate(client, b_intervention="steer", b_layer=6, b_steer_positive="Love", b_steer_negative="Hate",
             b_steer_scale=8.0, a_max_new_tokens=1, b_max_new_tokens=1)
    summary, layers, positions = client.predict(api_name="/compare")
    err = [row[1] for row in layers["data"]]
    assert err[:7] == [0.0] * 7 and all(e > 1e-3 for e in err[7:])  # embed, L0..L5 untouched; L6 on apart
    assert max(row[2] for row in positions["data"]) > 1e-3


def test_mask_atlas_endpoint(client):
    generate(client, a_max_new_tokens=2, b_max_new_tokens=1)
    assert Path(client.predict(column="B", api_name="/mask_atlas")).stat().st_size > 10_000


def test_local_folder_under_the_root(client, app):
    out = generate(client, a_model="tiny", b_model=str(app.root / "tiny"), a_max_new_tokens=3, b_max_new_tokens=3)
    assert out["A"]["token_ids"] == out["B"]["token_ids"] and len(out["A"]["token_ids"]) == 3


def test_stop_ends_the_generation(client):
    job = client.submit(**settings(a_max_new_tokens=200, b_max_new_tokens=200), api_name="/generate")
    while not job.outputs() or not (job.outputs()[-1][-1].get("A") or {}).get("tokens"):
        assert not job.done(), "finished before it could be stopped"
        time.sleep(0.2)
    client.predict(api_name="/stop")
    out = job.result()[-1]
    assert out["A"]["stop_reason"] == "stopped" and len(out["A"]["token_ids"]) < 200


def test_sessions_do_not_share_results(app, client):
    generate(client, a_max_new_tokens=1, b_max_new_tokens=1)
    other = Client(app.url, verbose=False)
    with pytest.raises(Exception, match="has not generated anything"):
        other.predict(column="A", index=0, layer=0, head=-1, api_name="/inspect")
    client.predict(column="A", index=0, layer=0, head=-1, api_name="/inspect")  # the first session still has its own


def test_a_finished_run_keeps_no_pixels():
    """After the request an upload lives on as a thumbnail, its crop boxes scaled to it."""
    from PIL import Image

    from gemma3_lab.app.ui.runner import THUMBNAIL, lighten
    from gemma3_lab.prompt.inputs import ImageSpan, Inputs

    ids = torch.zeros(1, 4, dtype=torch.long)
    x = Inputs(ids, torch.ones_like(ids), ids, torch.zeros(2, 3, 896, 896), [ImageSpan(0, 0, 1, 0, 4, box=(0, 0, 3000, 1000))],
               [Image.new("RGB", (6000, 2000))])
    light = lighten(x)
    assert light.pixel_values is None and light.images[0].size == (THUMBNAIL, round(2000 * THUMBNAIL / 6000))
    assert light.image_spans[0].box == (0, 0, 512, 171) and x.images[0].size == (6000, 2000)


def _png(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 30, 30)).save(path)
    return path


BAD = {
    "empty prompt": (dict(prompt="  "), "the prompt is empty"),
    "past the context": (dict(prompt="hello " * 33_000), "more than gemma-3-270m's context of 32,768"),
    "prompt-token limit": (dict(prompt="hello " * 5000), "past this app's limit of 4096 prompt tokens"),
    "past a small context": (dict(a_model="tiny", prompt="hello " * 70), "more than tiny's context of 64"),
    "non-image upload": (dict(images="text"), "is not an image"),
    "image for text-only": (dict(images="png"), "text-only model"),
    "folder outside the root": (dict(b_model="/etc"), "outside the allowed root"),
    "dot-dot escape": (dict(a_model="../../etc"), "outside the allowed root"),
    "missing folder": (dict(a_model="nope"), "no such folder"),
    "temperature": (dict(a_decoding="sample", a_temperature=0), "temperature: 0 must be > 0"),
    "top-p": (dict(b_decoding="sample", b_top_p=1.5), "top-p: 1.5 must be ≤ 1"),
    "max tokens": (dict(a_max_new_tokens=0), "max new tokens: 0 must be ≥ 1"),
    "decoding": (dict(a_decoding="beam"), "is not in the list of choices"),
    "ablation heads": (dict(b_intervention="ablate heads", b_layer=3, b_heads="7"), "head 7 does not exist"),
    "ablation layer": (dict(b_intervention="ablate heads", b_layer=30, b_heads="0"), "layer 30 does not exist"),
    "heads list": (dict(a_intervention="ablate heads", a_heads="one"), "is not a list of whole numbers"),
    "steer pair": (dict(a_intervention="steer", a_steer_positive="Love"), "give both texts of the contrast pair"),
    "patch both": (dict(a_intervention="patch from other column", b_intervention="patch from other column"),
                   "both columns patch from each other"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_errors_are_messages(client, tmp_path, case):
    changes, message = BAD[case]
    if changes.get("images") == "text":
        (tmp_path / "notes.txt").write_text("not a picture")
        changes = {**changes, "images": [handle_file(str(tmp_path / "notes.txt"))]}
    elif changes.get("images") == "png":
        changes = {**changes, "images": [handle_file(str(_png(tmp_path / "red.png")))]}
    with pytest.raises(Exception) as err:
        generate(client, **changes)
    assert message in str(err.value)


def test_inspect_errors_are_messages(client):
    with pytest.raises(Exception, match="has not generated anything"):
        client.predict(column="B", index=0, layer=0, head=-1, api_name="/inspect")
    generate(client, a_max_new_tokens=2, b_max_new_tokens=2)
    for kw, message in [
        (dict(index=9), "there is no token 9"),
        (dict(layer=18), "layer 18 does not exist"),
        (dict(head=4), "head 4 does not exist"),
        (dict(column="C"), "column must be A or B"),
    ]:
        with pytest.raises(Exception, match=message):
            client.predict(**{"column": "A", "index": 0, "layer": 0, "head": -1, **kw}, api_name="/inspect")


def test_still_answers_after_errors(client):
    for bad in (dict(prompt=""), dict(a_model="/etc")):
        with pytest.raises(Exception):
            generate(client, **bad)
    assert len(generate(client, a_max_new_tokens=1, b_max_new_tokens=1)["A"]["token_ids"]) == 1


def test_image_tab_endpoint(client, app, tmp_path):
    """demo-multimodal: the picture's 256 soft tokens, the grid and text→image attention come back."""
    png = handle_file(str(_png(tmp_path / "red.png")))
    out = generate(client, prompt="Describe:", images=[png], a_model="demo-multimodal", b_model="demo-multimodal",
                   a_max_new_tokens=1, b_max_new_tokens=1)
    assert out["A"]["prompt_tokens"] > 256 and out["A"]["token_ids"] == out["B"]["token_ids"]
    multimodal = app.registry.get("demo-multimodal").model
    with Forwards(multimodal, multimodal.vision) as f:  # read from the generation's capture
        note, strip, grid, attention, layers, head = client.predict(column="A", index=0, image=0,
                                                                    layers="global layers", head=-1,
                                                                    api_name="/image_attention")
    assert f.n == 0
    # the selectors are rebuilt from the column's model: demo-multimodal's decoder is the 270M's, 18 layers × 4 heads
    assert (layers["value"], head["value"]) == ("global layers", -1)
    assert [c[1] for c in layers["choices"]] == ["global layers", "all layers"] + [f"L{i}" for i in range(18)]
    assert [c[1] for c in head["choices"]] == [-1, 0, 1, 2, 3]
    assert "1 image block(s)" in note and "untrained vision" in note
    assert all(Path(p).stat().st_size > 5_000 for p in (strip, grid, attention))
    with pytest.raises(Exception, match="image 1 does not exist"):
        client.predict(column="A", index=0, image=1, layers="global layers", head=-1, api_name="/image_attention")


def test_explain_is_who_wrote_at_that_token(client, model):
    """/explain returns gemma3_lab.analysis.who_wrote's numbers as they are, for a generated
    step and for a prompt slot; the direct logit attributions sum to the model's logit."""
    from gemma3_lab.analysis.who_wrote import who_wrote

    with pytest.raises(Exception, match="has not generated anything"):
        Client(client.src, verbose=False).predict(column="A", index=0, api_name="/explain")
    out = generate(client, a_max_new_tokens=3, b_max_new_tokens=3)
    prompt_ids = model.to_inputs(PROMPT).input_ids[0].tolist()
    seq = torch.tensor([prompt_ids + out["A"]["token_ids"][:-1]])
    header, dla, attr, table, data = client.predict(column="A", index=1, steps=8, api_name="/explain")
    pos = len(prompt_ids)  # step 1 was chosen at the slot of step 0's token
    want = who_wrote(model, seq, pos, token=out["A"]["token_ids"][1], steps=8)
    assert (data["position"], data["token"]) == (want.position, want.token)
    assert (data["logit"], data["embed"], data["dla_error"]) == (want.logit, want.embed, want.dla_error)
    assert data["attn"] == want.attn.tolist() and data["mlp"] == want.mlp.tolist()
    assert data["heads"] == want.heads.tolist() and data["input_attr"] == want.input_attr.tolist()
    assert data["completeness_error"] == want.completeness_error
    assert [row[1:3] for row in table["data"][1:]] == [[a, m] for a, m in zip(data["attn"], data["mlp"])]
    assert table["data"][0][1] == data["embed"] and [row[3:] for row in table["data"][1:]] == data["heads"]
    logit = float(model(seq).logits[0, pos, want.token])
    assert data["embed"] + sum(data["attn"]) + sum(data["mlp"]) == pytest.approx(logit, rel=1e-4)
    assert f"{want.logit:.4f}" in header and Path(dla).stat().st_size > 5_000 and Path(attr).stat().st_size > 2_000
    # a prompt slot, without the integrated gradients: the prediction of the prompt's next token
    *_, data = client.predict(column="B", index=None, position=2, input_attribution=False, api_name="/explain")
    want = who_wrote(model, seq, 2, input_attribution=False)
    assert data["token"] == prompt_ids[3] and data["input_attr"] is None and data["heads"] == want.heads.tolist()
    with pytest.raises(Exception, match="there is no token 7"):
        client.predict(column="A", index=7, api_name="/explain")
