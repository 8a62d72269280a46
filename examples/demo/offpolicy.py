"""Off-policy bookkeeping for the async loop: per-token policy versions, staleness, and the
truncated importance-sampling (TIS) weights that correct the loss for stale tokens.

A sample trained at trainer policy version V whose oldest token was sampled under version v
is ``V - v`` stale. Pure functions: the loop and the trainer actors both import them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

INITIAL_LABEL = "default"
"""The label a launched engine (vLLM, SGLang) gives the checkpoint it loaded: the trainer's
initial weights, version 0."""


def version_number(label: str) -> int:
    """The trainer policy version a weight label stands for (labels are the synced versions,
    ``str(int)``; the launched engine's initial ``INITIAL_LABEL`` is 0)."""
    if label == INITIAL_LABEL:
        return 0
    if not (label.isascii() and label.isdigit()):  # no sign, blanks or "1_000": as synced
        raise ValueError(
            f"weight version {label!r}: not a policy version (an int, or {INITIAL_LABEL!r})"
        )
    return int(label)


def staleness(trainer_version: int, token_versions: Sequence[str]) -> int:
    """How many versions the sample's oldest token lags the policy it trains
    (``trainer_version``): 0 is on-policy."""
    if not token_versions:
        raise ValueError("token_versions: a sample has at least one token")
    versions = [version_number(v) for v in token_versions]
    if max(versions) > trainer_version:
        # Only a bookkeeping bug gets here: the engine never runs ahead of the trainer.
        raise ValueError(
            f"token_versions: a token of version {max(versions)} trains policy version "
            f"{trainer_version} (newer than the trainer)"
        )
    return trainer_version - min(versions)


def must_wait(step: int, served: int, max_staleness: int) -> bool:
    """Before starting step ``step``'s rollouts on an engine known to serve version
    ``served``: True when its samples could exceed ``max_staleness``, so the in-flight update
    must land first. Rollouts start no older than ``served`` and train policy ``step``."""
    return step - served > max_staleness


def check_staleness(step: int, stalenesses: Sequence[int], max_staleness: int) -> None:
    """The bound held for a collected batch (RuntimeError otherwise: the loop's own bug)."""
    worst = max(stalenesses, default=0)
    if worst > max_staleness:
        raise RuntimeError(
            f"step {step}: a sample is {worst} versions stale, max_staleness={max_staleness} "
            f"({sum(s > max_staleness for s in stalenesses)} of {len(stalenesses)} over it)"
        )


def tis_weights(
    trainer_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, cap: float
) -> torch.Tensor:
    """Per-token truncated importance weights min(p_trainer / p_rollout, cap), detached: they
    rescale each token's policy gradient and must not be differentiated themselves."""
    if not cap > 0:
        raise ValueError(f"cap={cap} must be > 0")
    if trainer_logprobs.shape != rollout_logprobs.shape:
        raise ValueError(
            f"rollout_logprobs shape {tuple(rollout_logprobs.shape)}: expected the trainer's "
            f"{tuple(trainer_logprobs.shape)}"
        )
    ratio = torch.exp(trainer_logprobs.detach().float() - rollout_logprobs.detach().float())
    return ratio.clamp(max=cap)
