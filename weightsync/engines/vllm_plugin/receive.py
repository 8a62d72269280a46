"""Receiver-side pieces of the weightsync backend: where bucket bytes come from, inside vLLM.

Both sources hand out views into buffers they reuse for the next bucket (fresh memory per
bucket costs page faults that dominate the transfer), so whoever keeps a view past the bucket
must copy it: see ``unalias_pending``.
"""

from __future__ import annotations

import json
import struct
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from weightsync.engines.vllm_plugin.wire import InitInfo, UpdateInfo

Named = list[tuple[str, torch.Tensor]]
_ST_DTYPES = {
    "BF16": "bfloat16",
    "F16": "float16",
    "F32": "float32",
    "F64": "float64",
    "I8": "int8",
    "U8": "uint8",
    "I16": "int16",
    "I32": "int32",
    "I64": "int64",
    "BOOL": "bool",
}


def _views(flat: torch.Tensor, entries: list) -> Named:
    return [(name, flat[off : off + n].view(shape)) for name, shape, off, n in entries]


class Source:
    def receive(self, update: UpdateInfo) -> Named:
        raise NotImplementedError

    def buffers(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def close(self) -> None:
        pass


def join_group(info: InitInfo) -> dist.ProcessGroup:
    """Join the trainer's group the way SGLang's ``init_custom_process_group`` builds it:
    a TCPStore at master_address:port, namespaced by PrefixStore(group_name), so a trainer
    that serves SGLang engines serves this one with the same code."""
    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
    )

    timeout = timedelta(seconds=info.timeout_s)
    store = dist.TCPStore(
        info.master_address, info.master_port, info.world_size, is_master=False, timeout=timeout
    )
    pg, _ = _new_process_group_helper(
        info.world_size,
        info.rank,
        [],
        Backend("gloo"),
        PrefixStore(info.group_name, store),
        group_name=info.group_name,
        timeout=timeout,
    )
    _world.pg_group_ranks[pg] = {i: i for i in range(info.world_size)}
    return pg


class BroadcastSource(Source):
    """Each dtype group of a bucket is one gloo broadcast from rank 0, in group order."""

    def __init__(self, info: InitInfo) -> None:
        self.group = join_group(info)
        self._bufs: dict[str, torch.Tensor] = {}

    def _buffer(self, dtype: str, numel: int) -> torch.Tensor:
        buf = self._bufs.get(dtype)
        if buf is None or buf.numel() < numel:
            buf = self._bufs[dtype] = torch.empty(numel, dtype=getattr(torch, dtype))
        return buf[:numel]

    def receive(self, update: UpdateInfo) -> Named:
        named: Named = []
        for g in update.groups:
            flat = self._buffer(g["dtype"], g["numel"])
            dist.broadcast(flat, src=0, group=self.group)
            named += _views(flat, g["entries"])
        return named

    def buffers(self) -> list[torch.Tensor]:
        return list(self._bufs.values())

    def close(self) -> None:
        dist.destroy_process_group(self.group)
        self._bufs.clear()


class ShmSource(Source):
    """Slots of a persistent ring in /dev/shm, mapped once; the trainer fills a slot, then
    names it in the bucket's update; the HTTP answer tells it the slot is free again."""

    def __init__(self, info: InitInfo) -> None:
        self.slots = [
            torch.from_file(str(_shm_path(n)), shared=True, size=info.slot_bytes, dtype=torch.uint8)
            for n in info.slot_names
        ]

    def receive(self, update: UpdateInfo) -> Named:
        if not 0 <= update.slot < len(self.slots):
            raise ValueError(
                f"bucket {update.bucket}: slot {update.slot} not in the ring of {len(self.slots)}"
            )
        base = self.slots[update.slot]
        named: Named = []
        for g in update.groups:
            dtype = getattr(torch, g["dtype"])
            start, size = g["byte_offset"], g["numel"] * dtype.itemsize
            if start % dtype.itemsize or start + size > base.numel():
                raise ValueError(
                    f"bucket {update.bucket}: {g['dtype']} group at byte "
                    f"{start} (+{size}) does not fit the {base.numel()}-byte slot"
                )
            named += _views(base[start : start + size].view(dtype), g["entries"])
        return named

    def buffers(self) -> list[torch.Tensor]:
        return self.slots

    def close(self) -> None:
        self.slots = []


def _shm_path(name: str) -> Path:
    path = Path(name)
    return path if path.is_absolute() and path.exists() else Path("/dev/shm") / name.lstrip("/")


def unalias_pending(model: torch.nn.Module, buffers: list[torch.Tensor]) -> None:
    """Copy tensors that vLLM's layerwise reload still holds for incomplete layers out of
    our reused buffers."""
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

    ptrs = {b.untyped_storage().data_ptr() for b in buffers}
    for layer in model.modules():
        info = LAYERWISE_INFO.get(layer)
        for _, bound in info.loaded_weights if info is not None else ():
            for key, value in bound.arguments.items():
                if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() in ptrs:
                    bound.arguments[key] = value.clone()


def checkpoint_params(model_dir: str) -> dict[str, list]:
    """``{name: [dtype, shape]}`` from the safetensors headers the engine was started from:
    the checkpoint-format names and layouts ``load_weights`` accepts."""
    out: dict[str, list] = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, meta in header.items():
            if name != "__metadata__":
                out[name] = [_ST_DTYPES.get(meta["dtype"], meta["dtype"]), meta["shape"]]
    if not out:
        raise ValueError(f"no safetensors weights found in {model_dir!r}")
    return out
