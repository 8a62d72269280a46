"""Reshard plan: which trainer rank sends which slice of which HF tensor to which engine rank.

Pure (no processes). The trainer half comes from ``megatron_bridge.holdings`` (who holds which
slice), the engine half from ``weightsync.engine_shards`` (who serves which slice). Every
engine rank's slice of every tensor is cut into the pieces that trainer slices cover, and each
piece is read from the least loaded of the data-parallel replicas holding it, so that the
replicas share the sending. No rank gathers a full tensor, and an engine rank receives exactly
what it serves (vLLM's loaders then take it at whole shape: ``vllm_plugin.shards``).

A piece of an int4 tensor (``Int4Config``) travels as its packed codes, scales and zero points
(``weightsync.quant.shards``): the trainer rank quantizes its own slice, exact only on group
boundaries; anything else is refused, naming the tensor and the engine's layout.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from megatron_bridge.meta import Box, Holding, box_numel
from weightsync.engine_shards import EngineLayout, ModelShape, engine_box
from weightsync.quant.config import Int4Config
from weightsync.quant.shards import packed_parts

_SIZED = {1: torch.uint8, 2: torch.bfloat16, 4: torch.float32, 8: torch.float64}


@dataclass(frozen=True, slots=True)
class Move:
    """One piece: trainer rank ``src`` sends ``box`` of ``name`` to ``worker`` of ``engine``."""

    src: int
    engine: int
    worker: int
    name: str
    box: Box
    nbytes: int


@dataclass(frozen=True)
class ReshardPlan:
    moves: tuple[Move, ...]
    served: Mapping[tuple[int, int], int]
    """(engine, worker) -> bytes of the slices it serves."""
    model_bytes: int
    """Bytes of the whole model as the engines load it (one copy)."""
    engine_tps: tuple[int, ...]
    """Ranks of each engine, in order."""
    sent: Mapping[int, int] = field(init=False)
    received: Mapping[tuple[int, int], int] = field(init=False)

    def __post_init__(self) -> None:
        sent: dict[int, int] = defaultdict(int)
        received: dict[tuple[int, int], int] = defaultdict(int)
        for m in self.moves:
            sent[m.src] += m.nbytes
            received[(m.engine, m.worker)] += m.nbytes
        object.__setattr__(self, "sent", dict(sent))
        object.__setattr__(self, "received", dict(received))

    def for_source(self, rank: int) -> list[Move]:
        return [m for m in self.moves if m.src == rank]

    def for_worker(self, engine: int, worker: int) -> list[Move]:
        return [m for m in self.moves if (m.engine, m.worker) == (engine, worker)]


def plan_reshard(
    holdings: Sequence[Holding],
    itemsize: Mapping[str, int],
    engines: Sequence[EngineLayout],
    model: ModelShape,
    int4: Int4Config | None = None,
    split_bytes: int = 1 << 20,
) -> ReshardPlan:
    """Every piece every engine rank needs, with its sender (see the module doc).

    ``itemsize``: bytes per element of every HF tensor exported (before int4 packing): a
    tensor named here that no holding covers is refused.
    Each piece goes to the least loaded of its holders; a piece held by several replicas and
    larger than ``split_bytes`` is cut by rows into parts read from different replicas (a
    replicated weight would otherwise load one rank with every engine rank's copy).
    """
    by_name: dict[str, list[Holding]] = defaultdict(list)
    for h in holdings:
        by_name[h.name].append(h)
    unheld = sorted(set(itemsize) - set(by_name))
    if unheld:
        raise ValueError(f"no trainer rank holds any slice of {unheld[:5]} ({len(unheld)} tensors)")
    pieces: list[tuple[tuple[int, ...], int, int, str, Box, int]] = []
    served: dict[tuple[int, int], int] = defaultdict(int)
    cache: dict[tuple[EngineLayout, int], list] = {}  # engines alike need the same pieces
    for e, layout in enumerate(engines):
        for w in range(layout.tp):
            if (layout, w) not in cache:
                cache[(layout, w)] = _worker_pieces(
                    by_name, itemsize, layout, model, w, int4, split_bytes
                )
            for ranks, name, box, nbytes in cache[(layout, w)]:
                pieces.append((ranks, e, w, name, box, nbytes))
                served[(e, w)] += nbytes
    # The least loaded holder takes each piece, pieces with the fewest holders first: a rank's
    # fixed load (its own experts) is known before the shared load (replicated weights) is
    # spread, so the shared load can even it out.
    load: dict[int, int] = defaultdict(int)
    src = [0] * len(pieces)
    for i in sorted(range(len(pieces)), key=lambda i: len(pieces[i][0])):
        ranks, nbytes = pieces[i][0], pieces[i][5]
        src[i] = min(ranks, key=lambda r: (load[r], r))
        load[src[i]] += nbytes
    moves = tuple(Move(src[i], *p[1:]) for i, p in enumerate(pieces))
    whole = sum(
        _wire_bytes(n, hs[0].shape, _whole(hs[0].shape), itemsize[n], int4, EngineLayout())
        for n, hs in by_name.items()
    )
    return ReshardPlan(moves, dict(served), whole, tuple(e.tp for e in engines))


def _worker_pieces(
    by_name: Mapping[str, list[Holding]],
    itemsize: Mapping[str, int],
    layout: EngineLayout,
    model: ModelShape,
    worker: int,
    int4: Int4Config | None,
    split_bytes: int,
) -> list[tuple[tuple[int, ...], str, Box, int]]:
    """(holders, name, box, wire bytes) of every piece one engine rank needs."""
    out = []
    for name, held in by_name.items():
        need = engine_box(name, held[0].shape, layout, model, worker)
        if need is None:
            continue
        size = itemsize[name]
        for ranks, box in _cover(name, need, held, layout):
            for part in _spread(box, len(ranks), size, split_bytes, int4 is not None):
                nbytes = _wire_bytes(name, held[0].shape, part, size, int4, layout)
                out.append((ranks, name, part, nbytes))
    return out


def _cover(
    name: str, need: Box, held: list[Holding], layout: EngineLayout
) -> list[tuple[tuple[int, ...], Box]]:
    """The trainer slices' parts of ``need``: (holders, box); refused unless they tile it."""
    out = []
    for h in held:
        part = _intersect(need, h.box)
        if part is not None:
            out.append((h.ranks, part))
    covered = sum(box_numel(b) for _, b in out)
    if covered != box_numel(need):
        raise ValueError(
            f"{name}: the trainer's slices cover {covered} of the {box_numel(need)} elements "
            f"engine {layout} needs in {need} (slices held: {[h.box for h in held]})"
        )
    return out


def _spread(box: Box, holders: int, itemsize: int, split_bytes: int, int4: bool) -> list[Box]:
    """``box`` cut by rows into at most ``holders`` parts of at least ``split_bytes`` each
    (multiples of 8 rows when int4, so zero-point words stay whole)."""
    rows = box[0][1] - box[0][0]
    parts = min(holders, box_numel(box) * itemsize // max(split_bytes, 1), rows)
    if parts <= 1:
        return [box]
    align = 8 if int4 else 1
    step = -(-rows // parts // align) * align
    lo, hi = box[0]
    return [((r, min(r + step, hi)), *box[1:]) for r in range(lo, hi, step)]


def _intersect(a: Box, b: Box) -> Box | None:
    box = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b, strict=True))
    return box if all(lo < hi for lo, hi in box) else None


def _whole(shape: tuple[int, ...]) -> Box:
    return tuple((0, s) for s in shape)


def _wire_bytes(
    name: str,
    shape: tuple[int, ...],
    box: Box,
    itemsize: int,
    int4: Int4Config | None,
    layout: EngineLayout,
) -> int:
    """Bytes of ``box`` on the wire: as exported, or as int4 codes + scales (+ zero points)."""
    like = _SIZED[itemsize]  # only the size matters here
    parts = packed_parts(name, shape, box, like, int4, where=f" for engine {layout}")
    return sum(box_numel(b) * dtype.itemsize for _, b, dtype in parts)
