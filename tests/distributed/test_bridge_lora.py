"""megatron_bridge LoRA against transformers + PEFT, in real gloo processes (real megatron-core).

One 2-rank job runs every case: build the model, load a random HF checkpoint, (int4 QAT
hooks,) apply_lora, load a random PEFT adapter, megatron logits, export the base weights and
the adapter, then one SGD step on the adapter and export again. Checks: megatron's logits equal
PEFT's on the exported base weights (fake-quantized under QAT) + exported adapter (fp32); the
adapter round-trips bit-exactly; only LoRA parameters get gradients; the TP=2 step equals
PEFT's; TP=2 exports (fresh init and after the step) equal TP=1's; bad targets and ranks are
ValueErrors naming them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file

from tests.bridge_helpers import hf_config, megatron_logits, run_ranks
from tests.bridge_jobs import TOKENS, _to_rank0

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA, GROUP = 4, 8.0, 8  # GROUP: int4 group size dividing every TP=2 shard width here


@dataclass(frozen=True)
class Case:
    family: str
    tp: int = 1
    pp: int = 1
    targets: tuple[str, ...] = ALL
    qat: bool = False
    train: bool = True
    """One SGD step on the adapter, then export again (PP=1 only: one chunk's backward)."""

    def __str__(self) -> str:
        parts = [self.family, f"tp{self.tp}", f"pp{self.pp}"]
        parts += [] if self.targets == ALL else ["-".join(t[0] for t in self.targets)]
        return "-".join(parts + (["qat"] if self.qat else []))


CASES = [
    Case("llama", tp=1),  # TP=1 with a data-parallel replica
    Case("llama", tp=2),
    Case("llama", pp=2, train=False),
    Case("qwen2", tp=2, targets=("q_proj", "v_proj", "down_proj")),  # k gets no adapter; bias
    Case("llama", tp=2, qat=True),
]


def _peft_name(module: str, ab: str) -> str:
    return f"base_model.model.{module}.lora_{ab}.weight"


def random_adapter(cfg: object, targets: tuple[str, ...], seed: int) -> dict[str, torch.Tensor]:
    """Non-zero A and B for every targeted projection of the HF model of ``cfg``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(cfg)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in model.named_modules():
        if name.rpartition(".")[2] in targets:
            o, i = module.weight.shape
            out[_peft_name(name, "A")] = 0.3 * torch.randn(RANK, i, generator=gen)
            out[_peft_name(name, "B")] = 0.3 * torch.randn(o, RANK, generator=gen)
    return out


def _cpu(named: object) -> dict[str, torch.Tensor]:
    return {n: t.to("cpu", copy=True) for n, t in named}


def _lora_step(chunk: torch.nn.Module, vocab: int, lr: float = 0.5) -> list[str]:
    """One megatron forward/backward and SGD on what requires grad; names that got a grad.

    The loss is taken on the unpadded vocabulary: megatron's own (labels=) loss counts the
    padding logits, whose number depends on the TP size.
    """
    chunk.train()
    tokens = TOKENS[:, :-1]
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    logits = chunk(tokens, positions, None, runtime_gather_output=True)[..., :vocab]
    F.cross_entropy(logits.flatten(0, 1), TOKENS[:, 1:].flatten()).backward()
    with torch.no_grad():
        for p in chunk.parameters():
            if p.requires_grad:
                p -= lr * p.grad
    return [n for n, p in chunk.named_parameters() if p.grad is not None]


def run_case(case: Case, checkpoint: str, adapter: str) -> dict | None:
    from megatron.core import parallel_state as ps

    import megatron_bridge as mb
    from weightsync.quant import Int4Config
    from weightsync_demo.qat import attach_int4_qat

    mb.init_parallel(tp=case.tp, pp=case.pp)
    cfg = hf_config(case.family)
    chunks = mb.build_model(cfg)
    mb.load_hf_weights(chunks, checkpoint, cfg)
    if case.qat:
        attach_int4_qat(chunks[0], Int4Config(group_size=GROUP), case.tp)
    spec = mb.apply_lora(chunks, case.targets, RANK, ALPHA)
    out = {"fresh": _cpu(mb.export_lora(chunks, cfg, spec))}
    out["trainable"] = [n for n, p in chunks[0].named_parameters() if p.requires_grad]
    out["meta"] = mb.lora_weight_metadata(chunks, cfg, spec)
    mb.load_lora_weights(chunks, adapter, cfg, spec)
    shape = (*TOKENS.shape, chunks[-1].vocab_size)
    logits = _to_rank0(megatron_logits(chunks, TOKENS), shape, torch.float32, case.pp)
    out["adapter"] = _cpu(mb.export_lora(chunks, cfg, spec))
    out["base"] = _cpu(mb.export_hf_weights(chunks, cfg))
    if case.train:
        out["with_grad"] = _lora_step(chunks[0], cfg.vocab_size)
        out["trained"] = _cpu(mb.export_lora(chunks, cfg, spec))
    ps.destroy_model_parallel()
    if dist.get_rank() != 0:
        return None
    return out | {"logits": logits[..., : cfg.vocab_size], "config": mb.adapter_config(spec)}


def _error(fn: object) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return "no error"


def error_and_dropout_checks() -> dict[str, object]:
    """ValueErrors (same on every rank, before any change) and a TP=2 dropout forward."""
    import megatron_bridge as mb

    mb.init_parallel(tp=2)
    cfg = hf_config("llama")
    chunks = mb.build_model(cfg)
    out = {
        "unknown": _error(lambda: mb.apply_lora(chunks, ["q_proj", "qkv_proj"], 4, 8)),
        # k_proj/v_proj are (2 KV heads x 12, 32): rank 30 fits q_proj (48, 32), not them.
        "rank": _error(lambda: mb.apply_lora(chunks, ["q_proj", "k_proj"], 30, 8)),
        "untouched": all(p.requires_grad for p in chunks[0].parameters()),
    }
    mb.apply_lora(chunks, ALL, 4, 8, dropout=0.5)
    out["twice"] = _error(lambda: mb.apply_lora(chunks, ["q_proj"], 4, 8))
    with torch.no_grad():  # B is 0: give the delta (and so the dropout) something to move
        for n, p in chunks[0].named_parameters():
            if "lora_B" in n:
                p.normal_()
    chunks[0].train()
    positions = torch.arange(TOKENS.shape[1]).expand_as(TOKENS)
    a, b = (chunks[0](TOKENS, positions, None) for _ in range(2))
    out["dropout_moves"] = not torch.equal(a, b)
    return out


def run_all(rank: int, world: int, cases: list[Case], dirs: dict[str, str]) -> dict:
    out = {str(c): run_case(c, dirs[c.family], dirs[f"{c.family}-{c.targets}"]) for c in cases}
    return out | {"errors": error_and_dropout_checks()}


def _save_checkpoint(cfg: object, path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(11)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _save_adapter(tensors: dict[str, torch.Tensor], config: dict, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Per family: a random checkpoint; per (family, targets): a random PEFT adapter."""
    from megatron_bridge.lora import LoraSpec
    from megatron_bridge.lora_export import adapter_config

    root = tmp_path_factory.mktemp("lora")
    out: dict[str, dict] = {}
    for case in CASES:
        cfg = hf_config(case.family)
        if case.family not in out:
            path = root / case.family
            out[case.family] = {"dir": str(path), "weights": _save_checkpoint(cfg, path)}
        key = f"{case.family}-{case.targets}"
        if key not in out:
            tensors = random_adapter(cfg, case.targets, seed=len(out))
            config = adapter_config(LoraSpec(case.targets, RANK, ALPHA))
            path = _save_adapter(tensors, config, root / key.replace("'", ""))
            out[key] = {"dir": str(path), "weights": tensors}
    return out


@pytest.fixture(scope="module")
def results(inputs: dict[str, dict]) -> dict:
    dirs = {k: v["dir"] for k, v in inputs.items()}
    return run_ranks(run_all, 2, CASES, dirs, timeout=300)[0]


def peft_model(case: Case, out: dict, tmp_path: Path) -> torch.nn.Module:
    """transformers + PEFT on the exported base weights (fake-quantized for QAT) and adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from weightsync.quant import Int4Config, fake_quant_int4

    base = out["base"]
    if case.qat:
        int4 = Int4Config(group_size=GROUP)
        base = {
            n: fake_quant_int4(t, GROUP) if int4.is_quantized(n, t.shape) else t
            for n, t in base.items()
        }
    hf_config(case.family).save_pretrained(tmp_path / "base")
    save_file({k: v.contiguous() for k, v in base.items()}, tmp_path / "base/model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    adapter = _save_adapter(out["adapter"], out["config"], tmp_path / "adapter")
    return PeftModel.from_pretrained(model, str(adapter), is_trainable=True).eval()


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=str)
def test_logits_match_peft(results: dict, inputs: dict, case: Case, tmp_path: Path) -> None:
    out = results[str(case)]
    reference = inputs[f"{case.family}-{case.targets}"]["weights"]
    assert out["adapter"].keys() == reference.keys()
    for name, t in out["adapter"].items():
        assert torch.equal(t, reference[name]), f"{name} changed in PEFT->megatron->PEFT"
    for name, t in out["base"].items():
        assert torch.equal(t, inputs[case.family]["weights"][name]), name
    assert [(m.name, m.shape) for m in out["meta"]] == [
        (n, tuple(t.shape)) for n, t in out["adapter"].items()
    ]
    with torch.no_grad():
        expected = peft_model(case, out, tmp_path)(TOKENS).logits
    err = (out["logits"] - expected).norm() / expected.norm()
    print(f"{case}: max |megatron - peft| = {(out['logits'] - expected).abs().max():.3g}")
    assert err < 1e-5, f"relative logits error {err:.3g}"
    if case.qat:  # the same weights and adapter without QAT: the int4 grid must show
        plain = results[str(Case(case.family, tp=case.tp))]["logits"]
        assert (plain - out["logits"]).abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if c.train], ids=str)
def test_only_lora_parameters_train(results: dict, case: Case) -> None:
    out = results[str(case)]
    per_layer = 2 * len(case.targets)  # A and B per targeted projection
    assert len(out["trainable"]) == 2 * per_layer  # two layers
    assert all(".lora_adapter.lora_" in n for n in out["trainable"]), out["trainable"]
    assert sorted(out["with_grad"]) == sorted(out["trainable"])


@pytest.mark.slow
def test_tp2_export_equals_tp1(results: dict) -> None:
    one, two = results[str(Case("llama", tp=1))], results[str(Case("llama", tp=2))]
    assert one["fresh"].keys() == two["fresh"].keys()
    for name, t in one["fresh"].items():  # A: kaiming, seeded per layer and projection; B: 0
        assert torch.equal(t, two["fresh"][name]), name
        assert torch.count_nonzero(t) == (0 if name.endswith("lora_B.weight") else t.numel())
    moved = 0
    for name, t in one["trained"].items():  # gradients through the TP region functions
        torch.testing.assert_close(two["trained"][name], t, rtol=1e-5, atol=1e-6)
        moved += not torch.equal(t, one["adapter"][name])
    assert moved == len(one["trained"]), "the SGD step left some adapter tensors unchanged"


@pytest.mark.slow
def test_sgd_step_matches_peft(results: dict, tmp_path: Path) -> None:
    """The TP=2 adapter after megatron's backward equals PEFT's after torch's, same loss."""
    from peft import get_peft_model_state_dict

    case = Case("llama", tp=2)
    out = results[str(case)]
    model = peft_model(case, out, tmp_path).train()
    logits = model(TOKENS[:, :-1]).logits
    F.cross_entropy(logits.flatten(0, 1), TOKENS[:, 1:].flatten()).backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p -= 0.5 * p.grad
    expected = get_peft_model_state_dict(model)
    assert expected.keys() == out["trained"].keys()
    for name, t in out["trained"].items():
        torch.testing.assert_close(t, expected[name], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_bad_targets_and_ranks_are_value_errors(results: dict) -> None:
    errors = results["errors"]
    assert "qkv_proj" in errors["unknown"], errors["unknown"]
    assert "rank=30" in errors["rank"] and "k_proj" in errors["rank"], errors["rank"]
    assert "q_proj" not in errors["rank"], errors["rank"]
    assert errors["untouched"], "a refused apply_lora froze parameters"
    assert "already has a LoRA adapter" in errors["twice"]
    assert errors["dropout_moves"]


def _gather_both_ways(rank: int, world: int) -> list | None:
    """Shards of mixed dtypes, dims and strides, and one unsharded tensor: gathered one by one
    and all at once."""
    from megatron_bridge.gather import gather_many_to_first, gather_to_first, shard_of

    g = torch.Generator().manual_seed(0)
    specs = [(0, 1, torch.bfloat16), (1, 1, torch.float32), (0, 2, torch.bfloat16), None]
    params = []
    for spec in specs:
        full = torch.randn(8, 6, generator=g)
        if spec is None:
            params.append(full)
            continue
        dim, stride, dtype = spec
        p = shard_of(full.to(dtype), dim, stride, rank, world).clone()
        p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, dim, stride
        params.append(p)
    group = dist.group.WORLD
    one_by_one = [gather_to_first(p, group) for p in params]
    at_once = gather_many_to_first(params, group)
    if rank != 0:
        assert at_once is None
        return None
    return [(a.dtype, torch.equal(a, b)) for a, b in zip(one_by_one, at_once, strict=True)]


def test_the_batched_gather_equals_the_one_by_one_gather():
    got = run_ranks(_gather_both_ways, 2)[0]
    want = [(torch.bfloat16, True), (torch.float32, True), (torch.bfloat16, True)]
    assert got == [*want, (torch.float32, True)]
