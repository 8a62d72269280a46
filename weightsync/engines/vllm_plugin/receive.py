"""Receiver-side pieces of the weightsync backend, inside vLLM: the transport receivers
(``weightsync.transport``), made from the init info, and what vLLM needs around them.

Both receivers hand out views into buffers they reuse for later buckets (fresh memory per
bucket costs page faults that dominate the transfer), so whatever vLLM keeps past ``release``
must be copied: see ``unalias_pending``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from weightsync.engines.vllm_plugin.wire import InitInfo
from weightsync.tensors import ST_DTYPES, dtype_name, safetensors_header


def open_source(info: InitInfo, worker: int):
    """A ``weightsync.transport.base.Receiver`` for the transport named in ``info``, for the
    engine's ``worker``-th worker process (TP x PP x DP, like vLLM's NCCL backend counts)."""
    if info.transport in ("broadcast", "sharded"):
        rank = info.rank_offset + worker
        if rank >= info.world_size:
            raise ValueError(f"worker {worker} would be rank {rank} of {info.world_size}")
        from weightsync.engines.vllm_plugin.shards import ShardSource
        from weightsync.transport.broadcast import BroadcastReceiver, init_weight_group

        group = init_weight_group(
            info.master_address,
            info.master_port,
            info.world_size,
            rank,
            info.group_name,
            backend="gloo",
            timeout_s=info.timeout_s,
        )
        if info.transport == "sharded":
            return ShardSource(group, rank, worker, info.senders)
        return BroadcastReceiver(group, timeout_s=info.timeout_s)
    from weightsync.transport.shm import RingSpec, ShmReceiver, ShmRing

    spec = RingSpec(tuple(info.slot_names), info.slot_bytes, info.num_consumers)
    return ShmReceiver(ShmRing.attach(spec, unlink=info.unlink), info.consumer_index + worker)


def close_source(source) -> None:
    group = getattr(source, "group", None)
    source.close()
    if group is not None:
        # Frees the group name, so the trainer can connect again under the same one.
        from weightsync.transport.broadcast import destroy_weight_group

        destroy_weight_group(group)


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


def discard_partial_layers(model: torch.nn.Module) -> None:
    """Forget what layerwise reload buffered for layers that did not get all of their
    tensors, so finalizing puts their previous weights back instead of processing a layer
    whose other half was never written."""
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

    for layer in model.modules():
        info = LAYERWISE_INFO.get(layer)
        if info is not None and info.can_load() and info.load_numel > 0:
            info.loaded_weights.clear()
            info.load_numel = 0


def checkpoint_params(model_dir: str) -> dict[str, list]:
    """``{name: [dtype, shape]}`` from the safetensors headers the engine was started from:
    the checkpoint-format names and layouts ``load_weights`` accepts."""
    out: dict[str, list] = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        for name, meta in safetensors_header(path).items():
            code = meta["dtype"]
            out[name] = [dtype_name(ST_DTYPES[code]) if code in ST_DTYPES else code, meta["shape"]]
    if not out:
        raise ValueError(f"no safetensors weights found in {model_dir!r}")
    return out
