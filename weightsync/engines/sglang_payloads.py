"""SGLang request bodies and payload checks, done before anything reaches (or pauses) a server.

Bodies are built from SGLang's own ``io_struct`` request structs and validated the way its
FastAPI server validates them (pydantic over the struct, from the JSON we are about to send).
When ``io_struct`` cannot be imported (it drags in torchvision through a multimodal config)
the body is sent as built, after our own checks.

Tensor-path payloads are checked by a *dry* unpickle: SGLang's ``SafeUnpickler`` allowlist
decides which globals may appear, and torch's tensor/storage rebuild functions are swapped for
recorders, so no CUDA IPC handle is opened and no shared-memory fd is consumed. A payload the
real scheduler would choke on (blocked global, wrong layout, a tensor that does not match the
bucket) raises ``ValueError`` here instead of killing the server.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import pybase64
import torch

from weightsync.plan import Bucket
from weightsync.tensors import (
    ST_DTYPES,
    all_finite,
    dtype_from_name,
    dtype_name,
    safetensors_header,
)

log = logging.getLogger(__name__)

_CHOICES = {"mode": ("abort", "retract", "in_place"), "selector": ("target", "draft", "all")}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """What the engine's checkpoint says one HF-named tensor looks like."""

    dtype: torch.dtype
    shape: tuple[int, ...]


def manifest_from_checkpoint(model_dir: str | Path) -> dict[str, TensorSpec]:
    """Names, dtypes and shapes of every tensor in a directory of ``*.safetensors`` files.

    Reads only the JSON headers, so it costs milliseconds even for a large checkpoint.
    """
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"model_dir={str(model_dir)!r} holds no *.safetensors files")
    manifest: dict[str, TensorSpec] = {}
    for path in files:
        for name, entry in safetensors_header(path).items():
            dtype = ST_DTYPES.get(entry["dtype"])
            if dtype is None:
                raise ValueError(f"{path.name}: tensor {name!r} has dtype {entry['dtype']}")
            manifest[name] = TensorSpec(dtype, tuple(entry["shape"]))
    return manifest


@functools.cache
def io_structs():
    """SGLang's ``io_struct`` module, or None where it does not import (logged once)."""
    try:
        from sglang.srt.managers import io_struct
    except Exception as e:  # noqa: BLE001 - any import failure means "build bodies ourselves"
        log.warning(
            "sglang io_struct not importable (%s); request bodies are not validated "
            "against SGLang's structs",
            e,
        )
        return None
    return io_struct


def request_body(struct_name: str, **fields) -> dict:
    """The JSON body for one SGLang request, validated against ``io_struct.<struct_name>``.

    Raises ValueError naming the struct and the offending field.
    """
    body = {k: v for k, v in fields.items() if v is not None}
    for field, allowed in _CHOICES.items():  # also checked where io_struct is unavailable
        if field in body and body[field] not in allowed:
            raise ValueError(
                f"{struct_name}: invalid field(s): {field}: {body[field]!r} is not one of {allowed}"
            )
    module = io_structs()
    if module is None:
        return body
    import pydantic

    try:
        pydantic.TypeAdapter(getattr(module, struct_name)).validate_json(json.dumps(body))
    except pydantic.ValidationError as e:
        bad = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<body>'}: {err['msg']}"
            for err in e.errors()
        )
        raise ValueError(f"{struct_name}: invalid field(s): {bad}") from None
    return body


def check_tensor(name: str, tensor: torch.Tensor, spec: TensorSpec | None) -> None:
    """ValueError unless ``tensor`` matches ``spec`` (when known) and is finite."""
    if spec is not None and (tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape):
        raise ValueError(
            f"tensor {name!r}: got {dtype_name(tensor.dtype)} {tuple(tensor.shape)}, the "
            f"engine's checkpoint has {dtype_name(spec.dtype)} {spec.shape}"
        )
    if not all_finite(tensor):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"tensor {name!r}: {bad} non-finite value(s) (NaN or Inf)")


def check_meta(
    name: str, dtype: torch.dtype, shape: tuple[int, ...], manifest: dict[str, TensorSpec] | None
) -> None:
    """ValueError unless the engine knows ``name`` with this dtype and shape."""
    if dtype_from_name(dtype_name(dtype)) is None:
        raise ValueError(f"tensor {name!r}: dtype {dtype} has no torch attribute name")
    if manifest is None:
        return
    spec = manifest.get(name)
    if spec is None:
        raise ValueError(f"tensor {name!r} is not in the engine's checkpoint (unknown name)")
    if dtype != spec.dtype or tuple(shape) != spec.shape:
        raise ValueError(
            f"tensor {name!r}: the update sends {dtype_name(dtype)} {tuple(shape)}, the "
            f"engine's checkpoint has {dtype_name(spec.dtype)} {spec.shape}"
        )


# -- tensor path: dry-checking FlattenedTensorBucket payloads (built by transport.ipc) ---------


@dataclass(frozen=True, slots=True)
class _Shadow:
    """Stands in for a tensor or storage during a dry unpickle."""

    dtype: torch.dtype | None = None
    shape: tuple[int, ...] = ()
    device: str = "cpu"


def _rebuild_tensor(cls, storage, metadata):
    return _Shadow(storage.dtype, tuple(metadata[1]), "cpu")


def _rebuild_cuda_tensor(tensor_cls, size, stride, offset, storage_cls, dtype, device, *rest):
    return _Shadow(dtype, tuple(size), f"cuda:{device}")


_RECORDERS = {
    "rebuild_tensor": _rebuild_tensor,
    "rebuild_cuda_tensor": _rebuild_cuda_tensor,
    "_rebuild_cuda_tensor_modified": _rebuild_cuda_tensor,
    "rebuild_typed_storage": lambda storage, dtype: _Shadow(dtype),
    "rebuild_storage_fd": lambda *args: _Shadow(),
    "rebuild_storage_filename": lambda *args: _Shadow(),
    "rebuild_storage_empty": lambda *args: _Shadow(),
}


def _dry_unpickler(data: bytes):
    from sglang.srt.utils import SafeUnpickler

    class DryUnpickler(SafeUnpickler):
        def find_class(self, module, name):
            found = super().find_class(module, name)  # SGLang's allowlist decides
            return _RECORDERS.get(name, found)

    return DryUnpickler(io.BytesIO(data))


def check_payload(payload: str, bucket: Bucket, rank: int) -> None:
    """ValueError unless ``payload`` is a FlattenedTensorBucket of exactly ``bucket``."""
    where = f"bucket {bucket.index} payload for TP rank {rank}"
    try:
        obj = _dry_unpickler(pybase64.b64decode(payload, validate=True)).load()
    except Exception as e:  # noqa: BLE001 - anything SGLang's scheduler would die on
        raise ValueError(f"{where}: SGLang cannot unpickle it: {e}") from None
    if not isinstance(obj, dict) or set(obj) != {"flattened_tensor", "metadata"}:
        raise ValueError(f"{where}: expected a dict with flattened_tensor and metadata")
    flat = obj["flattened_tensor"]
    if not isinstance(flat, _Shadow) or flat.dtype != torch.uint8 or len(flat.shape) != 1:
        raise ValueError(f"{where}: flattened_tensor must be a 1-D uint8 tensor")
    start = 0
    for meta, (name, dtype, shape) in zip(obj["metadata"], bucket.metas(), strict=False):
        nbytes = math.prod(shape) * dtype.itemsize
        try:
            got = (meta.name, meta.dtype, tuple(meta.shape), meta.start_idx, meta.end_idx)
        except (AttributeError, TypeError):
            raise ValueError(
                f"{where}: metadata entry {meta!r} lacks name/dtype/shape/"
                "start_idx/end_idx attributes"
            ) from None
        if got != (name, dtype, shape, start, start + nbytes):
            raise ValueError(
                f"{where}: metadata {got} does not match the plan's tensor "
                f"{(name, dtype, shape, start, start + nbytes)}"
            )
        start += nbytes
    if len(obj["metadata"]) != bucket.num_tensors or flat.shape[0] != bucket.nbytes:
        raise ValueError(
            f"{where}: {len(obj['metadata'])} tensors in {flat.shape[0]} bytes, the plan has "
            f"{bucket.num_tensors} tensors in {bucket.nbytes} bytes"
        )
