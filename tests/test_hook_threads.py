"""Hooks belong to the call that attached them: a plain forward in one thread, run while another
thread is inside `run_with_hooks` on the same model, sees none of that thread's hooks."""

from __future__ import annotations

import threading

import pytest
import torch

pytestmark = pytest.mark.real

PROMPT = "The capital of France is"


def test_a_forward_in_another_thread_does_not_pick_up_run_with_hooks_hooks(real_model):
    with torch.no_grad():
        clean = real_model(PROMPT).logits
    inside, done = threading.Event(), threading.Event()

    def hook(t, hook):  # a large edit: if it leaked, the other thread's logits would move a lot
        inside.set()
        done.wait(30)  # hold the hooks attached while the other thread runs its forward
        return t * 0

    hooked = {}
    worker = threading.Thread(target=lambda: hooked.update(
        logits=real_model.run_with_hooks(PROMPT, fwd_hooks=[("blocks.3.hook_resid_post", hook)])))
    worker.start()
    try:
        assert inside.wait(30)
        assert real_model.hook_point("blocks.3.hook_resid_post").active is False  # not this thread's
        with torch.no_grad():
            during = real_model(PROMPT).logits
    finally:
        done.set()
        worker.join(30)
    assert (during - clean).abs().max().item() == 0
    assert (hooked["logits"] - clean).abs().max() > 1  # the hooks did run in their own thread
    assert not any(hp.active for hp in real_model.hook_points.values())


def test_hooks_nest_and_unwind_in_order(real_model):
    seen = []
    with real_model.hooks([("blocks.0.hook_resid_pre", lambda t, hook: seen.append("outer"))]):
        with real_model.hooks([("blocks.0.hook_resid_pre", lambda t, hook: seen.append("inner"))]):
            real_model.run_with_hooks("Hi")
        real_model.run_with_hooks("Hi")
    real_model.run_with_hooks("Hi")
    assert seen == ["outer", "inner", "outer"]
