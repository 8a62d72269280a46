"""What each rank runs in the megatron_bridge process tests (spawned via bridge_helpers)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tests.bridge_helpers import ROPES, hf_config, megatron_logits

TOKENS = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
MOE = ("qwen2_moe", "qwen3_moe", "deepseek_v3")
VARIANTS = {"no_q_lora": {"q_lora_rank": None}}  # MLA with a plain q_proj


@dataclass(frozen=True)
class Case:
    family: str
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None
    vpp: int | None = None
    layers: int = 2
    dispatcher: str = "allgather"
    load: bool = True
    """Load the reference HF checkpoint first (round trip); else export megatron's own init."""
    rope: str | None = None
    """A scaled rotary embedding from ``ROPES`` (the weights do not change)."""
    variant: str | None = None
    """Config overrides from ``VARIANTS`` (the weights change: own checkpoint)."""
    bf16: bool = False
    from_state_dict: bool = False
    train: bool = False
    """Take one SGD step after loading: the export must follow weights that moved."""
    """Load from transformers' in-memory state_dict (fused experts, tied lm_head) not the dir."""

    def hf_config(self) -> object:
        rope = {"rope_parameters": ROPES[self.rope]} if self.rope else {}
        extra = VARIANTS[self.variant] if self.variant else {}
        return hf_config(self.family, num_hidden_layers=self.layers, **rope, **extra)

    @property
    def checkpoint(self) -> str:
        """Name of the reference HF checkpoint this case loads."""
        return "-".join([self.family, str(self.layers), *([self.variant] if self.variant else [])])

    def __str__(self) -> str:
        parts = [self.family, f"tp{self.tp}", f"pp{self.pp}"]
        parts += [f"ep{self.ep}"] if self.ep > 1 else []
        parts += [f"etp{self.etp}"] if self.etp else []
        parts += [f"vpp{self.vpp}"] if self.vpp else []
        parts += [self.dispatcher] if self.family in MOE and self.ep > 1 else []
        parts += [] if self.load else ["fresh"]
        parts += ["state_dict"] if self.from_state_dict else []
        parts += ["bf16"] if self.bf16 else []
        parts += [self.rope] if self.rope else []
        parts += [self.variant] if self.variant else []
        parts += ["train"] if self.train else []
        return "-".join(parts)


def _to_rank0(
    t: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, pp: int
) -> torch.Tensor | None:
    """Bring the last pipeline stage's logits to global rank 0 (on stage 0)."""
    src = dist.get_world_size() - 1  # the last rank sits on the last pipeline stage
    if pp == 1:
        return t
    if dist.get_rank() == src:
        dist.send(t.contiguous(), dst=0)
    elif dist.get_rank() == 0:
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        t = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(t, src=src)
        return t
    return None


def run_case(case: Case, checkpoint: str) -> dict | None:
    from megatron.core import parallel_state as ps

    import megatron_bridge as mb

    mb.init_parallel(tp=case.tp, pp=case.pp, ep=case.ep, etp=case.etp, vpp=case.vpp)
    cfg = case.hf_config()
    kw = {"moe_token_dispatcher_type": case.dispatcher} if case.family in MOE else {}
    dtype = torch.bfloat16 if case.bf16 else torch.float32
    chunks = mb.build_model(cfg, params_dtype=dtype, **kw)
    if case.from_state_dict:
        from transformers import AutoModelForCausalLM

        state = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).state_dict()
        mb.load_hf_weights(chunks, state, cfg)
    elif case.load:
        mb.load_hf_weights(chunks, checkpoint, cfg)
    if case.train:
        _sgd_step(chunks[0])
    vocab = chunks[-1].vocab_size
    logits = _to_rank0(megatron_logits(chunks, TOKENS), (*TOKENS.shape, vocab), dtype, case.pp)
    meta = mb.hf_weight_metadata(chunks, cfg)
    metas = [None] * dist.get_world_size()
    dist.all_gather_object(metas, meta)
    shape_checks = [None] * dist.get_world_size()  # what WeightSender.prepare runs on each rank
    dist.all_gather_object(shape_checks, _error(lambda: mb.check_local_shapes(chunks, cfg)))
    units = [
        [(n, t.to("cpu", copy=True)) for n, t in unit] for unit in mb.iter_hf_units(chunks, cfg)
    ]
    ps.destroy_model_parallel()
    if dist.get_rank() != 0:
        assert units == [], "only the source rank yields"
        return None
    return {
        "meta": meta,
        "same_meta": all(m == meta for m in metas),
        "shape_checks": shape_checks,
        "units": units,
        "logits": logits[..., : cfg.vocab_size].float().cpu(),
        "inv_freq": _inv_freq(chunks[0]),
    }


def _sgd_step(chunk: torch.nn.Module, lr: float = 0.5) -> None:
    """One real megatron forward/backward and a plain SGD update (single chunk, PP=1)."""
    chunk.train()
    tokens = TOKENS[:, :-1]
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    chunk(tokens, positions, None, labels=TOKENS[:, 1:]).float().mean().backward()
    with torch.no_grad():
        for p in chunk.parameters():
            assert p.grad is not None
            p -= lr * p.grad
            p.grad = None


def _inv_freq(chunk: torch.nn.Module) -> torch.Tensor | None:
    rotary = getattr(chunk, "rotary_pos_emb", None)  # absent for MLA (it is per layer there)
    return None if rotary is None else rotary.inv_freq.float().cpu()


def _error(fn: Callable[[], object]) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return "no error"


def error_messages(checkpoint: str) -> dict[str, str]:
    """ValueErrors for bad input (every rank raises the same one, before any collective)."""
    from safetensors.torch import load_file

    import megatron_bridge as mb

    mb.init_parallel(tp=2)
    cfg = hf_config("qwen2")
    chunks = mb.build_model(cfg)
    good = load_file(f"{checkpoint}/model.safetensors")
    bad_shape = good | {"model.layers.1.self_attn.k_proj.bias": torch.zeros(5)}
    missing = {k: v for k, v in good.items() if k != "model.norm.weight"}
    out = {
        "shape": _error(lambda: mb.load_hf_weights(chunks, bad_shape, cfg)),
        "missing": _error(lambda: mb.load_hf_weights(chunks, missing, cfg)),
        "extra": _error(lambda: mb.load_hf_weights(chunks, good | {"foo.w": torch.ones(1)}, cfg)),
    }
    out["local_shape_ok"] = _error(lambda: mb.check_local_shapes(chunks, cfg))
    wider = hf_config("qwen2", intermediate_size=64)  # not the config the model was built from
    out["local_shape"] = _error(lambda: mb.check_local_shapes(chunks, wider))
    chunks[0].decoder.layers[0].mlp.register_parameter("extra", torch.nn.Parameter(torch.ones(1)))
    out["unknown_param"] = _error(lambda: list(mb.export_hf_weights(chunks, cfg)))
    return out


def run_cases(rank: int, world: int, cases: list[Case], checkpoints: dict[str, str]) -> dict:
    out = {str(c): run_case(c, checkpoints[c.checkpoint]) for c in cases}
    if world == 2 and dist.get_backend() == "gloo":
        out["errors"] = error_messages(checkpoints["qwen2-2"])
    return out
