"""Same-host transport for SGLang: tensor payloads (CUDA IPC; CPU tensors by file descriptor,
or inline for small sets).

The CPU shared-memory ring is ``weightsync.transport.shm``.

SGLang's ``/update_weights_from_tensor`` with ``load_format="flattened_bucket"`` takes one
serialized payload per engine TP rank: ``{"flattened_tensor": uint8 tensor, "metadata":
[FlattenedTensorMetadata, ...]}`` pickled by its ``MultiprocessingSerializer`` (torch's
multiprocessing reductions: a CUDA tensor travels as an IPC handle, a CPU tensor as a file
descriptor), and rank r opens only payload r. A bucket's byte layout (``weightsync.plan``) is
exactly that flattened tensor, so the payload is the staging buffer itself, no extra copy.

Producer rules this module keeps:
- a fresh buffer per bucket, kept alive until the engine acknowledged the bucket (its HTTP
  reply), then ``torch.cuda.ipc_collect()`` so torch's IPC cache lets the memory go;
- each TP rank gets its own serialization (opening one export twice leaks on the engine);
- SGLang's ``monkey_patch_torch_reductions()`` (GPU-UUID device mapping) only for CUDA: after
  it, pickling any CPU tensor fails in that process.
sglang is imported only to open payloads and, for CUDA, to patch the reductions.
"""

from __future__ import annotations

import base64
import io
import pickle
from multiprocessing.reduction import ForkingPickler
from types import SimpleNamespace

import torch
import torch.multiprocessing  # registers torch's tensor reductions with ForkingPickler

from weightsync.plan import Bucket, bucket_views
from weightsync.transport.base import Ticket

__all__ = [
    "IpcPayloadReceiver",
    "IpcPayloadSender",
    "decode_payload",
    "encode_payload",
]


def _patch_reductions_for_cuda(device: torch.device) -> None:
    if device.type == "cuda":
        from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions

        monkey_patch_torch_reductions()


def encode_payload(
    bucket: Bucket, flat: torch.Tensor, uuid_devices: bool = True, inline: bool = False
) -> str:
    """One TP rank's base64 payload of ``bucket`` held in ``flat`` (its byte layout).

    Built without importing sglang (whose package import patches transformers in this
    process): the metadata are ``SimpleNamespace``s, which SGLang's SafeUnpickler allows and
    its loader reads by attribute, and the pickler is torch's ForkingPickler, as in SGLang's
    ``MultiprocessingSerializer``. ``uuid_devices`` (CUDA only) applies SGLang's reductions
    patch so the engine maps the GPU by UUID; it may be off only when both processes number
    the GPUs alike (same ``CUDA_VISIBLE_DEVICES``). ``inline`` (CPU only) puts the bytes
    themselves in the payload (plain pickle: SGLang rebuilds the storage with a weights-only
    ``torch.load``): for small sets, e.g. a LoRA adapter, to a process that does not share
    this one's multiprocessing authkey, which a file descriptor needs.
    """
    if inline and flat.device.type != "cpu":
        raise ValueError("encode_payload: inline payloads carry CPU bytes")
    if uuid_devices:
        _patch_reductions_for_cuda(flat.device)
    metadata, start = [], 0
    for name, dtype, shape in bucket.metas():
        size = int(torch.Size(shape).numel()) * dtype.itemsize
        metadata.append(
            SimpleNamespace(
                name=name,
                shape=torch.Size(shape),
                dtype=dtype,
                start_idx=start,
                end_idx=start + size,
                numel=size,
            )
        )
        start += size
    assert start == bucket.nbytes, "plan byte layout is unpadded"
    buf = io.BytesIO()
    pickler = pickle.Pickler if inline else ForkingPickler
    pickler(buf).dump({"flattened_tensor": flat[: bucket.nbytes], "metadata": metadata})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _open(payload: str, device: str, safe: bool) -> object:
    if not safe:  # trusted local channel only: plain pickle runs whatever the payload names
        return pickle.loads(base64.b64decode(payload, validate=True))
    from sglang.srt.utils import MultiprocessingSerializer

    _patch_reductions_for_cuda(torch.device(device))
    return MultiprocessingSerializer.deserialize(payload)


def decode_payload(
    bucket: Bucket, payload: str, device: str = "cpu", safe: bool = True
) -> torch.Tensor:
    """Open one payload; return its flat bytes after checking them against ``bucket``.

    ``safe`` opens it as SGLang does (its SafeUnpickler allowlist, reductions patched for CUDA);
    ``safe=False`` uses plain pickle without sglang, for payloads from a trusted local process.
    The metadata must describe exactly ``bucket``'s layout: a payload that does not would make
    the engine load wrong tensors or crash, so it is refused here with a ValueError.
    """
    obj = _open(payload, device, safe)
    if not isinstance(obj, dict) or set(obj) != {"flattened_tensor", "metadata"}:
        raise ValueError(f"bucket {bucket.index}: payload is not a flattened_bucket dict")
    flat, metadata = obj["flattened_tensor"], obj["metadata"]
    got = [(m.name, m.dtype, tuple(m.shape), m.start_idx, m.end_idx) for m in metadata]
    want, start = [], 0
    for name, dtype, shape in bucket.metas():
        end = start + int(torch.Size(shape).numel()) * dtype.itemsize
        want.append((name, dtype, shape, start, end))
        start = end
    if got != want:
        bad = next((g, w) for g, w in zip([*got, None], [*want, None], strict=False) if g != w)
        raise ValueError(f"bucket {bucket.index}: payload metadata {bad[0]} != plan {bad[1]}")
    if flat.dtype != torch.uint8 or flat.numel() != bucket.nbytes:
        raise ValueError(
            f"bucket {bucket.index}: flattened tensor {flat.dtype} "
            f"{tuple(flat.shape)} != uint8 ({bucket.nbytes},)"
        )
    return flat


class IpcPayloadSender:
    """Sender protocol for ``update_weights_from_tensor``: the ticket carries the payloads."""

    def __init__(
        self, device: torch.device | str, tp_size: int = 1, uuid_devices: bool = True
    ) -> None:
        if tp_size < 1:
            raise ValueError(f"tp_size={tp_size} must be >= 1")
        self.device = torch.device(device)
        self.tp_size = tp_size
        self.uuid_devices = uuid_devices
        self._pending: dict[int, torch.Tensor] = {}  # filled, not yet sent
        self._alive: dict[int, torch.Tensor] = {}  # sent, not yet acknowledged

    def buffers(self, bucket: Bucket) -> dict[torch.dtype, torch.Tensor]:
        # Fresh per bucket: the engine may hold an IPC mapping of it until it acknowledges.
        flat = torch.empty(bucket.nbytes, dtype=torch.uint8, device=self.device)
        self._pending[bucket.index] = flat
        return bucket_views(bucket, flat)

    def send(self, bucket: Bucket, buffers: dict[torch.dtype, torch.Tensor]) -> Ticket:
        flat = self._pending.pop(bucket.index, None)
        if flat is None:
            raise ValueError(f"bucket {bucket.index}: call buffers(bucket) before send")
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # bytes land before handles go
        payloads = tuple(
            encode_payload(bucket, flat, self.uuid_devices) for _ in range(self.tp_size)
        )
        self._alive[bucket.index] = flat
        return Ticket(bucket.index, payloads=payloads)

    def acknowledge(self, ticket: Ticket) -> None:
        self._alive.pop(ticket.bucket_index, None)
        if self.device.type == "cuda":
            torch.cuda.ipc_collect()

    @property
    def unacknowledged(self) -> list[int]:
        return sorted(self._alive)

    def flush(self) -> None:
        """Bytes are in place when ``send`` returns; buffers stay until acknowledged."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        self._pending.clear()
        self._alive.clear()
        if self.device.type == "cuda":
            torch.cuda.ipc_collect()


class IpcPayloadReceiver:
    """Receiver protocol over payloads (our test engines; SGLang does this itself)."""

    def __init__(self, tp_rank: int = 0, device: str = "cpu", safe: bool = True) -> None:
        self.tp_rank = tp_rank
        self.device = device
        self.safe = safe
        self._held: dict[int, torch.Tensor] = {}

    def recv(self, bucket: Bucket, ticket: Ticket) -> dict[torch.dtype, torch.Tensor]:
        if not 0 <= self.tp_rank < len(ticket.payloads):
            raise ValueError(
                f"bucket {bucket.index}: no payload for TP rank {self.tp_rank} "
                f"({len(ticket.payloads)} payloads)"
            )
        flat = decode_payload(bucket, ticket.payloads[self.tp_rank], self.device, self.safe)
        self._held[bucket.index] = flat
        return bucket_views(bucket, flat)

    def release(self, ticket: Ticket) -> None:
        self._held.pop(ticket.bucket_index, None)

    def close(self) -> None:
        self._held.clear()
