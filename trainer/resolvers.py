"""OmegaConf resolvers of the run: ``${data_info:KEY}`` reads what the data source found (e.g. num_labels)."""
from __future__ import annotations

from omegaconf import OmegaConf

from blocktrain.trainer.errors import UserError

_data_info: dict = {}


def _lookup(key: str):
    if key not in _data_info:
        known = ", ".join(sorted(_data_info)) or "nothing yet (the data is not loaded)"
        raise UserError(f"${{data_info:{key}}}: the data source reports {known}")
    return _data_info[key]


def set_data_info(info: dict) -> None:
    _data_info.clear()
    _data_info.update(info)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("data_info"):
        OmegaConf.register_new_resolver("data_info", _lookup)
