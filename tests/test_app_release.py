"""When the app hands freed memory back (`runner.release_memory`): a second after the last
generation in the process ends, never while one runs: a release timed from one generation
must not land in the middle of the next (a full collection holds the interpreter ~0.3 s)."""

from __future__ import annotations

import threading

from gemma3_lab.app.ui import runner


def test_a_release_waits_for_the_last_generation_and_a_new_one_cancels_it(monkeypatch):
    fired = threading.Event()
    monkeypatch.setattr(runner, "release_memory", fired.set)
    monkeypatch.setattr(runner, "RELEASE_AFTER_S", 0.05)
    release = runner._Release()
    release.generation_starts()
    release.generation_starts()  # two sessions generating
    release.generation_ends()
    assert release.timer is None and not fired.wait(0.2)  # one still runs: nothing scheduled
    release.generation_ends()
    assert fired.wait(5)  # the last one ended: released after RELEASE_AFTER_S
    fired.clear()
    monkeypatch.setattr(runner, "RELEASE_AFTER_S", 0.3)
    release.generation_starts()
    release.generation_ends()  # scheduled ...
    release.generation_starts()  # ... and cancelled by the next generation within the wait
    assert release.timer is None and not fired.wait(0.6)
    release.generation_ends()
    assert fired.wait(5)
