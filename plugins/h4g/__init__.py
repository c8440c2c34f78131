"""H4G (arXiv 2510.12094): zero-shot node classification on text-attributed graphs in the Poincaré ball, with
a learnable block-diagonal Möbius scaling M = diag(M_1 … M_G) that shrinks embedding radii.

Core: ``H4GModel``, ``MobiusBlockScaling``, ``EgoNeighbourGNN`` (model.py); ``load_exported``/``predict``
(inference.py); the ball's ops are ``blocktrain.kernels.poincare``. Names are imported on first use.
"""
from __future__ import annotations

from blocktrain.trainer.plugin import lazy_exports

_EXPORTS = {"H4GModel": "model", "MobiusBlockScaling": "model", "EgoNeighbourGNN": "model",
            "load_exported": "inference", "predict": "inference", "load_trained": "inference",
            "H4GConfig": "plugin", "H4GPlugin": "plugin"}
__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
