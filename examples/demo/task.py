"""The toy task: "count up". Pure functions, no model.

Given a prompt of random token ids, every generated token should be the previous token + 1
(mod vocab). The reward of a sample is the fraction of its tokens that do so. A random policy
scores ~1/vocab; the demo's base is pretrained on +1/+2/+3 sequences (~0.3), and GRPO with a
per-token advantage sharpens it to +1 (reward > 0.9 within 20 steps, seeds 0-2).
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
    demo's base learns before RL, which then only has to sharpen it to + 1."""
    start = torch.randint(0, vocab, (batch, 1), generator=g)
    steps = torch.randint(1, 4, (batch, length - 1), generator=g)
    return torch.cat([start, start + steps.cumsum(1)], 1) % vocab


def count_up_correct(prompt: Sequence[int], response: Sequence[int], vocab: int) -> list[float]:
    """Per response token: 1.0 if it is the previous token + 1 (mod vocab), else 0.0."""
    if not prompt or not response:
        raise ValueError("count_up: prompt and response must be non-empty")
    prev = [prompt[-1], *response[:-1]]
    return [float((p + 1) % vocab == t) for p, t in zip(prev, response, strict=True)]


def count_up_reward(prompt: Sequence[int], response: Sequence[int], vocab: int) -> float:
    """A sample's reward: the fraction of its tokens that count up."""
    correct = count_up_correct(prompt, response, vocab)
    return sum(correct) / len(correct)


def group_advantages(rewards_PG: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: each sample's reward relative to its prompt's group, in units of the group's std.

    rewards_PG: [prompts, samples per prompt], or [prompts, samples, response tokens] for a
    reward per token (``count_up_correct``), each position normalized within its group: the
    sequence reward credits a sample's every token alike, so one right token among wrong
    ones is barely reinforced; per token each gets its own credit. A group (a position) whose
    samples all scored the same carries no signal and gets zero advantage.
    """
    if rewards_PG.dim() not in (2, 3) or rewards_PG.shape[1] < 2:
        raise ValueError(
            f"rewards shape {tuple(rewards_PG.shape)}: expected [prompts, samples >= 2] "
            "or [prompts, samples >= 2, tokens]"
        )
    r = rewards_PG.double()
    centered = r - r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True)
    return torch.where(std > eps, centered / (std + eps), torch.zeros_like(r)).float()
