"""The attention view and the logit-lens table in headless Debian Chromium, on a page built here
from a tiny random model's `run_with_cache`: hover, focus, arrow keys, click-to-pin and layer or
head switches redraw with no request to the server, and every number the page carries or
prints is the captured one to its 3 decimals. Screenshots go to a temporary folder (the
committed docs/attention_view_*.png come from scripts/screenshot_views.py)."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from playwright.sync_api import expect
from test_app_browser import ARGS, chromium_path
from test_attention_view import NAMES, tiny_model

pytestmark = pytest.mark.browser
WAIT_MS = 60_000
TOKENS = ["<bos>", "▁The", "<b>bold</b>", "$$\\", "▁a\nb", "▁cat"] + [f"▁w{i}" for i in range(8)]  # 14


@pytest.fixture(scope="module")
def captured():
    model = tiny_model()
    _, cache = model.run_with_cache(torch.arange(2, 16)[None], NAMES)
    return model, cache


@pytest.fixture(scope="module")
def url(captured):
    import gradio as gr

    from gemma3_lab.app.ui.attention_view import attention_payload, attention_view, logit_lens_payload, logit_lens_view

    model, cache = captured
    text = model.config.text
    pats = {i: cache["pattern", i] for i in range(text.num_layers)}
    with gr.Blocks() as demo:
        attention_view(attention_payload(TOKENS, pats, text.layer_types, text.sliding_window), elem_id="attn")
        logit_lens_view(logit_lens_payload(cache.logit_lens(k=3)), elem_id="lens")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, url):
    page = browser.new_context(viewport={"width": 1440, "height": 1000}).new_page()
    page.goto(url)
    page.locator("#attn .tok").first.wait_for(timeout=WAIT_MS)
    page.locator("#lens td.cell").first.wait_for(timeout=WAIT_MS)
    page.wait_for_load_state("networkidle")
    page.requests = []  # every request from here on: a redraw must cause none
    page.on("request", lambda r: page.requests.append(r.url))
    yield page
    page.context.close()


SHADOW = "document.querySelector('#{} .g3v-host').shadowRoot"


def weights(page) -> list[list[str]]:
    """data-w of every token, per head strip (units of 1/1000; '' when no query is inspected)."""
    return page.evaluate(f"() => [...{SHADOW.format('attn')}.querySelectorAll('.strip')]"
                         ".map(s => [...s.children].map(t => t.dataset.w))")


def assert_row(page, cache, layer: int, query: int, heads=range(4)) -> None:
    row = cache["pattern", layer].to_dense()[0, :, query].double().numpy()  # (N, T)
    shown = np.array(weights(page), dtype=float) / 1000
    assert shown.shape == (len(heads), 14)
    for strip, h in zip(shown, heads):
        assert np.abs(strip - row[h]).max() <= 0.0005 + 1e-12, (layer, query, h)
        assert np.array_equal(strip, np.rint(row[h] * 1000) / 1000)


def tok(page, k: int, head_strip: int = 0):
    return page.locator("#attn .strip").nth(head_strip).locator(".tok").nth(k)


def test_hover_shows_the_pattern_row_without_a_request(page, captured):
    _, cache = captured
    assert weights(page)[0] == [""] * 14  # nothing inspected yet
    for k in (5, 9, 13):
        tok(page, k, head_strip=k % 4).hover()
        expect(tok(page, k)).to_have_class("tok query", timeout=WAIT_MS)
        assert_row(page, cache, 0, k)
    label = tok(page, 12).get_attribute("aria-label")
    want = float(cache["pattern", 0].to_dense()[0, 0, 13, 12])
    assert label == f"▁w6 (slot 12): {want:.3f} from slot 13, head 0"
    assert page.requests == []
    page.evaluate("() => fetch('config')")  # the counter itself: a real request is seen
    assert len(page.requests) == 1


def test_layer_and_head_switch_in_the_page(page, captured):
    _, cache = captured
    tok(page, 11).hover()
    page.locator("#attn select.layer").select_option("1")
    expect(page.locator("#attn .kind")).to_have_text("layer 1 · global (whole prefix)")
    assert_row(page, cache, 1, 11)
    page.locator("#attn select.head").select_option("2")
    expect(page.locator("#attn .strip")).to_have_count(1)
    assert_row(page, cache, 1, 11, heads=[2])  # the inspected token survives the switch
    assert page.requests == []


def test_the_window_edge_is_marked_on_local_layers(page):
    tok(page, 8).hover()
    classes = [tok(page, k).get_attribute("class").split() for k in range(14)]
    assert [k for k, c in enumerate(classes) if "outside" in c] == list(range(6))  # window 3: keys 6, 7, 8
    assert [k for k, c in enumerate(classes) if "edge" in c] == [6]
    assert [k for k, c in enumerate(classes) if "future" in c] == list(range(9, 14))
    assert "window starts at slot 6" in page.locator("#attn .info").inner_text()
    page.locator("#attn select.layer").select_option("1")
    assert not page.locator("#attn .tok.outside").count() and not page.locator("#attn .tok.edge").count()


def test_keyboard_focus_and_arrows_move_the_inspected_token(page, captured):
    _, cache = captured
    tok(page, 3).focus()
    expect(tok(page, 3)).to_have_class("tok query")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    expect(tok(page, 5)).to_have_class("tok query")
    assert page.evaluate(f"() => {SHADOW.format('attn')}.activeElement.dataset.pos") == "5"
    assert_row(page, cache, 0, 5)
    page.keyboard.press("ArrowLeft")
    assert_row(page, cache, 0, 4)
    page.keyboard.press("End")
    assert_row(page, cache, 0, 13)
    page.keyboard.press("Enter")  # pins: hovering elsewhere no longer moves it
    tok(page, 2).hover()
    expect(tok(page, 13)).to_have_class("tok query pinned")
    assert "pinned slot 13" in page.locator("#attn .info").inner_text()
    assert page.requests == []


def test_click_pins_and_a_second_click_unpins(page, captured):
    _, cache = captured
    tok(page, 7).click()
    tok(page, 10).hover()
    assert_row(page, cache, 0, 7)
    tok(page, 7).click()
    tok(page, 10).hover()
    assert_row(page, cache, 0, 10)
    assert page.requests == []


def test_tokens_are_text_never_markup(page):
    assert page.locator("#attn b").count() == 0
    assert tok(page, 2).inner_text() == "<b>bold</b>" and tok(page, 3).inner_text() == "$$\\"
    assert tok(page, 4).inner_text() == "▁a\\nb"  # a newline written as an escape, on one line


def test_the_lens_table_shows_the_lens(page, captured):
    _, cache = captured
    lens = cache.logit_lens(k=3)
    cells = page.evaluate(f"() => [...{SHADOW.format('lens')}.querySelectorAll('td.cell')]"
                          ".map(c => [c.dataset.pos, c.dataset.layer, c.dataset.p, c.querySelector('.prob').textContent])")
    assert len(cells) == 14 * 5
    for i, j, units, text in cells:
        p = float(lens.top_probs[int(j), int(i), 0])
        assert int(units) == round(p * 1000) and text == f"{p:.3f}"
    cell = page.locator("#lens td.cell").nth(5 * 6 + 2)  # slot 6, L1
    cell.hover()
    info = page.locator("#lens .info").inner_text()
    for r in range(3):
        assert f'"{lens.top_tokens[2][6][r]}" {float(lens.top_probs[2, 6, r]):.3f}' in info
    cell.focus()
    page.keyboard.press("ArrowDown")
    page.keyboard.press("ArrowRight")
    assert "slot 7" in page.locator("#lens .info").inner_text() and "· L2 ·" in page.locator("#lens .info").inner_text()
    assert page.requests == []


@pytest.mark.parametrize("width", [1440, 800])
def test_readable_at_both_widths(page, width, tmp_path):
    page.set_viewport_size({"width": width, "height": 1000})
    tok(page, 9).hover()
    # nothing runs off the page sideways: the lens table scrolls inside its own box
    assert page.evaluate("() => document.documentElement.scrollWidth") <= width
    box = tok(page, 9).bounding_box()
    assert box["height"] >= 16 and box["width"] >= 20
    page.screenshot(path=str(tmp_path / f"views_{width}.png"), full_page=True)
