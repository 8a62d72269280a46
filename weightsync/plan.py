"""Bucket plan: the byte layout in which one weight update travels. Pure; no processes.

(``check_plan_identical``, the collective that compares plans across ranks, lives in
``weightsync.plan_checks``.)

The exporter streams tensors one atomic unit at a time (a unit is what an engine's
``load_weights`` must see together: q/k/v of a layer, an expert's w1/w3, an int4 weight with
its scale and shape). ``build_plan`` cuts that stream into byte-bounded buckets without ever
splitting a unit, and lays each bucket out as one flat buffer per dtype.

Byte layout of a bucket (the wire format of every transport): the dtype groups are concatenated
in order of decreasing element size (int64 before fp32/int32 before bf16 before int8), each
group packing its tensors back to back in stream order. Every group, and so every tensor,
therefore starts at a multiple of its own element size with no padding at all. That natural
alignment is what ``Tensor.view(dtype)`` needs, and zero padding makes the bucket byte-for-byte
SGLang's ``FlattenedTensorBucket`` of ``bucket.names()``: its receiver computes offsets with no
padding and rejects a tensor whose byte offset is not a multiple of its element size. Buffers
themselves come from the allocator (64-byte aligned on CPU, 512 on CUDA) or from page-aligned
shared memory, so no further alignment is needed.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from weightsync.config import MiB
from weightsync.tensors import dtype_name

DEFAULT_BUCKET_BYTES = 512 * MiB


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """One tensor of the export stream, before any bytes exist."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    unit: str
    """Atomic-unit id: all tensors of one unit go into the same bucket."""


@dataclass(frozen=True, slots=True)
class Slot:
    """Where one tensor lives inside its dtype group (offsets in elements of that dtype)."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int


@dataclass(frozen=True, slots=True)
class DtypeGroup:
    """The flat buffer of one dtype in one bucket."""

    dtype: torch.dtype
    entries: tuple[Slot, ...]
    numel: int
    byte_offset: int
    """Start of this group in the bucket's byte layout (a multiple of the element size)."""

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True, slots=True)
class Bucket:
    index: int
    groups: tuple[DtypeGroup, ...]
    nbytes: int

    def names(self) -> list[str]:
        """Tensor names in byte order (the order of SGLang's flattened_bucket request)."""
        return [s.name for g in self.groups for s in g.entries]

    def metas(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(name, dtype, shape) in byte order."""
        return [(s.name, g.dtype, s.shape) for g in self.groups for s in g.entries]

    @property
    def num_tensors(self) -> int:
        return sum(len(g.entries) for g in self.groups)


@dataclass(frozen=True, slots=True)
class Plan:
    buckets: tuple[Bucket, ...]
    bucket_bytes: int

    @property
    def max_bucket_nbytes(self) -> int:
        return max((b.nbytes for b in self.buckets), default=0)

    @property
    def total_nbytes(self) -> int:
        return sum(b.nbytes for b in self.buckets)

    def bucket_digests(self) -> list[str]:
        return [_bucket_digest(b) for b in self.buckets]

    def digest(self) -> str:
        """Stable hash of the layout (names, dtypes, shapes, offsets, bucket cuts)."""
        h = hashlib.sha256()
        for d in self.bucket_digests():
            h.update(d.encode())
        return h.hexdigest()


def _bucket_digest(bucket: Bucket) -> str:
    h = hashlib.sha256(f"bucket {bucket.index} {bucket.nbytes}\n".encode())
    for g in bucket.groups:
        h.update(f"group {dtype_name(g.dtype)} {g.byte_offset} {g.numel}\n".encode())
        for s in g.entries:
            h.update(f"{s.name} {list(s.shape)} {s.offset} {s.numel}\n".encode())
    return h.hexdigest()


def _group_order(dtype: torch.dtype) -> tuple[int, str]:
    return (-dtype.itemsize, dtype_name(dtype))


def _validate(metas: Sequence[TensorMeta]) -> None:
    seen: set[str] = set()
    closed_units: set[str] = set()
    current: str | None = None
    for m in metas:
        if not isinstance(m.dtype, torch.dtype):
            raise ValueError(f"tensor {m.name!r}: dtype {m.dtype!r} is not a torch.dtype")
        if m.name in seen:
            raise ValueError(f"tensor {m.name!r} appears twice in the export stream")
        seen.add(m.name)
        if any((not isinstance(d, int)) or d <= 0 for d in m.shape):
            raise ValueError(
                f"tensor {m.name!r}: shape {tuple(m.shape)} has a zero, negative "
                "or non-integer dim; every dim must be a positive int"
            )
        if m.unit != current:
            if m.unit in closed_units:
                raise ValueError(
                    f"tensor {m.name!r}: unit {m.unit!r} reappears after other "
                    "units; a unit's tensors must be contiguous in the stream"
                )
            if current is not None:
                closed_units.add(current)
            current = m.unit


def _units(metas: Sequence[TensorMeta]) -> Iterator[list[TensorMeta]]:
    run: list[TensorMeta] = []
    for m in metas:
        if run and m.unit != run[0].unit:
            yield run
            run = []
        run.append(m)
    if run:
        yield run


def _nbytes(m: TensorMeta) -> int:
    return math.prod(m.shape) * m.dtype.itemsize


def _layout(index: int, metas: list[TensorMeta]) -> Bucket:
    by_dtype: dict[torch.dtype, list[TensorMeta]] = {}
    for m in metas:
        by_dtype.setdefault(m.dtype, []).append(m)
    groups, byte_offset = [], 0
    for dtype in sorted(by_dtype, key=_group_order):
        slots, offset = [], 0
        for m in by_dtype[dtype]:
            numel = math.prod(m.shape)
            slots.append(Slot(m.name, tuple(m.shape), offset, numel))
            offset += numel
        assert byte_offset % dtype.itemsize == 0, "decreasing item sizes keep groups aligned"
        groups.append(DtypeGroup(dtype, tuple(slots), offset, byte_offset))
        byte_offset += offset * dtype.itemsize
    return Bucket(index, tuple(groups), byte_offset)


def build_plan(metas: Iterable[TensorMeta], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Plan:
    """Cut the stream into buckets of at most ``bucket_bytes`` (a bigger unit gets its own)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes={bucket_bytes} must be > 0")
    metas = list(metas)
    _validate(metas)
    cuts: list[list[TensorMeta]] = []
    size = 0
    for unit in _units(metas):
        unit_bytes = sum(_nbytes(m) for m in unit)
        if not cuts or size + unit_bytes > bucket_bytes:
            cuts.append([])
            size = 0
        cuts[-1].extend(unit)
        size += unit_bytes
    return Plan(tuple(_layout(i, c) for i, c in enumerate(cuts)), bucket_bytes)


def flat_bucket(tensors: dict[str, torch.Tensor]) -> tuple[Bucket, torch.Tensor]:
    """``tensors`` as one bucket (grouped by dtype, in order) and its filled byte buffer: a
    small set sent whole, e.g. a LoRA adapter."""
    metas = [TensorMeta(n, t.dtype, tuple(t.shape), "all") for n, t in tensors.items()]
    bucket = _layout(0, metas)
    flat = allocate_bucket(bucket.nbytes)
    fill_bucket(bucket, bucket_views(bucket, flat), tensors.items())
    return bucket, flat


def allocate_bucket(bucket_nbytes: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """One uint8 buffer able to hold a bucket (see ``bucket_views``)."""
    return torch.empty(bucket_nbytes, dtype=torch.uint8, device=device)


def bucket_views(bucket: Bucket, flat: torch.Tensor) -> dict[torch.dtype, torch.Tensor]:
    """Per-dtype flat buffers of ``bucket`` carved out of one uint8 buffer (no copies)."""
    if flat.dtype != torch.uint8 or flat.dim() != 1 or flat.numel() < bucket.nbytes:
        raise ValueError(
            f"bucket {bucket.index}: need a 1-D uint8 buffer of at least "
            f"{bucket.nbytes} bytes, got {flat.dtype} {tuple(flat.shape)}"
        )
    return {
        g.dtype: flat[g.byte_offset : g.byte_offset + g.nbytes].view(g.dtype) for g in bucket.groups
    }


def fill_bucket(
    bucket: Bucket,
    buffers: dict[torch.dtype, torch.Tensor],
    named_tensors: Iterable[tuple[str, torch.Tensor]],
) -> None:
    """Copy every tensor of ``bucket`` into its slot; each must come exactly once."""
    slots = {s.name: (g.dtype, s) for g in bucket.groups for s in g.entries}
    filled: set[str] = set()
    for name, tensor in named_tensors:
        if name not in slots:
            raise ValueError(f"tensor {name!r} is not in bucket {bucket.index}")
        if name in filled:
            raise ValueError(f"tensor {name!r} given twice for bucket {bucket.index}")
        dtype, slot = slots[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != slot.shape:
            raise ValueError(
                f"tensor {name!r}: got {tensor.dtype} {tuple(tensor.shape)}, the "
                f"plan says {dtype} {slot.shape}"
            )
        buffers[dtype][slot.offset : slot.offset + slot.numel].view(slot.shape).copy_(tensor)
        filled.add(name)
    missing = [n for n in slots if n not in filled]
    if missing:
        raise ValueError(
            f"bucket {bucket.index} is missing tensors {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}"
        )


def unpack_bucket(
    bucket: Bucket, buffers: dict[torch.dtype, torch.Tensor]
) -> list[tuple[str, torch.Tensor]]:
    """Views of every tensor of ``bucket`` in received buffers, in byte order."""
    out = []
    for g in bucket.groups:
        buf = buffers.get(g.dtype)
        if buf is None or buf.dtype != g.dtype or buf.numel() < g.numel:
            raise ValueError(
                f"bucket {bucket.index}: no {g.dtype} buffer of {g.numel} elements "
                f"(tensors {[s.name for s in g.entries[:3]]})"
            )
        out.extend((s.name, buf[s.offset : s.offset + s.numel].view(s.shape)) for s in g.entries)
    return out
