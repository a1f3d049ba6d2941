"""A Ray Data row function that is built where it runs, from a plain config.

Rule: Ray Train's controller, its dataset manager and the split coordinator each unpickle the
training dataset's plan before the first row flows; a row function pickled as a ``ViewMaker``
would make each of them import torch and the image code first (seconds per process, one after
another, on the path to the first step). ``Deferred`` pickles as a ``"module:Class"`` name and
the config as a dict, and builds the function on its first call (in the decode task).
"""

from __future__ import annotations

import importlib
from typing import Any


class Deferred:
    """``Class(Config)`` of ``target`` (``"module:Class"``), built on the first call and applied to rows.

    Args:
        target: ``"package.module:Class"``; the class takes a ``dncut.config.Config``.
        config: ``Config.model_dump(mode="json")``.
    """

    def __init__(self, target: str, config: dict[str, Any]) -> None:
        self.target, self.config = target, config
        self._fn = None

    def __getstate__(self) -> dict[str, Any]:
        return {"target": self.target, "config": self.config}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.target, self.config, self._fn = state["target"], state["config"], None

    def build(self):
        """The row function itself (built once per unpickled copy)."""
        if self._fn is None:
            from dncut.config import Config

            module, _, name = self.target.partition(":")
            self._fn = getattr(importlib.import_module(module), name)(Config.model_validate(self.config))
        return self._fn

    def __call__(self, row: dict) -> dict:
        return self.build()(row)
