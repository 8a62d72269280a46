"""The tiny HF model the tests build, in one place.

2 layers, hidden 128 over 2 heads (head_dim 64: vLLM's CPU attention needs >= 64), GQA with one
KV head, untied head. A test that needs other dims says which ones, as overrides.
"""

from __future__ import annotations

from typing import Any

TINY: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    tie_word_embeddings=False,
)


def tiny_dims(**overrides: Any) -> dict[str, Any]:
    """The tiny model's config fields with ``overrides`` applied (a plain dict)."""
    return TINY | overrides


def tiny_config(model_type: str, **overrides: Any) -> Any:
    """The transformers config of the tiny ``model_type`` model, ``overrides`` applied."""
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **tiny_dims(**overrides))
