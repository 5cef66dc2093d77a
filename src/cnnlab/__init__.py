"""cnnlab: train, sweep, fine-tune and explain image classifiers on a folder of labelled images.

    import cnnlab
    run = cnnlab.train(data="data/demo", image_size=64, epochs=15)
    run.evaluate(); run.predict("photo.jpg"); run.explain()

The names below are imported on first use, so `import cnnlab` (and `cnnlab --help`) stays instant.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["train", "load", "sweep", "compare", "check", "lr_find", "report", "assignment",
           "Run", "Evaluation", "Explanation", "SweepRun", "Config",
           "CnnlabError", "ConfigError", "DataError", "StorageError", "__version__"]

_HOME = {**{name: "api" for name in ("train", "load", "sweep", "compare", "check", "lr_find", "report", "Run",
                                     "Evaluation", "Explanation", "SweepRun", "DataCheck")},
         "assignment": "whole_job",
         "Config": "config",
         **{name: "errors" for name in ("CnnlabError", "ConfigError", "DataError", "StorageError")}}


def lazy_attribute(package: str, homes: dict[str, str], name: str) -> Any:
    """`package`'s public `name`, imported from its home module (`homes[name]`) on first use: a package's
    `__getattr__`, so importing the package (and `cnnlab --help`) loads nothing heavy."""
    if name not in homes:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{homes[name]}", package), name)


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _HOME, name)


def __dir__() -> list[str]:
    return sorted(__all__)
