"""Defects only a browser shows, in headless Debian Chromium: error messages that never closed
and piled up, and the "Error" badge that covered (and took the clicks of) the Images tab's
layer selector. Every wait is for a condition, with a timeout."""

from __future__ import annotations

import time

import pytest
from playwright.sync_api import expect
from test_app_browser import app, browser, open_page  # noqa: F401  (the fixtures and page opener)

from gemma3_lab.app.ui.checks import TOAST_SECONDS

pytestmark = pytest.mark.browser
TOAST = ".toast-body.error"
MESSAGE = ".toast-message-text.error"  # Gradio groups the open errors in one toast, one item each
SLACK_S = 5  # past TOAST_SECONDS: the closing animation and a busy shared CPU


def test_error_messages_close_by_themselves(app, browser):  # noqa: F811
    page = open_page(browser, app.url)
    page.locator("#generate").click()  # empty prompt: an error
    expect(page.locator(TOAST).first).to_contain_text("the prompt is empty", timeout=30_000)
    # a second error while the first is still shown (the message must not cover Generate, or this
    # click would wait until the first one has gone)
    page.locator("#generate").click()
    expect(page.locator(MESSAGE)).to_have_count(2, timeout=30_000)
    shown = time.monotonic()
    # both go by themselves (nobody clicks a close button), none stays behind
    expect(page.locator(MESSAGE)).to_have_count(0, timeout=(TOAST_SECONDS + SLACK_S) * 1000)
    expect(page.locator(TOAST)).to_have_count(0)
    assert time.monotonic() - shown < TOAST_SECONDS + SLACK_S


def test_an_images_tab_error_leaves_its_selectors_usable(app, browser):  # noqa: F811
    page = open_page(browser, app.url)
    page.get_by_role("tab", name="Images").click()
    page.locator("#img-show").click()  # nothing generated yet: an error
    expect(page.locator(TOAST).first).to_contain_text("has not generated anything", timeout=30_000)
    for selector in ("#img-layers", "#img-head"):
        expect(page.locator(f"{selector} [data-testid='status-tracker'] .error")).to_have_count(0)
        # a click that another element intercepts (the badge did) times out here
        page.locator(f"{selector} input").click(timeout=5_000)
        expect(page.locator(f"{selector} input")).to_be_focused()
        page.keyboard.press("Escape")
    page.locator("#img-layers input").click(timeout=5_000)
    page.get_by_role("option", name="all layers").click(timeout=5_000)
    expect(page.locator("#img-layers input")).to_have_value("all layers")
