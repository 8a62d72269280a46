"""Rolling updates: which engines switch together, and where an update stands.

``SyncConfig.min_serving`` > 0 keeps that fraction of the fleet generating through an update:
the bytes reach every engine's staging area first (nothing paused), then the engines switch
in waves, each paused, loaded from staging, proved, stamped and resumed whole before the next
pauses. A wave is never cut across an engine's ranks: an engine is the unit that switches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from weightsync.verify import Proof


def plan_waves(labels: Sequence[str], min_serving: float) -> list[list[str]]:
    """``labels`` in order, cut into waves of at most ``(1 - min_serving) * len(labels)``
    engines (one wave of all at 0). ValueError when no engine could ever switch."""
    labels = list(labels)
    if not min_serving:
        return [labels]
    size = math.floor(len(labels) * (1 - min_serving) + 1e-9)
    if size < 1:
        raise ValueError(
            f"SyncConfig.min_serving={min_serving} keeps all {len(labels)} engines serving: "
            f"no engine could switch (a wave pauses at most (1 - min_serving) x engines)"
        )
    return [labels[i : i + size] for i in range(0, len(labels), size)]


@dataclass
class Wave:
    """One wave of an update, as reported (``SyncStats.waves``)."""

    engines: list[str]
    pause_s: float
    """This wave's engines paused: its pause call to its resume returned."""
    paused_at: float = 0.0
    """Wall clock (``time.time()``) of its pause call, to line up with rollout logs."""
    resumed_at: float = 0.0
    """Wall clock when its resume returned."""


@dataclass
class Progress:
    """Where an update stands, engine by engine, for its failure path (``WeightSync._fail``)."""

    paused: list[str] = field(default_factory=list)
    """Paused by this update and not resumed yet (a pause that timed out counts: it may
    still land)."""
    begun: list[str] = field(default_factory=list)
    """Their load started, not yet proved whole: what they hold may mix two versions."""
    switched: list[str] = field(default_factory=list)
    """Loaded, proved, stamped: they hold the new version (earlier waves)."""
    waves: list[Wave] = field(default_factory=list)
    proof: Proof | None = None
    """What the switched engines were proved to hold (``SyncConfig.verify``)."""
