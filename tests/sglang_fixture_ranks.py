"""TEST FIXTURE, NOT A PRODUCT: the TP ranks behind the SGLang protocol server, a process each.

SGLang runs one scheduler process per TP rank. Each joins the update group at
``rank_offset + tp_rank`` (``WeightUpdater.init_weights_update_group``), receives every
broadcast bucket of full HF tensors, and its model's ``load_weights`` keeps only its own shard;
on the tensor path each rank opens only its own payload. These processes do the same and keep
a shard store keyed by HF name. The server reassembles the full state from the stores, so a
wrong shard, or a rank that missed an update, shows up as a mismatch in the tests.
"""

from __future__ import annotations

import multiprocessing.connection
from datetime import timedelta

import torch

_GROUP_TIMEOUT = timedelta(seconds=60)
_REPLY_TIMEOUT_S = 120.0  # longer than a group init may wait for the trainer

# How SGLang's TP layers split an HF tensor (Qwen2's modules): the fused QKV and gate_up are
# column-parallel (output rows split, biases too); o_proj and down_proj row-parallel (input
# columns split; a bias would be replicated); embedding and lm_head vocab-parallel (rows).
_ROWS_SPLIT = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "embed_tokens", "lm_head"}
_COLUMNS_SPLIT = {"o_proj", "down_proj"}


def split_dim(name: str, ndim: int) -> int | None:
    """The dim SGLang's TP loader splits HF tensor ``name`` along; None: every rank has all."""
    module = name.rsplit(".", 2)[-2]
    if module in _ROWS_SPLIT:
        return 0
    if module in _COLUMNS_SPLIT and ndim == 2:
        return 1
    return None


def shard(name: str, tensor: torch.Tensor, rank: int, tp_size: int) -> torch.Tensor:
    """TP rank ``rank``'s piece of the full tensor, as its ``load_weights`` would keep it."""
    dim = split_dim(name, tensor.dim())
    if dim is None:
        return tensor.clone()
    assert tensor.shape[dim] % tp_size == 0, f"{name}: {tuple(tensor.shape)} over {tp_size} ranks"
    return tensor.chunk(tp_size, dim)[rank].clone()


def unshard(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """The full tensor from every rank's piece; ValueError where replicas disagree."""
    dim = split_dim(name, shards[0].dim())
    if dim is not None:
        return torch.cat(shards, dim)
    for rank, piece in enumerate(shards[1:], start=1):
        if not torch.equal(piece.view(torch.uint8), shards[0].view(torch.uint8)):
            raise ValueError(f"{name}: replicated, but TP rank {rank} differs from rank 0")
    return shards[0]


class _Rank:
    """One TP rank's state; its methods are the operations the server asks of it."""

    def __init__(self, rank: int, tp_size: int, model_dir: str) -> None:
        self.rank, self.tp_size, self.model_dir = rank, tp_size, model_dir
        self.groups: dict[str, object] = {}
        self.shards: dict[str, torch.Tensor] = {}
        self.refuse = False

    def reset(self) -> None:
        # Loaded from the checkpoint the server was launched from, as SGLang's loader does.
        from safetensors.torch import load_file

        full = load_file(f"{self.model_dir}/model.safetensors")
        self.shards = {n: shard(n, t, self.rank, self.tp_size) for n, t in full.items()}
        self.refuse = False

    def set_refuse(self, refuse: bool) -> None:
        self.refuse = refuse

    def state(self) -> bytes:
        from safetensors.torch import save

        return save(self.shards)

    def load(self, named: list[tuple[str, torch.Tensor]]) -> None:
        if self.refuse:
            raise RuntimeError("refused to load the update (test fault)")
        for name, tensor in named:
            held = self.shards[name]  # KeyError for an unknown name, as SGLang's params_dict
            piece = shard(name, tensor, self.rank, self.tp_size)
            assert held.shape == piece.shape, f"{name}: {tuple(piece.shape)} != {held.shape}"
            held.copy_(piece)

    def init_group(self, master_address, master_port, world_size, rank_offset, group_name, backend):
        from sglang.srt.utils import init_custom_process_group

        host = f"[{master_address}]" if ":" in master_address else master_address
        self.groups[group_name] = init_custom_process_group(
            backend=backend,
            init_method=f"tcp://{host}:{master_port}",
            world_size=world_size,
            rank=rank_offset + self.rank,  # SGLang's formula: TP rank within the engine's span
            group_name=group_name,
            timeout=_GROUP_TIMEOUT,
        )

    def destroy_group(self, group_name: str) -> None:
        torch.distributed.destroy_process_group(self.groups.pop(group_name))

    def receive(self, names, dtypes, shapes, group_name, load_format) -> None:
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

        group = self.groups[group_name]
        if load_format == "flattened_bucket":
            bucket = FlattenedTensorBucket.empty(names, dtypes, shapes, "cpu")
            torch.distributed.broadcast(bucket.get_flattened_tensor(), src=0, group=group)
            named = bucket.reconstruct_tensors()
        else:
            named = [
                (n, torch.empty(s, dtype=getattr(torch, d)))
                for n, d, s in zip(names, dtypes, shapes, strict=True)
            ]
            for _, t in named:
                torch.distributed.broadcast(t, src=0, group=group)
        self.load(named)  # after the receive, so a refusing rank never stalls the broadcast

    def load_payload(self, payload: str, load_format: str | None) -> None:
        self.load(open_payload(payload, load_format))


def open_payload(payload, load_format: str | None) -> list[tuple[str, torch.Tensor]]:
    """One TP rank's serialized tensors, opened with SGLang's own deserializer and bucket."""
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.weight_sync.tensor_bucket import (
        FlattenedTensorBucket,
        FlattenedTensorMetadata,
    )

    obj = MultiprocessingSerializer.deserialize(payload)
    if load_format != "flattened_bucket":
        return list(obj.items()) if isinstance(obj, dict) else list(obj)
    meta = [
        FlattenedTensorMetadata(m.name, m.shape, m.dtype, m.start_idx, m.end_idx, m.numel)
        for m in obj["metadata"]
    ]
    flat = obj["flattened_tensor"]
    return list(FlattenedTensorBucket(flattened_tensor=flat, metadata=meta).reconstruct_tensors())


def rank_main(conn: multiprocessing.connection.Connection, rank: int, tp_size: int) -> None:
    """Process entry point: answer (ok, result or error text) to each (op, kwargs) until the
    server's end of the pipe closes. The first message names the checkpoint directory."""
    state = _Rank(rank, tp_size, conn.recv())
    while True:
        try:
            op, kwargs = conn.recv()
        except EOFError:
            return
        try:
            conn.send((True, getattr(state, op)(**kwargs)))
        except Exception as e:  # noqa: BLE001 - carried back to the server's reply
            conn.send((False, f"TP rank {rank}: {type(e).__name__}: {e}"))


class RankError(RuntimeError):
    """One or more TP ranks failed an operation; the message names each."""


class Ranks:
    """The server's handle on its TP rank processes: every operation runs on all of them at
    once (a group init completes only when every rank joined)."""

    def __init__(self, conns: list[multiprocessing.connection.Connection], model_dir: str):
        self.conns = conns
        self.lost: str | None = None  # a rank that never answered: later replies would misalign
        for conn in conns:
            conn.send(model_dir)

    def run(self, op: str, per_rank: list[dict]) -> list:
        if self.lost:
            raise RankError(self.lost)
        try:
            for conn, kwargs in zip(self.conns, per_rank, strict=True):
                conn.send((op, kwargs))
        except OSError:
            self.lost = "a TP rank's process is gone"
            raise RankError(self.lost) from None
        replies = [self._reply(rank, conn) for rank, conn in enumerate(self.conns)]
        errors = [result for ok, result in replies if not ok]
        if errors:
            raise RankError("; ".join(errors))
        return [result for _, result in replies]

    def run_all(self, op: str, **kwargs) -> list:
        return self.run(op, [kwargs] * len(self.conns))

    def _reply(self, rank: int, conn: multiprocessing.connection.Connection) -> tuple[bool, object]:
        try:
            if conn.poll(_REPLY_TIMEOUT_S):
                return conn.recv()
            self.lost = f"TP rank {rank}: no answer in {_REPLY_TIMEOUT_S:.0f} s"
        except (EOFError, OSError):
            self.lost = f"TP rank {rank}: its process is gone"
        return False, self.lost

    def state(self) -> dict[str, torch.Tensor]:
        """The full HF-named state, reassembled from every rank's shards."""
        from safetensors.torch import load

        stores = [load(raw) for raw in self.run_all("state")]
        return {name: unshard(name, [s[name] for s in stores]) for name in stores[0]}
