"""Tensor primitives the trainer side, the transports and the engine adapters share.

One home each: how a dtype is spelled (on the engines' HTTP APIs and in safetensors headers),
how a safetensors header is read, how a tensor is tested for NaN/Inf, how its bytes are
digested. Only torch and the standard library, so the vLLM plugin can import it inside the
engine.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch

# safetensors header dtype codes -> torch dtypes (those a checkpoint can hold).
ST_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
ST_CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in ST_DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: the spelling engines' HTTP APIs expect."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype | None:
    """torch.bfloat16 for 'bfloat16' (``dtype_name``'s inverse); None for any other name."""
    dtype = getattr(torch, name, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def safetensors_header(path: str | Path) -> dict[str, dict]:
    """``{name: {"dtype", "shape", "data_offsets"}}`` of one safetensors file, from its JSON
    header alone (no tensor bytes are read); ``__metadata__`` is left out."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t`` (integer and empty tensors are finite)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if t.element_size() == 1:  # aminmax has no float8 kernels
        return bool(torch.isfinite(t).all())
    # min/max propagate NaN and keep Inf: two reductions at about memory speed and no bool
    # temporary of the tensor's size (isfinite(t).all() is ~50-60x slower on CPU).
    lo, hi = torch.aminmax(t.detach())
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def sha256(t: torch.Tensor) -> str:
    """Digest of a tensor's bytes (contiguous, as they would be sent)."""
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy()).hexdigest()
