"""Vocabulary of the family tables: dims, layout kinds, rows, and the Family record.

A family table is a list of ``Row``s. Each row ties one megatron parameter (its name inside a
decoder layer, or at the top of the model) to the HF tensor(s) it becomes, the ``Kind`` that
converts between the two layouts, and the HF shapes (computed from ``Dims``, never gathered).
Rows sharing a ``unit`` tag within a layer (or an expert) form one atomic unit: the tensors an
engine fuses at load time (q/k/v, gate/up, MLA's q_a_proj + kv_a_proj_with_mqa, one expert).

Megatron full layouts (after un-sharding; see gather.py for the sharding itself):
  QKV  rows grouped per KV group: [q_g (heads/groups * d) | k_g (d) | v_g (d)] for g in groups
  GLU  [gate (F) | up (F)] along dim 0 (each TP shard is [gate_r | up_r]: partition_stride 2)
  VOCAB  rows padded up to a multiple of make_vocab_size_divisible_by * tp
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Shape = tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Dims:
    """The numbers the tables need, read once from the HF config."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    tied: bool
    experts: int = 0
    moe_ffn: int = 0
    shared_ffn: int = 0
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope: int = 0
    qk_rope: int = 0
    v_head_dim: int = 0


class Kind:
    """Layout conversion between one megatron full tensor and its HF tensor(s)."""

    def to_hf(self, full: torch.Tensor, d: Dims) -> list[torch.Tensor]:
        return [full]

    def to_mcore(self, hf: list[torch.Tensor], d: Dims, full_shape: Shape) -> torch.Tensor:
        return hf[0]


class _QKV(Kind):
    def _split(self, d: Dims) -> tuple[int, int]:
        return d.heads // d.kv_heads * d.head_dim, d.head_dim

    def to_hf(self, full: torch.Tensor, d: Dims) -> list[torch.Tensor]:
        q, kv = self._split(d)
        grouped = full.reshape(d.kv_heads, q + 2 * kv, *full.shape[1:])
        parts = torch.split(grouped, [q, kv, kv], dim=1)
        return [p.reshape(-1, *full.shape[1:]) for p in parts]

    def to_mcore(self, hf: list[torch.Tensor], d: Dims, full_shape: Shape) -> torch.Tensor:
        rest = hf[0].shape[1:]
        parts = [t.reshape(d.kv_heads, -1, *rest) for t in hf]
        return torch.cat(parts, dim=1).reshape(-1, *rest)


class _GLU(Kind):
    def to_hf(self, full: torch.Tensor, d: Dims) -> list[torch.Tensor]:
        return list(torch.chunk(full, 2, dim=0))

    def to_mcore(self, hf: list[torch.Tensor], d: Dims, full_shape: Shape) -> torch.Tensor:
        return torch.cat(hf, dim=0)


class _Vocab(Kind):
    def to_hf(self, full: torch.Tensor, d: Dims) -> list[torch.Tensor]:
        return [full[: d.vocab]]

    def to_mcore(self, hf: list[torch.Tensor], d: Dims, full_shape: Shape) -> torch.Tensor:
        # Padding rows belong to no token; zeros keep them inert and the load deterministic.
        out = hf[0].new_zeros(full_shape)
        out[: d.vocab] = hf[0]
        return out


SAME, QKV, GLU, VOCAB = Kind(), _QKV(), _GLU(), _Vocab()


@dataclass(frozen=True, slots=True)
class Row:
    """One megatron parameter <-> its HF tensor(s).

    ``mcore``/``hf`` are suffixes relative to the layer (``decoder.layers.N.`` /
    ``model.layers.N.``) or full names for top-level rows. Expert rows use ``{i}`` for the
    local expert index in ``mcore`` and ``{e}`` for the global one in ``hf``.
    """

    unit: str
    mcore: str
    kind: Kind
    hf: tuple[str, ...]
    shapes: Callable[[Dims], tuple[Shape, ...]]
    dtype: torch.dtype | None = None
    """Fixed HF dtype (e.g. fp32 router bias buffers); None means the model's dtype."""


@dataclass(frozen=True)
class Family:
    """One HF ``model_type``: how to configure megatron and how names/layouts map."""

    model_types: tuple[str, ...]
    dims: Callable[[Any], Dims]
    transformer_kwargs: Callable[[Any], dict[str, Any]]
    layer_rows: Callable[[Any, int], list[Row]]
    """Rows of decoder layer N (dense and MoE layers may differ)."""
    expert_rows: Callable[[Any, int], list[Row]] = lambda cfg, layer: []
    """Rows of one routed expert of layer N (empty for dense layers)."""


def rope_theta(cfg: Any) -> float:
    """transformers 5 moved rope_theta into rope_parameters."""
    params = getattr(cfg, "rope_parameters", None) or {}
    if "rope_theta" in params:
        return float(params["rope_theta"])
    return float(cfg.rope_theta)
