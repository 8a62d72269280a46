"""Receiver-side pieces of the weightsync backend: where bucket bytes come from, inside vLLM.

Both sources hand out views into buffers they reuse for later buckets (fresh memory per bucket
costs page faults that dominate the transfer), so whoever keeps a view past ``release`` must
copy it: see ``unalias_pending``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from weightsync.engines.vllm_plugin.wire import InitInfo
from weightsync.plan import Bucket, bucket_views
from weightsync.transport.base import Ticket

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


def open_source(info: InitInfo):
    """A ``weightsync.transport.base.Receiver`` for the transport named in ``info``."""
    if info.transport == "broadcast":
        from weightsync.transport.broadcast import BroadcastReceiver, init_weight_group

        group = init_weight_group(
            info.master_address,
            info.master_port,
            info.world_size,
            info.rank,
            info.group_name,
            backend="gloo",
            timeout_s=info.timeout_s,
        )
        return BroadcastReceiver(group, timeout_s=info.timeout_s)
    return ShmRingReader(info.slot_names, info.slot_bytes)


class ShmRingReader:
    """Slots of a persistent ring in /dev/shm, mapped once; the trainer fills a slot, then
    names it in the bucket's update; the HTTP answer tells it the slot is free again."""

    def __init__(self, slot_names: list[str], slot_bytes: int) -> None:
        self.slots = [
            torch.from_file(str(_shm_path(n)), shared=True, size=slot_bytes, dtype=torch.uint8)
            for n in slot_names
        ]

    def recv(self, bucket: Bucket, ticket: Ticket) -> dict[torch.dtype, torch.Tensor]:
        if not 0 <= ticket.slot < len(self.slots):
            raise ValueError(
                f"bucket {bucket.index}: slot {ticket.slot} not in the ring of {len(self.slots)}"
            )
        return bucket_views(bucket, self.slots[ticket.slot])

    def release(self, ticket: Ticket) -> None:
        """The HTTP answer is the release; nothing to do here."""

    def close(self) -> None:
        self.slots = []


def _shm_path(name: str) -> Path:
    path = Path(name)
    return path if path.is_absolute() and path.exists() else Path("/dev/shm") / name.lstrip("/")


def unalias_pending(model: torch.nn.Module, buffers: list[torch.Tensor]) -> None:
    """Copy tensors that vLLM's layerwise reload still holds for incomplete layers (a layer
    whose tensors straddle two buckets) out of our reused buffers."""
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
