"""Megatron-core <-> HuggingFace weights: gather TP/PP/EP/ETP shards into HF-named tensors.

Importing this package is cheap: megatron-core is imported on first use of a function that
needs it. Entry points:

- ``enable_cpu_megatron()``: the CPU patches (explicit, idempotent).
- ``enable_megatron_without_te()``: the two fixes any run without TransformerEngine needs
  (included in ``enable_cpu_megatron``; call it yourself on a GPU without TE).
- ``init_parallel(tp=, pp=, ep=, etp=, vpp=)``: megatron parallel_state on an existing group.
- ``build_model(hf_config)``: GPTModel chunk(s) for this rank (local spec).
- ``hf_weight_metadata`` / ``iter_hf_units`` / ``export_hf_weights``: the export stream.
- ``load_hf_weights``: HF tensors -> this rank's shards.
- ``check_local_shapes``: this rank's shards fit ``hf_config`` (no communication, no bytes).
- ``apply_lora`` / ``export_lora`` / ``load_lora_weights`` / ``adapter_config``: LoRA adapters
  sharded like their linears, exported under PEFT names (see ``lora.py``).
"""

from __future__ import annotations

import importlib
from typing import Any

from megatron_bridge.meta import HFWeightMeta

_LAZY = {
    "enable_cpu_megatron": "megatron_bridge.cpu",
    "enable_megatron_without_te": "megatron_bridge.cpu",
    "init_parallel": "megatron_bridge.parallel",
    "EXPORT_SOURCE_RANK": "megatron_bridge.parallel",
    "build_model": "megatron_bridge.model",
    "hf_weight_metadata": "megatron_bridge.export",
    "iter_hf_units": "megatron_bridge.export",
    "export_hf_weights": "megatron_bridge.export",
    "load_hf_weights": "megatron_bridge.load",
    "check_local_shapes": "megatron_bridge.load",
    "register_family": "megatron_bridge.families",
    "LoraSpec": "megatron_bridge.lora",
    "apply_lora": "megatron_bridge.lora",
    "export_lora": "megatron_bridge.lora_export",
    "load_lora_weights": "megatron_bridge.lora_export",
    "lora_weight_metadata": "megatron_bridge.lora_export",
    "adapter_config": "megatron_bridge.lora_export",
}

__all__ = ["HFWeightMeta", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'megatron_bridge' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
