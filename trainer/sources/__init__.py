"""Model and data sources: structured configs (no heavy imports), ``load_model`` and ``build_datasets``.

``load_model``/``build_datasets`` and their result types are imported lazily, so importing this
package to validate a config stays free of torch and transformers.
"""
from blocktrain.trainer.sources.config import DATA_KINDS, MODEL_KINDS, validate_data_config, validate_model_config

_LAZY = {"load_model": "models", "LoadedModel": "models", "gguf_to_clean_model": "models",
         "build_datasets": "data", "Datasets": "data"}

__all__ = ["DATA_KINDS", "MODEL_KINDS", "validate_data_config", "validate_model_config", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"blocktrain.trainer.sources.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
