"""The toy task: "count up". Pure functions, no model.

Given a prompt of random token ids, every generated token should be the previous token + 1
(mod vocab). The reward of a sample is the fraction of its tokens that do so. A random policy
scores ~1/vocab; a small transformer learns the successor map within ~15 GRPO steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def make_prompts(seed: int, step: int, num: int, length: int, vocab: int) -> list[list[int]]:
    """Deterministic per (seed, step), independent of how many steps ran before."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, vocab, (num, length), generator=g).tolist()


def pretraining_batch(g: torch.Generator, batch: int, length: int, vocab: int) -> torch.Tensor:
    """Sequences where each token is the previous one + 1, + 2 or + 3 (at random): what the
    base of the LoRA demo learns before RL, which then only has to sharpen it to + 1."""
    start = torch.randint(0, vocab, (batch, 1), generator=g)
    steps = torch.randint(1, 4, (batch, length - 1), generator=g)
    return torch.cat([start, start + steps.cumsum(1)], 1) % vocab


def count_up_reward(prompt: Sequence[int], response: Sequence[int], vocab: int) -> float:
    if not prompt or not response:
        raise ValueError("count_up_reward: prompt and response must be non-empty")
    prev = [prompt[-1], *response[:-1]]
    return sum((p + 1) % vocab == t for p, t in zip(prev, response, strict=True)) / len(response)


def group_advantages(rewards_PG: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: each sample's reward relative to its prompt's group, in units of the group's std.

    rewards_PG: [prompts, samples per prompt]. A group whose samples all scored the same
    carries no signal and gets zero advantage.
    """
    if rewards_PG.dim() != 2 or rewards_PG.shape[1] < 2:
        raise ValueError(
            f"rewards shape {tuple(rewards_PG.shape)}: expected [prompts, samples >= 2]"
        )
    r = rewards_PG.double()
    centered = r - r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True)
    return torch.where(std > eps, centered / (std + eps), torch.zeros_like(r)).float()
