"""TRITONKV_* switches for A/B timing: environment settings held for the duration of a block."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def switches(settings: dict):
    """``settings`` (name -> value) in the environment while in the block; the previous values
    (or their absence) restored after it."""
    before = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
