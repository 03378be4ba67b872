"""The app's model registry: one load per model shared by every session, and a memory budget
past which the least recently used idle models are dropped."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from gemma3_lab.app.ui.registry import MEMORY_ENV, ModelKey, ModelRegistry
from gemma3_lab.loading.quantize import tensor_bytes

MB = 2**20


class Fake(nn.Module):
    def __init__(self, mb: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(mb * MB // 4))  # float32: mb MiB
        self.register_buffer("b", torch.zeros(1, dtype=torch.int8))


def registry(budget_mb: int, sizes: dict[str, int]):
    loads: list[str] = []

    def loader(key: ModelKey):
        loads.append(key.source)
        return Fake(sizes[key.source])

    return ModelRegistry(root=None, loader=loader, memory_bytes=budget_mb * MB), loads


def test_budget_counts_parameters_and_buffers_once():
    m = Fake(3)
    assert tensor_bytes(m) == 3 * MB + 1
    m.tied = m.w  # the same storage under a second name
    assert tensor_bytes(m) == 3 * MB + 1


def test_each_model_loads_once_and_is_shared():
    reg, loads = registry(100, {"a": 1})
    assert reg.get("a") is reg.get(ModelKey("a"))
    assert loads == ["a"] and reg.is_loaded(ModelKey("a"))


def test_least_recently_used_idle_models_go_past_the_budget():
    reg, loads = registry(10, {"a": 4, "b": 4, "c": 4})
    reg.get("a"), reg.get("b")
    reg.get("a")  # a is now the most recently used
    reg.get("c")  # 12 MiB > 10: b goes
    assert [k.source for k in reg.loaded()] == ["a", "c"]
    assert reg.held_bytes() <= 10 * MB
    reg.get("b")  # loaded again when asked for: now a goes
    assert [k.source for k in reg.loaded()] == ["c", "b"] and loads == ["a", "b", "c", "b"]


def test_a_model_in_use_is_not_dropped():
    reg, _ = registry(10, {"a": 4, "b": 4, "c": 4})
    busy = reg.get("a")
    reg.get("b")
    held = threading.Event()
    release = threading.Event()

    def run():
        with busy.lock:  # a generation holds a's lock
            held.set()
            release.wait(10)

    t = threading.Thread(target=run)
    t.start()
    held.wait(10)
    try:
        reg.get("c")  # over budget: a is busy, so b (the next oldest) goes
        assert [k.source for k in reg.loaded()] == ["a", "c"]
    finally:
        release.set()
        t.join()


def test_a_model_larger_than_the_budget_still_loads_alone():
    reg, _ = registry(10, {"a": 4, "big": 16})
    reg.get("a")
    assert isinstance(reg.get("big").model, Fake)
    assert [k.source for k in reg.loaded()] == ["big"]


def test_budget_from_the_environment(monkeypatch):
    monkeypatch.setenv(MEMORY_ENV, "1.5")
    assert ModelRegistry(root=None).memory_bytes == int(1.5 * 2**30)
    monkeypatch.setenv(MEMORY_ENV, "lots")
    with pytest.raises(ValueError, match=f"{MEMORY_ENV}='lots': expected a number of GB"):
        ModelRegistry(root=None)
