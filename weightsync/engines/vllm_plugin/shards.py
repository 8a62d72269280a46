"""The sharded transport's receiving end in one vLLM worker (``weightsync.shard_transfer``).

Every trainer rank sends this worker the slices it serves, point to point; one
``/update_weights`` call per round says which pieces arrive from whom, and which tensors are
then complete with how many of their elements this worker was to receive. A complete tensor
is handed to vLLM's own loaders at its whole shape, the slices this worker serves written in
and the rest zero: the loaders cut out this worker's part, and every quantized or fused layout
is processed as after a full load. The zero remainder costs one whole tensor of memory while
it loads; a plan that cut the engine's layout wrong would load it (verify, on by default,
reads the weights back through the kernels and fails that update).

Everything here comes from the network. Every entry of a round (pieces, ready tensors,
constants) is checked against the checkpoint's own names, shapes and dtypes, the senders
against the trainer's ranks and the element counts against the tensors' sizes, before
anything is allocated or any receive is posted; a tensor is loaded only when exactly the
announced number of its elements arrived.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.distributed as dist

from weightsync.tensors import dtype_from_name


class ShardSource:
    def __init__(self, group: dist.ProcessGroup, rank: int, worker: int, senders: int) -> None:
        self.group, self.rank, self.worker, self.senders = group, rank, worker, senders
        self._open: dict[str, torch.Tensor] = {}
        self._count: dict[str, int] = {}
        self.last_wire_bytes = 0
        """Bytes the last round brought this worker (its own slices only)."""

    def receive(self, info, expected: Mapping[str, list]) -> list[tuple[str, torch.Tensor]]:
        """This worker's pieces of one round; the tensors it completed, ready to load."""
        pieces, ready, constants = self._checked(info, expected)
        posts = []
        for src, name, box, shape, dtype in pieces:
            if name not in self._open:
                self._open[name] = torch.zeros(shape, dtype=dtype)
            view = _view(self._open[name], box)
            posts.append((src, view, view if view.is_contiguous() else torch.empty_like(view)))
            self._count[name] = self._count.get(name, 0) + view.numel()
        work = [dist.irecv(buf, group=self.group, group_src=src) for src, _, buf in posts]
        self.last_wire_bytes = sum(buf.numel() * buf.element_size() for _, _, buf in posts)
        for w in work:
            w.wait()
        for _, view, buf in posts:
            if buf is not view:
                view.copy_(buf)
        out = []
        for name, numel, shape, dtype in ready:
            if numel == 0 and name not in self._open:  # serves none of it: zeros to load
                self._open[name] = torch.zeros(shape, dtype=dtype)
            if self._count.pop(name, 0) != numel or name not in self._open:
                raise ValueError(f"{name}: not all of its {numel} announced elements arrived")
            out.append((name, self._open.pop(name)))
        return out + constants

    def close(self) -> None:
        """Drop what an update cut short: its pieces never load into another one."""
        self._open.clear()
        self._count.clear()

    def _checked(self, info, expected: Mapping[str, list]) -> tuple[list, list, list]:
        pieces, arriving = [], dict(self._count)
        for src, worker, name, box, shape, dtype in info.pieces:
            if worker != self.worker:
                continue
            if not (isinstance(src, int) and 0 <= src < self.senders):
                raise ValueError(
                    f"{name}: sender {src!r} is not one of the {self.senders} trainer ranks"
                )
            torch_dtype, shape = _known(name, shape, dtype, expected)
            box = _box(name, box, shape)
            arriving[name] = arriving.get(name, 0) + math.prod(hi - lo for lo, hi in box)
            if arriving[name] > math.prod(shape):  # a piece twice, or overlapping ones
                raise ValueError(f"{name}: more elements announced than it has")
            pieces.append((src, name, box, shape, torch_dtype))
        ready = []
        for worker, name, numel, shape, dtype in info.ready:
            if worker == self.worker:
                torch_dtype, shape = _known(name, shape, dtype, expected)
                if not (isinstance(numel, int) and 0 <= numel <= math.prod(shape)):
                    raise ValueError(f"{name}: {numel!r} elements announced of {list(shape)}")
                ready.append((name, numel, shape, torch_dtype))
        constants = [
            (name, _weight_shape(name, value, expected))
            for worker, name, value in info.constants
            if worker == self.worker
        ]
        return pieces, ready, constants


def _known(name: str, shape: list, dtype: str, expected: Mapping) -> tuple[torch.dtype, tuple]:
    want = expected.get(name)
    torch_dtype = dtype_from_name(dtype) if isinstance(dtype, str) else None
    if want is None or torch_dtype is None or want[0] != dtype or list(want[1]) != list(shape):
        raise ValueError(f"{name!r}: {dtype} {shape} does not match the checkpoint's {want}")
    return torch_dtype, tuple(int(n) for n in shape)


def _box(name: str, box: list, shape: tuple) -> tuple[tuple[int, int], ...]:
    ok = isinstance(box, list) and len(box) == len(shape)
    ok = ok and all(
        isinstance(b, list) and len(b) == 2 and all(isinstance(x, int) for x in b) for b in box
    )
    if not ok or not all(0 <= lo < hi <= n for (lo, hi), n in zip(box, shape, strict=True)):
        raise ValueError(f"{name}: box {box!r} is not inside {list(shape)}")
    return tuple((lo, hi) for lo, hi in box)


def _weight_shape(name: str, value: list, expected: Mapping) -> torch.Tensor:
    """An int4 weight's ``weight_shape``: exactly the shape its packed codes imply."""
    base = name.removesuffix(".weight_shape")
    want, packed = expected.get(name), expected.get(f"{base}.weight_packed")
    implied = None if packed is None else [packed[1][0], packed[1][1] * 8]
    if want is None or not name.endswith(".weight_shape") or value != implied:
        raise ValueError(f"{name}: {value!r} is not the shape its packed weight implies")
    return torch.tensor(value, dtype=dtype_from_name(want[0]))


def _view(whole: torch.Tensor, box: tuple[tuple[int, int], ...]) -> torch.Tensor:
    for dim, (lo, hi) in enumerate(box):
        whole = whole.narrow(dim, lo, hi - lo)
    return whole
