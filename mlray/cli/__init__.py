"""The ``mlray`` command (entry point ``mlray.cli:main``; ``python -m mlray.cli`` runs it too).

- ``commands``: the top-level commands (train, tune, promote, serve, predict, ...), thin over library functions
- ``compress``, ``monitor``, ``pipeline``: the ``compress`` command and the ``monitor`` / ``pipeline`` groups
- ``options``: the options several commands share
- ``console``: what a person sees: one-line errors, ``--json`` output, progress on a terminal
"""

from mlray.cli.commands import app, main, run

__all__ = ["app", "main", "run"]
