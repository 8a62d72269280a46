"""Megatron shards -> full HF-named tensors, streamed one atomic unit at a time.

Who yields: global rank 0 (``EXPORT_SOURCE_RANK``; pp = tp = ep = etp = dp = 0 in megatron's
rank order) yields every unit. Every other rank must iterate the generator to its end too (it
yields nothing there) because it takes part in the collectives. Per unit:

1. on the owning pipeline stage, the data-parallel-0 replica gathers each parameter onto its
   TP (or, for routed experts, expert-TP) group rank 0 and converts it to HF layout;
2. a routed expert held by expert-parallel rank r > 0 is sent to EP rank 0 of that stage;
3. a unit on pipeline stage s > 0 is sent down the pipeline group to global rank 0.

If rank 0 stops consuming early (an exception in its loop), the other ranks wait inside a
collective until the process group's timeout: abort the whole job on failure.

Peak extra memory on rank 0 is one unit (plus one TP shard in flight), never the model.
Tensors that need no merge (TP=1, no layout change) alias the parameters: copy them if you
keep them past the next optimizer step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from megatron_bridge.chunks import (
    check_coverage,
    holds,
    local_tensors,
    lookup,
    model_dtype,
    unwrap,
)
from megatron_bridge.families import get_family
from megatron_bridge.families.base import Dims
from megatron_bridge.gather import gather_many_to_first, gather_to_first, hop
from megatron_bridge.meta import HFWeightMeta
from megatron_bridge.model import as_hf_config
from megatron_bridge.parallel import Layout, current_layout
from megatron_bridge.units import Piece, Unit, plan_units


def plan(chunks: Sequence[nn.Module], hf_config: Any) -> tuple[Any, list[Unit]]:
    """The HF config object and the export plan of ``chunks``."""
    if not chunks:
        raise ValueError("model_chunks is empty")
    cfg = as_hf_config(hf_config)
    return cfg, plan_units(cfg, unwrap(chunks[0]).config)


def hf_weight_metadata(model_chunks: Sequence[nn.Module], hf_config: Any) -> list[HFWeightMeta]:
    """Every tensor ``export_hf_weights`` yields, in order.

    Identical on all ranks and computed from the configs alone: no communication, no data.
    """
    _, units = plan(model_chunks, hf_config)
    dtype = model_dtype(model_chunks)
    return [
        HFWeightMeta(name, shape, piece.dtype or dtype, unit.name)
        for unit in units
        for piece in unit.pieces
        for name, shape in zip(piece.hf, piece.shapes, strict=True)
    ]


@dataclass(frozen=True, slots=True)
class _Export:
    """What one export pass reads on this rank."""

    layout: Layout
    dims: Dims
    dtype: torch.dtype
    device: torch.device
    tensors: list[dict[str, torch.Tensor]]


def _convert(piece: Piece, full: torch.Tensor | None, ex: _Export) -> list[torch.Tensor] | None:
    """The HF tensors of ``piece`` from its gathered megatron tensor (None off TP rank 0)."""
    if full is None:
        return None
    hf = piece.kind.to_hf(full, ex.dims)
    for name, t, shape in zip(piece.hf, hf, piece.shapes, strict=True):
        if tuple(t.shape) != shape or t.dtype != (piece.dtype or ex.dtype):
            raise ValueError(
                f"{name}: got {tuple(t.shape)} {t.dtype} from {piece.mcore}, "
                f"expected {shape} {piece.dtype or ex.dtype}"
            )
    return hf


def _gather_all(units: list[Unit], ex: _Export) -> dict[int, list[torch.Tensor | None]]:
    """Every dense piece this rank holds, gathered over TP in one collective (batched
    ``stream_units``): ``{unit index: full tensor per piece}``, None off TP rank 0."""
    layout = ex.layout
    held = [
        i
        for i, u in enumerate(units)
        if u.expert_owner is None and layout.dense_holder and holds(u, layout)
    ]
    params = [lookup(ex.tensors[units[i].vp_stage], p.mcore) for i in held for p in units[i].pieces]
    fulls = gather_many_to_first(params, layout.tp_group)
    out, at = {}, 0
    for i in held:
        n = len(units[i].pieces)
        out[i] = [None] * n if fulls is None else fulls[at : at + n]
        at += n
    return out


def _collect(
    unit: Unit, ex: _Export, gathered: list[torch.Tensor | None] | None = None
) -> list[tuple[str, torch.Tensor]]:
    layout = ex.layout
    expert = unit.expert_owner is not None
    holder = layout.expert_holder if expert else layout.dense_holder
    out: list[tuple[str, torch.Tensor]] = []
    for k, piece in enumerate(unit.pieces):
        like = [(s, piece.dtype or ex.dtype) for s in piece.shapes]
        hf = None
        if holder and holds(unit, layout):
            if gathered is None:
                local = lookup(ex.tensors[unit.vp_stage], piece.mcore)
                full = gather_to_first(local, layout.etp_group if expert else layout.tp_group)
            else:
                full = gathered[k]
            hf = _convert(piece, full, ex)
        ep_endpoint = layout.etp_rank == 0 and layout.ep_rank in (0, unit.expert_owner)
        if expert and holder and layout.pp_rank == unit.pp_rank and ep_endpoint:
            hf = hop(hf, unit.expert_owner, layout.ep_group, like, ex.device)
        if layout.on_source_line and layout.pp_rank in (0, unit.pp_rank):
            hf = hop(hf, unit.pp_rank, layout.pp_group, like, ex.device)
        if layout.is_source:
            assert hf is not None, unit.name
            out += zip(piece.hf, hf, strict=True)
    return out


def iter_hf_units(
    model_chunks: Sequence[nn.Module], hf_config: Any, every_rank: bool = False
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """One list of (HF name, full tensor) per atomic unit, on the source rank (see module doc).

    Collective: every rank of the job iterates it to the end, or every rank stops after the
    same unit (``every_rank``: the other ranks yield an empty list per unit, so they can count
    units in step with the source). Tensors are on the model's device.
    """
    cfg, units = plan(model_chunks, hf_config)
    yield from stream_units(model_chunks, cfg, units, every_rank, check=True)


def stream_units(
    model_chunks: Sequence[nn.Module],
    cfg: Any,
    units: list[Unit],
    every_rank: bool = False,
    check: bool = False,
    batched: bool = False,
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """``iter_hf_units`` for any plan of units (the weights', or a LoRA adapter's).

    ``check``: first refuse local parameters that no unit exports (for a plan of the whole
    model; LoRA weights are never counted). ``batched``: gather every dense piece over TP in
    one collective first (one message per rank, not one per tensor), holding the whole set on
    TP rank 0: for small plans of many tensors, a LoRA adapter.
    """
    layout = current_layout()
    if len(model_chunks) != layout.vpp:
        raise ValueError(
            f"got {len(model_chunks)} model chunks for virtual pipeline size {layout.vpp}"
        )
    d = get_family(cfg).dims(cfg)
    tensors = local_tensors(model_chunks)
    if check:
        check_coverage(units, tensors, model_chunks, layout, d)
    device = next(iter(model_chunks[0].parameters())).device
    ex = _Export(layout, d, model_dtype(model_chunks), device, tensors)
    with torch.no_grad():
        gathered = _gather_all(units, ex) if batched else {}
        for i, unit in enumerate(units):
            named = _collect(unit, ex, gathered.get(i))
            if layout.is_source or every_rank:
                yield named
            del named  # hold one unit, not two, while the next one is gathered


def export_hf_weights(
    model_chunks: Sequence[nn.Module], hf_config: Any
) -> Iterator[tuple[str, torch.Tensor]]:
    """Full HF-named tensors, in ``hf_weight_metadata`` order, yielded on the source rank only.

    Collective: every rank of the job iterates it to the end (see the module doc for who sends
    what). Vocabulary padding is trimmed; tied models export no ``lm_head.weight``.
    """
    for unit in iter_hf_units(model_chunks, hf_config):
        unit.reverse()
        while unit:
            yield unit.pop()  # drop our reference as we go: the consumer owns the tensor
