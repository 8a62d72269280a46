"""Explicit registry of model families, keyed by the HF config's ``model_type``."""

from __future__ import annotations

from typing import Any

from megatron_bridge.families import deepseek, dense, moe
from megatron_bridge.families.base import Dims, Family, Row

_REGISTRY: dict[str, Family] = {}


def register_family(family: Family) -> None:
    """Add a family; a model_type can be registered once."""
    for model_type in family.model_types:
        if model_type in _REGISTRY:
            raise ValueError(f"model_type {model_type!r} is already registered")
        _REGISTRY[model_type] = family


def get_family(hf_config: Any) -> Family:
    model_type = hf_config.model_type
    if model_type not in _REGISTRY:
        raise ValueError(
            f"model_type {model_type!r} is not supported; registered: {sorted(_REGISTRY)}"
        )
    return _REGISTRY[model_type]


for _family in (*dense.FAMILIES, *moe.FAMILIES, *deepseek.FAMILIES):
    register_family(_family)

__all__ = ["Dims", "Family", "Row", "get_family", "register_family"]
