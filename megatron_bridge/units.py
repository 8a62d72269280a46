"""The export plan: every atomic unit of the model, in export order, with where it lives.

Computed from the HF config and megatron's TransformerConfig alone (no tensors, no
collectives), so every rank derives the identical list, including units held by other
pipeline stages or expert-parallel ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_bridge.families import Family, get_family
from megatron_bridge.families.base import SAME, VOCAB, Dims, Kind, Row, Shape


@dataclass(frozen=True, slots=True)
class Piece:
    """One megatron parameter (name local to its chunk) and the HF tensors it becomes."""

    mcore: str
    kind: Kind
    hf: tuple[str, ...]
    shapes: tuple[Shape, ...]
    dtype: torch.dtype | None


@dataclass(frozen=True, slots=True)
class Unit:
    name: str
    pp_rank: int
    vp_stage: int
    expert_owner: int | None
    """Expert-parallel rank holding this routed expert; None for non-expert units."""
    pieces: tuple[Piece, ...]


_EMBED = Row(
    "embed",
    "embedding.word_embeddings.weight",
    VOCAB,
    ("model.embed_tokens.weight",),
    lambda d: ((d.vocab, d.hidden),),
)
_NORM = Row(
    "norm", "decoder.final_layernorm.weight", SAME, ("model.norm.weight",), lambda d: ((d.hidden,),)
)
_HEAD = Row(
    "lm_head", "output_layer.weight", VOCAB, ("lm_head.weight",), lambda d: ((d.vocab, d.hidden),)
)


def _piece(row: Row, d: Dims, mcore_prefix: str, hf_prefix: str, **fmt: int) -> Piece:
    shapes = row.shapes(d)
    assert len(shapes) == len(row.hf), row
    return Piece(
        mcore=mcore_prefix + row.mcore.format(**fmt),
        kind=row.kind,
        hf=tuple(hf_prefix + h.format(**fmt) for h in row.hf),
        shapes=shapes,
        dtype=row.dtype,
    )


def _grouped(rows: list[Row]) -> list[list[Row]]:
    """Rows grouped by unit tag, in order of first appearance."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.unit, []).append(row)
    return list(groups.values())


def layer_locations(config: TransformerConfig) -> dict[int, tuple[int, int, int]]:
    """Global layer index -> (pp_rank, vp_stage, index inside that chunk)."""
    if config.pipeline_model_parallel_layout is not None:
        raise ValueError("pipeline_model_parallel_layout is not supported (use the default split)")
    pp = config.pipeline_model_parallel_size
    vpp = config.virtual_pipeline_model_parallel_size
    where: dict[int, tuple[int, int, int]] = {}
    for pp_rank in range(pp):
        for vp in range(vpp or 1):
            stage = vp if vpp else None
            offset = get_transformer_layer_offset(config, vp_stage=stage, pp_rank=pp_rank)
            count = get_num_layers_to_build(config, vp_stage=stage, pp_rank=pp_rank)
            for local in range(count):
                where[offset + local] = (pp_rank, vp, local)
    if sorted(where) != list(range(config.num_layers)):
        raise ValueError(
            f"pipeline layout covers layers {sorted(where)}, expected 0..{config.num_layers - 1}"
        )
    return where


def _layer_units(
    family: Family, cfg: Any, d: Dims, layer: int, where: tuple[int, int, int], ep: int
) -> list[Unit]:
    pp_rank, vp, local = where
    mp, hp = f"decoder.layers.{local}.", f"model.layers.{layer}."
    units = [
        Unit(hp + rows[0].unit, pp_rank, vp, None, tuple(_piece(r, d, mp, hp) for r in rows))
        for rows in _grouped(family.layer_rows(cfg, layer))
    ]
    expert_rows = family.expert_rows(cfg, layer)
    if expert_rows:
        if d.experts % ep:
            raise ValueError(f"num experts {d.experts} is not divisible by expert parallel {ep}")
        per_rank = d.experts // ep
        for e in range(d.experts):
            pieces = tuple(_piece(r, d, mp, hp, e=e, i=e % per_rank) for r in expert_rows)
            units.append(Unit(f"{hp}mlp.experts.{e}", pp_rank, vp, e // per_rank, pieces))
    return units


def plan_units(hf_config: Any, config: TransformerConfig) -> list[Unit]:
    """All units in export order: embedding, layers 0..N-1, final norm, lm_head (if untied)."""
    family = get_family(hf_config)
    d = family.dims(hf_config)
    last_pp = config.pipeline_model_parallel_size - 1
    last_vp = (config.virtual_pipeline_model_parallel_size or 1) - 1
    where = layer_locations(config)
    units = [Unit("model.embed_tokens", 0, 0, None, (_piece(_EMBED, d, "", ""),))]
    for layer in range(d.layers):
        units += _layer_units(
            family, hf_config, d, layer, where[layer], config.expert_model_parallel_size
        )
    units.append(Unit("model.norm", last_pp, last_vp, None, (_piece(_NORM, d, "", ""),)))
    if not d.tied:
        units.append(Unit("lm_head", last_pp, last_vp, None, (_piece(_HEAD, d, "", ""),)))
    return units
