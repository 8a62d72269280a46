"""The sharded transport's receiving end in one vLLM worker (``weightsync.shard_transfer``).

Every trainer rank sends this worker the slices it serves, point to point; one
``/update_weights`` call per round says which pieces arrive from whom and which tensors are
then complete. A complete tensor is handed to vLLM's own loaders at its whole shape, the
slices this worker serves written in and the rest zero: the loaders cut out exactly this
worker's part (so the layout ``weightsync.engine_shards`` planned is checked by what the
engine then computes), and every quantized or fused layout is processed as after a full load.
The zero remainder is never read; it costs one whole tensor of memory while it loads.

Everything here comes from the network: each piece is checked against the checkpoint's own
names, shapes and dtypes, and its box against the shape, before any receive is posted.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist

from weightsync.tensors import dtype_from_name


class ShardSource:
    def __init__(self, group: dist.ProcessGroup, rank: int, worker: int) -> None:
        self.group, self.rank, self.worker = group, rank, worker
        self._open: dict[str, torch.Tensor] = {}
        self.last_wire_bytes = 0
        """Bytes the last round brought this worker (its own slices only)."""

    def receive(self, info, expected: Mapping[str, list]) -> list[tuple[str, torch.Tensor]]:
        """This worker's pieces of one round; the tensors it completed, ready to load."""
        posts = []
        for src, worker, name, box, shape, dtype in info.pieces:  # all checked, then posted
            if worker != self.worker:
                continue
            if not (isinstance(src, int) and 0 <= src < dist.get_world_size(self.group)):
                raise ValueError(f"{name}: sender rank {src!r} is not in the group")
            view = _view(self._whole(name, shape, dtype, expected), box, name)
            posts.append((src, view, view if view.is_contiguous() else torch.empty_like(view)))
        work = [dist.irecv(buf, group=self.group, group_src=src) for src, _, buf in posts]
        self.last_wire_bytes = sum(buf.numel() * buf.element_size() for _, _, buf in posts)
        for w in work:
            w.wait()
        for _, view, buf in posts:
            if buf is not view:
                view.copy_(buf)
        ready = [(n, self._open.pop(n)) for w, n in info.ready if w == self.worker]
        for w, name, value in info.constants:
            if w == self.worker:
                ready.append((name, self._constant(name, value, expected)))
        return ready

    def pending(self) -> list[str]:
        """Tensors with pieces received but not yet loaded (an update cut short)."""
        return sorted(self._open)

    def close(self) -> None:
        self._open.clear()

    def _whole(self, name: str, shape: list, dtype: str, expected: Mapping) -> torch.Tensor:
        if name not in self._open:
            want = expected.get(name)
            if want is None or list(want[1]) != list(shape) or want[0] != dtype:
                raise ValueError(f"{name}: {dtype} {shape} does not match the checkpoint's {want}")
            self._open[name] = torch.zeros(shape, dtype=dtype_from_name(dtype))
        return self._open[name]

    @staticmethod
    def _constant(name: str, value: list, expected: Mapping) -> torch.Tensor:
        want = expected.get(name)
        if want is None or not name.endswith(".weight_shape") or len(value) != want[1][0]:
            raise ValueError(f"{name}: {value!r} is not a weight shape of this checkpoint")
        return torch.tensor([int(v) for v in value], dtype=dtype_from_name(want[0]))


def _view(whole: torch.Tensor, box: list, name: str) -> torch.Tensor:
    if len(box) != whole.dim():
        raise ValueError(f"{name}: box {box!r} has not {whole.dim()} dims")
    for dim, (lo, hi) in enumerate(box):
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo < hi <= whole.shape[dim]):
            raise ValueError(f"{name}: box {box!r} is outside {list(whole.shape)}")
        whole = whole.narrow(dim, lo, hi - lo)
    return whole
