"""The fused CPU kernel (int4_cpu.c): built on first use with the system C compiler, cached.

Eager torch spends most of its time on fp32 temporaries that fall out of cache between ~10
elementwise passes; the C kernel does one pass per row (see the benchmark). It is an
accelerator only: ``weightsync/quant/int4.py`` is the reference, the tests hold both to the
same bits, and without a compiler (or with WEIGHTSYNC_NATIVE=0) the reference runs instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import torch

_SRC = Path(__file__).with_name("int4_cpu.c")
# Exact IEEE division and rounding are part of the contract: never -ffast-math here.
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-fPIC", "-shared"]
_ROWS_PER_TASK = 64


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "weightsync"


@cache
def load() -> ctypes.CDLL | None:
    """The compiled kernel, or None when disabled or no C compiler is available."""
    cc = shutil.which(os.environ.get("CC", "cc"))
    if os.environ.get("WEIGHTSYNC_NATIVE", "1") == "0" or cc is None:
        return None
    key = hashlib.sha256(
        _SRC.read_bytes() + " ".join([cc, *_FLAGS, platform.node(), platform.machine()]).encode()
    )
    lib = _cache_dir() / f"int4_cpu_{key.hexdigest()[:16]}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename: concurrent first uses never see half a file.
        with tempfile.NamedTemporaryFile(dir=lib.parent, suffix=".so", delete=False) as tmp:
            subprocess.run(
                [cc, *_FLAGS, str(_SRC), "-o", tmp.name], check=True, capture_output=True
            )
            os.replace(tmp.name, lib)
    dll = ctypes.CDLL(str(lib))
    fn = dll.ws_int4_pack_rows
    fn.restype = ctypes.c_int
    fn.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    return dll


@cache
def _pool() -> ThreadPoolExecutor:
    # ctypes drops the GIL during the call, so plain threads run the rows in parallel.
    return ThreadPoolExecutor(
        max_workers=max(1, torch.get_num_threads()), thread_name_prefix="ws-int4"
    )


def supports(w: torch.Tensor, k: int) -> bool:
    """Any group size; bf16 and fp32 on the CPU, when the kernel builds."""
    return (
        w.device.type == "cpu" and w.dtype in (torch.bfloat16, torch.float32) and load() is not None
    )


def pack_rows(w_RI: torch.Tensor, k: int, symmetric: bool):
    """(packed bytes uint8 [R, I/2], scale [R, G] in w's dtype, zp uint8 [R, G] | None, bad)."""
    w_RI = w_RI.contiguous()
    rows, cols = w_RI.shape
    g = cols // k
    packed = torch.empty(rows, cols // 2, dtype=torch.uint8)
    scale = torch.empty(rows, g, dtype=w_RI.dtype)
    zp = None if symmetric else torch.empty(rows, g, dtype=torch.uint8)
    fn = load().ws_int4_pack_rows
    args = (w_RI.data_ptr(), int(w_RI.dtype == torch.bfloat16))
    outs = (packed.data_ptr(), scale.data_ptr(), None if zp is None else zp.data_ptr())
    spans = [(r, min(rows, r + _ROWS_PER_TASK)) for r in range(0, rows, _ROWS_PER_TASK)]
    bad = any(_pool().map(lambda s: fn(*args, s[0], s[1], cols, k, *outs), spans))
    return packed, scale, zp, bad
