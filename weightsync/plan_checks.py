"""Collective checks of a bucket plan: every sending rank must hold the same layout.

Kept apart from ``weightsync.plan``, which is pure (no processes, no communication).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.distributed as dist

if TYPE_CHECKING:
    from weightsync.plan import Plan


def check_plan_identical(plan: Plan, group: object | None = None) -> None:
    """Raise ValueError on every rank of ``group`` unless all ranks hold the same plan.

    Call it on all sending ranks before anything is sent: a rank with a different layout would
    otherwise put bytes where its peers expect other tensors. ``group`` must be able to run
    ``all_gather_object`` (gloo, or NCCL with the current CUDA device set).
    """
    mine = (plan.digest(), plan.bucket_digests(), [b.names()[:1] for b in plan.buckets])
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    ref = gathered[0]
    differing = [r for r, g in enumerate(gathered) if g[0] != ref[0]]
    if differing:
        details = "; ".join(_first_difference(r, ref, gathered[r]) for r in differing)
        raise ValueError(
            f"bucket plans differ across sending ranks: ranks {differing} differ "
            f"from rank 0 (digest {ref[0][:12]}): {details}"
        )


def _first_difference(rank: int, ref: tuple, other: tuple) -> str:
    ref_b, other_b = ref[1], other[1]
    if len(ref_b) != len(other_b):
        return f"rank {rank} has {len(other_b)} buckets, rank 0 has {len(ref_b)}"
    i = next(i for i, (a, b) in enumerate(zip(ref_b, other_b, strict=True)) if a != b)
    return (
        f"rank {rank} first differs in bucket {i} (starting at {other[2][i]}, rank 0 at "
        f"{ref[2][i]})"
    )
