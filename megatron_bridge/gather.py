"""Collectives that un-shard one parameter and move it towards the export source rank.

Sharding of a megatron parameter is described by the attributes megatron sets on it:
``tensor_model_parallel`` (sharded at all), ``partition_dim`` and ``partition_stride``. With
stride s, the master weight is cut into ``world * s`` equal blocks along ``partition_dim`` and
rank r holds blocks r, r + world, ... (this is how the GLU fc1 keeps [gate_r | up_r] per rank).

All tensors sent point-to-point are made contiguous first (gloo mis-sends strided views).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_sharded(param: torch.Tensor) -> bool:
    # megatron marks TP-sharded parameters with this attribute; replicated ones lack it.
    return bool(getattr(param, "tensor_model_parallel", False))


def shard_of(full: torch.Tensor, dim: int, stride: int, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s shard of ``full``: blocks rank, rank + world, ... of ``world * stride``."""
    blocks = full.chunk(world * stride, dim)
    return torch.cat([blocks[rank + j * world] for j in range(stride)], dim=dim)


def gather_to_first(param: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor | None:
    """The full tensor on rank 0 of ``group`` (the parameter itself if not sharded); None elsewhere.

    Collective over ``group`` for sharded parameters; no communication otherwise. Shards arrive
    by point-to-point receives written into the full tensor, because gloo's ``gather`` stages
    everything in an internal buffer of the full size (two copies of the tensor at once).
    """
    world = dist.get_world_size(group)
    first = dist.get_rank(group) == 0
    local = param.detach()
    if world == 1 or not is_sharded(param):
        return local if first else None
    shard = local.contiguous()
    if not first:
        dist.send(shard, group=group, group_dst=0)
        return None
    dim, stride = param.partition_dim, param.partition_stride
    block = shard.shape[dim] // stride
    full = _full_like(shard, dim, world)
    for rank in range(world):
        if rank > 0 and dim == 0 and stride == 1:
            dist.recv(full.narrow(0, rank * block, block), group=group, group_src=rank)
            continue
        if rank > 0:
            shard = torch.empty_like(shard)
            dist.recv(shard, group=group, group_src=rank)
        _place(full, shard, param, rank, world)
    return full


def gather_many_to_first(
    params: list[torch.Tensor], group: dist.ProcessGroup
) -> list[torch.Tensor] | None:
    """``gather_to_first`` of every parameter at once: one message per rank and dtype instead
    of one per parameter, for many small ones (a LoRA adapter). The whole set is held on rank
    0 at the end; None elsewhere."""
    world = dist.get_world_size(group)
    first = dist.get_rank(group) == 0
    locals_ = [p.detach() for p in params]
    if world == 1:
        return locals_ if first else None
    sharded = [i for i, p in enumerate(params) if is_sharded(p)]
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i in sharded:
        by_dtype.setdefault(locals_[i].dtype, []).append(i)
    if not first:
        for idx in by_dtype.values():
            flat = torch.cat([locals_[i].reshape(-1) for i in idx])
            dist.send(flat, group=group, group_dst=0)
        return None
    out = list(locals_)
    for i in sharded:
        out[i] = _full_like(locals_[i], params[i].partition_dim, world)
        _place(out[i], locals_[i], params[i], 0, world)
    for idx in by_dtype.values():
        # Every rank holds shards of the same shapes (megatron shards evenly).
        sizes = [locals_[i].numel() for i in idx]
        for rank in range(1, world):
            flat = locals_[idx[0]].new_empty(sum(sizes))
            dist.recv(flat, group=group, group_src=rank)
            for i, piece in zip(idx, flat.split(sizes), strict=True):
                _place(out[i], piece.view(locals_[i].shape), params[i], rank, world)
    return out


def _full_like(shard: torch.Tensor, dim: int, world: int) -> torch.Tensor:
    shape = list(shard.shape)
    shape[dim] *= world
    return shard.new_empty(shape)


def _place(full: torch.Tensor, shard: torch.Tensor, param, rank: int, world: int) -> None:
    """Write rank ``rank``'s ``shard`` of ``param`` into ``full`` (see the module doc)."""
    dim, stride = param.partition_dim, param.partition_stride
    block = shard.shape[dim] // stride
    for j, part in enumerate(shard.chunk(stride, dim)):
        full.narrow(dim, (j * world + rank) * block, block).copy_(part)


def hop(
    tensors: list[torch.Tensor] | None,
    src: int,
    group: dist.ProcessGroup,
    like: list[tuple[tuple[int, ...], torch.dtype]],
    device: torch.device,
) -> list[torch.Tensor] | None:
    """Move ``tensors`` from group rank ``src`` to group rank 0 of ``group``.

    Only the two endpoints may call this. ``like`` gives (shape, dtype) of each tensor so the
    receiver can allocate without a metadata round trip.
    """
    me = dist.get_rank(group)
    if src == 0:
        return tensors
    if me == src:
        assert tensors is not None
        for t in tensors:
            dist.send(t.contiguous(), group=group, group_dst=0)
        return None
    assert me == 0, "hop() called on a rank that is neither source nor destination"
    out = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in like]
    for t in out:
        dist.recv(t, group=group, group_src=src)
    return out
