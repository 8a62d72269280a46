"""Which trainer ranks hold which slice of every HF tensor: the trainer half of a reshard plan.

Computed from the export plan (units.py) and the parallel sizes alone, like the plan itself:
no tensors, no collectives, so it serves a running job and a 1T config on a laptop alike.

A megatron parameter is either replicated over its tensor-parallel group or cut along one dim
(``SPLIT_DIM``, checked against the live parameters' own ``partition_dim`` by
``check_split_rules``). Cut along dim d into n equal blocks, rank r's block becomes, in HF terms:
  SAME        block r of the one HF tensor along d
  QKV / GLU   block r (dim 0) of each HF tensor: megatron keeps whole KV groups per rank, and
              [gate_r | up_r] per rank, so each rank's rows are contiguous in q/k/v and gate/up
  VOCAB       rows [r Vp/n, (r+1) Vp/n) of the padded vocabulary, clipped to the real one
Every rank of the data-parallel replicas holds the same block; all of them are listed, so a
plan can spread its reads over the replicas.

Global ranks follow megatron's default order "tp-cp-ep-dp-pp" (tensor parallel fastest):
dense    rank = tp_rank + tp * (dp_rank + dp * pp_rank)
experts  rank = etp_rank + etp * (ep_rank + ep * (edp_rank + edp * pp_rank))
(context parallel is 1 here; ``init_parallel`` does not take it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.transformer import MLATransformerConfig, TransformerConfig
from torch import nn

from megatron_bridge.chunks import local_tensors, lookup, unwrap
from megatron_bridge.export import plan
from megatron_bridge.families import get_family
from megatron_bridge.families.base import GLU, QKV, VOCAB, Dims, Shape
from megatron_bridge.gather import is_sharded
from megatron_bridge.meta import Box, Holding
from megatron_bridge.model import as_hf_config, padded_vocab_size
from megatron_bridge.parallel import current_layout
from megatron_bridge.units import Piece, Unit, plan_units

SPLIT_DIM: dict[str, int] = {
    "linear_qkv.weight": 0,
    "linear_qkv.bias": 0,
    "linear_fc1.weight": 0,
    "linear_q_proj.weight": 0,
    "linear_q_up_proj.weight": 0,
    "linear_kv_up_proj.weight": 0,
    # MLA's down projections: column parallel in the local spec build_model uses (TE's spec
    # replicates them; check_split_rules refuses a model built that way).
    "linear_q_down_proj.weight": 0,
    "linear_kv_down_proj.weight": 0,
    "word_embeddings.weight": 0,
    "output_layer.weight": 0,
    "linear_proj.weight": 1,
    "linear_fc2.weight": 1,
}
"""Megatron parameter name suffix -> the dim its tensor-parallel shards cut; any other
parameter (norms, routers, the shared-expert gate) is replicated."""


@dataclass(frozen=True, slots=True)
class ParallelSizes:
    """The trainer's parallel layout: what the holdings depend on besides the model."""

    world: int
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None
    """None: tp (megatron's default)."""
    padded_vocab: int | None = None
    """Rows of megatron's (padded) embedding and output layer; None: ``build_model``'s
    default padding (a multiple of 128 x tp)."""

    def __post_init__(self) -> None:
        if self.etp is None:
            object.__setattr__(self, "etp", self.tp)
        if self.world % (self.tp * self.pp) or self.world % (self.etp * self.ep * self.pp):
            raise ValueError(
                f"world {self.world} is not divisible by tp={self.tp} x pp={self.pp} "
                f"and by etp={self.etp} x ep={self.ep} x pp={self.pp}"
            )

    def dense_ranks(self, tp_rank: int, pp_rank: int) -> tuple[int, ...]:
        dp = self.world // (self.tp * self.pp)
        return tuple(tp_rank + self.tp * (d + dp * pp_rank) for d in range(dp))

    def expert_ranks(self, etp_rank: int, ep_rank: int, pp_rank: int) -> tuple[int, ...]:
        edp = self.world // (self.etp * self.ep * self.pp)
        base = self.etp * self.ep
        return tuple(etp_rank + self.etp * ep_rank + base * (d + edp * pp_rank) for d in range(edp))


def split_dim(mcore: str) -> int | None:
    for suffix, dim in SPLIT_DIM.items():
        if mcore.endswith(suffix):
            return dim
    return None


def trainer_holdings(units: list[Unit], dims: Dims, sizes: ParallelSizes) -> list[Holding]:
    """Every slice of every HF tensor of ``units``, with its holders (see the module doc)."""
    out: list[Holding] = []
    for unit in units:
        expert = unit.expert_owner is not None
        n = sizes.etp if expert else sizes.tp

        def holders(r: int, unit: Unit = unit, expert: bool = expert) -> tuple[int, ...]:
            if expert:
                return sizes.expert_ranks(r, unit.expert_owner, unit.pp_rank)
            return sizes.dense_ranks(r, unit.pp_rank)

        for piece in unit.pieces:
            if split_dim(piece.mcore) is None:
                every = tuple(sorted(x for r in range(n) for x in holders(r)))
                out += [
                    Holding(h, s, _whole(s), every, **_origin(piece, unit, k, -1, n))
                    for k, (h, s) in enumerate(_named(piece))
                ]
                continue
            for r in range(n):
                out += _block(piece, unit, dims, sizes, r, n, holders(r))
    return out


def _block(
    piece: Piece,
    unit: Unit,
    dims: Dims,
    sizes: ParallelSizes,
    r: int,
    n: int,
    ranks: tuple[int, ...],
) -> list[Holding]:
    """TP rank ``r``'s block of a split ``piece``, in HF tensors."""
    dim = split_dim(piece.mcore)
    assert dim is not None, piece.mcore
    if piece.kind is QKV and dims.kv_heads % n:
        # megatron then keeps a copy of a KV group on several ranks: not a clean cut of k/v
        raise ValueError(
            f"{piece.hf[1]}: {dims.kv_heads} KV heads over tensor parallel {n} (a KV group on "
            "several ranks): the sharded plan needs whole KV groups per rank"
        )
    if piece.kind is VOCAB:
        padded = sizes.padded_vocab or padded_vocab_size(dims.vocab, 128, n)
        if padded < dims.vocab or padded % n:
            raise ValueError(
                f"{piece.hf[0]}: padded vocabulary {padded} must cover the {dims.vocab} tokens "
                f"and split over tensor parallel {n}"
            )
        block = padded // n
        lo, hi = min(r * block, dims.vocab), min((r + 1) * block, dims.vocab)
        name, shape = piece.hf[0], piece.shapes[0]
        box = _cut(shape, 0, lo, hi)
        return (
            [Holding(name, shape, box, ranks, **_origin(piece, unit, 0, r, n))] if hi > lo else []
        )
    assert piece.kind in (QKV, GLU) or len(piece.hf) == 1, piece.mcore
    out = []
    for k, (name, shape) in enumerate(_named(piece)):
        if shape[dim] % n:
            raise ValueError(
                f"{name}: dim {dim} of {shape} does not split over tensor parallel {n}"
            )
        step = shape[dim] // n
        box = _cut(shape, dim, r * step, (r + 1) * step)
        out.append(Holding(name, shape, box, ranks, **_origin(piece, unit, k, r, n)))
    return out


def _origin(piece: Piece, unit: Unit, part: int, block: int, n: int) -> dict[str, Any]:
    return dict(
        mcore=piece.mcore,
        vp_stage=unit.vp_stage,
        part=part,
        block=block,
        tp_size=n,
        kind=piece.kind,
    )


def _named(piece: Piece) -> list[tuple[str, Shape]]:
    return list(zip(piece.hf, piece.shapes, strict=True))


def _whole(shape: Shape) -> Box:
    return tuple((0, s) for s in shape)


def _cut(shape: Shape, dim: int, lo: int, hi: int) -> Box:
    return tuple((lo, hi) if i == dim else (0, s) for i, s in enumerate(shape))


def plan_holdings(hf_config: Any, sizes: ParallelSizes, **config_overrides: Any) -> list[Holding]:
    """``trainer_holdings`` of an HF config under ``sizes``, from configs alone (no parallel
    state, no model): for plans and scale models of jobs that are not running here.

    ``config_overrides`` go to megatron's TransformerConfig (e.g. an uneven pipeline split:
    ``num_layers_in_first_pipeline_stage``)."""
    cfg = as_hf_config(hf_config)
    family = get_family(cfg)
    kwargs = family.transformer_kwargs(cfg)
    cls = MLATransformerConfig if kwargs.get("multi_latent_attention") else TransformerConfig
    config = cls(
        **kwargs,
        tensor_model_parallel_size=sizes.tp,
        pipeline_model_parallel_size=sizes.pp,
        expert_model_parallel_size=sizes.ep,
        expert_tensor_parallel_size=sizes.etp,
        pipeline_dtype=torch.bfloat16,
        **config_overrides,
    )
    return trainer_holdings(plan_units(cfg, config), family.dims(cfg), sizes)


def local_slice(tensors: list[dict[str, torch.Tensor]], h: Holding, dims: Dims) -> torch.Tensor:
    """``h.box`` of ``h.name`` read from this rank's own parameter (a view where it can be):
    the sending half of a sharded transfer."""
    n = h.tp_size
    local = lookup(tensors[h.vp_stage], h.mcore).detach()
    if h.block < 0:
        hf = h.kind.to_hf(local, dims)[h.part]
        return hf[tuple(slice(lo, hi) for lo, hi in h.box)]
    if h.kind is VOCAB:
        offset = h.block * (local.shape[0])
        return local[h.box[0][0] - offset : h.box[0][1] - offset]
    if h.kind is QKV:
        shard = replace(dims, heads=dims.heads // n, kv_heads=dims.kv_heads // n)
        return QKV.to_hf(local, shard)[h.part]
    if h.kind is GLU:
        return local.chunk(2, dim=0)[h.part]
    return local


def check_split_rules(tensors: list[dict[str, torch.Tensor]]) -> None:
    """Refuse a model whose parameters are cut otherwise than ``SPLIT_DIM`` says (a megatron
    version or layer spec that shards differently would send the wrong slices)."""
    for chunk in tensors:
        for name, t in chunk.items():
            live = t.partition_dim if is_sharded(t) else None
            stride = getattr(t, "partition_stride", 1) if is_sharded(t) else 1
            rule = split_dim(name)
            expected_stride = 2 if name.endswith("linear_fc1.weight") else 1
            if live != rule or (live is not None and stride != expected_stride):
                raise ValueError(
                    f"{name}: megatron cuts it along dim {live} (stride {stride}); the reshard "
                    f"plan expects {rule} (stride {expected_stride})"
                )


def live_holdings(model_chunks: Sequence[nn.Module], hf_config: Any) -> list[Holding]:
    """``trainer_holdings`` of the running job (its parallel state and its padded vocabulary),
    after checking that the live parameters are cut as ``SPLIT_DIM`` says. No communication."""
    cfg, units = plan(model_chunks, hf_config)
    check_split_rules(local_tensors(model_chunks))
    layout = current_layout()
    _check_rank_order(layout)
    sizes = ParallelSizes(
        world=dist.get_world_size(),
        tp=layout.tp,
        pp=layout.pp,
        ep=layout.ep,
        etp=layout.etp,
        padded_vocab=unwrap(model_chunks[0]).vocab_size,
    )
    return trainer_holdings(units, get_family(cfg).dims(cfg), sizes)


def shard_reader(
    model_chunks: Sequence[nn.Module], hf_config: Any, holdings: list[Holding]
) -> Callable[[str, Box], torch.Tensor]:
    """``read(name, box)``: a slice of an HF tensor from this rank's own parameters (it must
    lie inside one slice this rank holds). No communication."""
    rank, tensors = dist.get_rank(), local_tensors(model_chunks)
    cfg = as_hf_config(hf_config)
    dims = get_family(cfg).dims(cfg)
    mine: dict[str, list[Holding]] = {}
    for h in holdings:
        if rank in h.ranks:
            mine.setdefault(h.name, []).append(h)

    def read(name: str, box: Box) -> torch.Tensor:
        for h in mine.get(name, ()):
            if all(a0 <= b0 and b1 <= a1 for (a0, a1), (b0, b1) in zip(h.box, box, strict=True)):
                t = local_slice(tensors, h, dims)
                for dim, ((a0, _), (b0, b1)) in enumerate(zip(h.box, box, strict=True)):
                    t = t.narrow(dim, b0 - a0, b1 - b0)
                return t
        raise ValueError(f"{name}: rank {rank} holds no slice containing {box}")

    return read


def _check_rank_order(layout: Any) -> None:
    """This rank's global rank is where megatron's default order puts it (the holders of
    every slice are computed from that order): refuse any other mapping."""
    sizes = ParallelSizes(dist.get_world_size(), layout.tp, layout.pp, layout.ep, layout.etp)
    rank = dist.get_rank()
    dense = set(sizes.dense_ranks(layout.tp_rank, layout.pp_rank))
    expert = set(sizes.expert_ranks(layout.etp_rank, layout.ep_rank, layout.pp_rank))
    if rank not in dense or rank not in expert:
        raise ValueError(
            f"rank {rank} (tp {layout.tp_rank}, pp {layout.pp_rank}, ep {layout.ep_rank}, etp "
            f"{layout.etp_rank}) is not where megatron's default rank order tp-cp-ep-dp-pp puts "
            "it: the sharded plan needs that order"
        )
