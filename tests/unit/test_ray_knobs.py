"""Every environment knob mlray sets is one the installed Ray reads: a knob Ray renamed or dropped would be a
silent no-op (mlray/_ray/env.py was written for Ray 2.60.0)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlray._ray.env import LOCAL_HEAD_ENV, SERVE_ENV, TRAIN_ENV, local_head_env


def _ray_sources() -> str:
    import ray

    root = Path(ray.__file__).parent
    return "\n".join(path.read_text(errors="replace") for folder in ("train", "serve", "_private")
                     for path in (root / folder).rglob("*.py"))


_SOURCES = _ray_sources()


@pytest.mark.parametrize("knob", sorted({*TRAIN_ENV, *LOCAL_HEAD_ENV, *SERVE_ENV}))
def test_ray_reads_the_knob(knob):
    assert f'"{knob}"' in _SOURCES, f"no Ray module reads {knob}: check mlray/_ray/env.py against this Ray"


def test_the_local_heads_knobs_yield_to_the_users(monkeypatch):
    assert local_head_env() == {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")
    assert local_head_env() == {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1"}

