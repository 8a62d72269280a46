"""The model-config fields that must agree between the trainer and a serving engine.

An engine started from another checkpoint config than the trainer's can accept every tensor
name and shape and still compute something else: a tied head where the trainer has its own, a
different head_dim with the same products, int4 with another group size. ``prepare`` compares
these fields before any engine is paused and names the first that differs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

FIELDS = (
    "tie_word_embeddings",
    "vocab_size",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_hidden_layers",
    "num_experts",
)
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def config_field(hf_config: Any, key: str, default: Any = None) -> Any:
    """One field of an HF config given as a PretrainedConfig or as its dict."""
    if isinstance(hf_config, Mapping):
        return hf_config.get(key, default)
    return getattr(hf_config, key, default)


def summary(hf_config: Any, quantization_config: Mapping | None = None) -> dict[str, Any]:
    """The compared fields of an HF config (object or dict), JSON-friendly."""

    def get(key: str) -> Any:
        return config_field(hf_config, key)

    out = {k: get(k) for k in FIELDS if k != "num_experts"}
    if out["head_dim"] is None and out["hidden_size"] and out["num_attention_heads"]:
        out["head_dim"] = out["hidden_size"] // out["num_attention_heads"]
    if out["num_key_value_heads"] is None:
        out["num_key_value_heads"] = out["num_attention_heads"]
    out["tie_word_embeddings"] = bool(out["tie_word_embeddings"])
    out["num_experts"] = next((get(k) for k in _EXPERT_KEYS if get(k)), 0)
    qc = quantization_config if quantization_config is not None else get("quantization_config")
    out["quantization"] = _quant_summary(qc)
    return out


def _quant_summary(qc: Mapping | None) -> dict | None:
    if not qc:
        return None
    if not isinstance(qc, Mapping):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(vars(qc))
    if qc.get("quant_method") != "compressed-tensors":
        return {"quant_method": qc.get("quant_method")}
    groups = qc.get("config_groups") or {}
    weights = [g.get("weights") or {} for g in groups.values()]
    keys = ("num_bits", "type", "symmetric", "strategy", "group_size")
    return {
        "quant_method": "compressed-tensors",
        "format": qc.get("format"),
        "weights": sorted(({k: w.get(k) for k in keys} for w in weights), key=str),
    }


def mismatches(trainer: Mapping[str, Any], engine: Mapping[str, Any]) -> list[str]:
    """``field: trainer X, engine Y`` for every compared field that differs."""
    return [
        f"{k}: trainer {trainer.get(k)!r}, engine {engine.get(k)!r}"
        for k in (*FIELDS, "quantization")
        if trainer.get(k) != engine.get(k)
    ]
