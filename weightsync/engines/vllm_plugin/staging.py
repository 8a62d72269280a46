"""Engine-side staging: an update's buckets taken off the wire while the engine generates,
loaded from host memory in the pause (``SyncConfig.engine_stage_bytes``).

The wire's buffers (the shared-memory ring's slots, the broadcast's receive buffers) are the
transport's and are reused by the next bucket, so each staged bucket is a copy the engine
owns. The staging area is bounded twice: by what the trainer's config allows and by what the
engine's host can hold now; either refuses the update before anything is received (and long
before any pause), naming the bytes.
"""

from __future__ import annotations

import torch

from weightsync.plan import Bucket

_HEADROOM = 0.8  # of MemAvailable: the engine itself still allocates while it generates


def host_available() -> int:
    """Bytes the kernel says can be allocated without swapping (``MemAvailable``)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


class Staging:
    """The buckets of one update, in order, owned by this engine rank."""

    def __init__(self, nbytes: int, bound: int) -> None:
        if not 0 < nbytes <= bound:
            raise ValueError(
                f"engine staging: the update's {nbytes} bytes exceed the staging bound "
                f"SyncConfig.engine_stage_bytes={bound}"
            )
        available = int(host_available() * _HEADROOM)
        if nbytes > available:
            raise MemoryError(
                f"engine staging: this host cannot hold the update's {nbytes} bytes "
                f"({available} of its available memory may be used)"
            )
        self.nbytes = nbytes
        self.held = 0
        self.buckets: list[tuple[Bucket, dict[torch.dtype, torch.Tensor]]] = []

    def take(self, bucket: Bucket, buffers: dict[torch.dtype, torch.Tensor]) -> None:
        if self.buckets and bucket.index != self.buckets[-1][0].index + 1:
            raise ValueError(
                f"engine staging: bucket {bucket.index} after {self.buckets[-1][0].index}"
            )
        size = sum(b.numel() * b.element_size() for b in buffers.values())
        if self.held + size > self.nbytes:
            raise ValueError(
                f"engine staging: bucket {bucket.index} would hold {self.held + size} bytes, "
                f"more than the {self.nbytes} opened"
            )
        self.buckets.append((bucket, {dt: b.clone() for dt, b in buffers.items()}))
        self.held += size
