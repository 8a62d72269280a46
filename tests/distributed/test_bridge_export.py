"""megatron_bridge against transformers, in real gloo processes running real megatron-core.

For every case (family x parallel layout) one 2-rank job loads a random HF checkpoint into
megatron (or keeps megatron's own init: "fresh"), runs a forward pass and exports. Checks:
exported names/shapes == what transformers writes for that config; metadata == the stream and
identical on all ranks; tensors grouped by atomic unit; HF -> megatron -> HF bit-exact; and
transformers logits with the exported weights == megatron logits (fp32, rel err < 1e-5).
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.bridge_helpers import checkpoint_keys, hf_logits, run_ranks
from tests.bridge_jobs import MOE, TOKENS, Case, run_cases

DENSE = ("llama", "mistral", "qwen2", "qwen3")  # mistral's config here ties embeddings
CASES = [
    *(Case(f, tp=2) for f in (*DENSE, *MOE)),  # MoE with TP=2 means ETP=2 too (eval mode)
    *(Case(f, pp=2) for f in (*DENSE, *MOE)),
    *(Case(f, tp=2, load=False) for f in (*DENSE, *MOE)),
    Case("llama"),  # TP=1 with a data-parallel replica that must not yield
    Case("llama", pp=2, vpp=2, layers=4),
    Case("mistral", pp=2, vpp=2, layers=4),
    Case("qwen2_moe", ep=2),
    Case("qwen3_moe", ep=2, dispatcher="alltoall"),
    Case("qwen3_moe", tp=2, etp=1),
    Case("deepseek_v3", ep=2, dispatcher="alltoall"),
    Case("deepseek_v3", ep=2, load=False),
    Case("qwen3_moe", tp=2, from_state_dict=True),
    Case("mistral", pp=2, from_state_dict=True),
    Case("deepseek_v3", tp=2, bf16=True),  # bf16 params, the router's expert bias stays fp32
    Case("llama", tp=2, rope="llama3"),
    Case("deepseek_v3", tp=2, rope="yarn"),
    Case("deepseek_v3", tp=2, variant="no_q_lora"),
    Case("llama", tp=2, train=True),
    Case("qwen3_moe", ep=2, dispatcher="alltoall", train=True),  # MoE trains at TP=1 on CPU
    Case("deepseek_v3", ep=2, dispatcher="alltoall", train=True),
    *(Case(f) for f in ("mistral", "qwen2", "qwen3", *MOE)),  # TP=1 (and a DP replica)
]
CASES_4 = [  # 4 ranks on 2 cores: the layouts that need both a pipeline and another dimension
    Case("llama", tp=2, pp=2),
    Case("qwen2_moe", tp=2, ep=2),  # ETP=2 x EP=2
    Case("qwen3_moe", tp=2, ep=2, etp=1, dispatcher="alltoall"),  # EP=2 x expert-DP=2
    Case("deepseek_v3", pp=2, ep=2, dispatcher="alltoall"),
]
WORLD = {**{str(c): 2 for c in CASES}, **{str(c): 4 for c in CASES_4}}


def reference_checkpoint(case: Case, path: str) -> dict[str, torch.Tensor]:
    """A random HF checkpoint; 1-D tensors (norms, biases, router bias) are jittered away from
    their constant init so that swapping two of them cannot go unnoticed."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(case.hf_config())
    os.makedirs(path)
    model.save_pretrained(path)
    weights = load_file(os.path.join(path, "model.safetensors"))
    weights = {k: v + 0.1 * torch.randn_like(v) if v.ndim == 1 else v for k, v in weights.items()}
    save_file(weights, os.path.join(path, "model.safetensors"))
    return weights


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for case in CASES + CASES_4:
        if case.checkpoint not in out:
            path = str(root / case.checkpoint)
            out[case.checkpoint] = {"dir": path, "weights": reference_checkpoint(case, path)}
    return out


@pytest.fixture(scope="module")
def bridge_runs(checkpoints: dict[str, dict]) -> dict[int, dict]:
    """Runs each world size's job once, on first use."""
    dirs = {k: v["dir"] for k, v in checkpoints.items()}
    cache: dict[int, dict] = {}

    def results(world: int) -> dict:
        if world not in cache:
            cases = CASES if world == 2 else CASES_4
            cache[world] = run_ranks(run_cases, world, cases, dirs, timeout=400)[0]
        return cache[world]

    return results


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES + CASES_4, ids=str)
def test_export_matches_transformers(bridge_runs, checkpoints: dict, case: Case) -> None:
    check_case(bridge_runs(WORLD[str(case)])[str(case)], checkpoints, case)


def check_case(out: dict, checkpoints: dict, case: Case) -> None:
    """All checks of one case's rank-0 result against transformers."""
    cfg = case.hf_config()
    exported = dict(kv for unit in out["units"] for kv in unit)

    expected = checkpoint_keys(cfg)
    assert set(exported) == set(expected)
    assert {k: tuple(v.shape) for k, v in exported.items()} == expected

    meta = out["meta"]
    assert out["same_meta"], "metadata differs between ranks"
    assert set(out["shape_checks"]) == {"no error"}, out["shape_checks"]
    assert [(m.name, m.shape, m.dtype) for m in meta] == [
        (k, tuple(v.shape), v.dtype) for k, v in exported.items()
    ]
    unit_of = {m.name: m.unit for m in meta}
    assert [len({unit_of[n] for n, _ in unit}) for unit in out["units"]] == [1] * len(
        out["units"]
    ), "a yielded unit mixes metadata units"
    assert len({unit_of[u[0][0]] for u in out["units"]}) == len(out["units"])

    reference = checkpoints[case.checkpoint]["weights"]
    if case.bf16:
        reference = {
            k: v if v.dtype == meta_dtype(meta, k) else v.bfloat16() for k, v in reference.items()
        }
    if case.train:
        moved = [n for n, t in exported.items() if not torch.equal(t, reference[n])]
        assert len(moved) > len(exported) // 2, "the SGD step left most weights unchanged"
        ref_logits = hf_logits(cfg, {k: v.float() for k, v in exported.items()}, TOKENS)
    elif case.load:
        for name, t in exported.items():
            assert torch.equal(t, reference[name]), f"{name} changed in HF->megatron->HF"
        ref_logits = hf_logits(cfg, {k: v.float() for k, v in reference.items()}, TOKENS)
    else:
        ref_logits = hf_logits(cfg, {k: v.float() for k, v in exported.items()}, TOKENS)
    err = (out["logits"] - ref_logits).norm() / ref_logits.norm()
    assert err < (3e-2 if case.bf16 else 1e-5), f"relative logits error {err:.3g}"
    if out["inv_freq"] is not None:
        # Llama-3 scaling only bends low frequencies: too little rotation in a short test
        # sequence to move the logits much, so compare the frequencies themselves.
        from transformers import AutoModelForCausalLM

        hf_freq = AutoModelForCausalLM.from_config(cfg).model.rotary_emb.inv_freq
        torch.testing.assert_close(out["inv_freq"], hf_freq.float(), rtol=1e-6, atol=0)


def meta_dtype(meta: list, name: str) -> torch.dtype:
    return next(m.dtype for m in meta if m.name == name)


@pytest.mark.slow
def test_units_keep_engine_fused_tensors_together(bridge_runs) -> None:
    results = bridge_runs(2)
    units = results[str(Case("deepseek_v3", tp=2))]["units"]
    by_first = {unit[0][0]: [n for n, _ in unit] for unit in units}
    layer = "model.layers.1."
    assert by_first[layer + "self_attn.q_a_proj.weight"] == [
        layer + "self_attn.q_a_proj.weight",
        layer + "self_attn.kv_a_proj_with_mqa.weight",
    ]
    assert by_first[layer + "mlp.experts.3.gate_proj.weight"] == [
        layer + f"mlp.experts.3.{p}_proj.weight" for p in ("gate", "up", "down")
    ]
    qwen = results[str(Case("qwen2", tp=2))]["units"]
    assert [
        "model.layers.0.self_attn." + p
        for p in (
            "q_proj.weight",
            "k_proj.weight",
            "v_proj.weight",
            "q_proj.bias",
            "k_proj.bias",
            "v_proj.bias",
        )
    ] in [[n for n, _ in u] for u in qwen]


@pytest.mark.slow
def test_bad_input_raises_value_error_naming_it(bridge_runs) -> None:
    errors = bridge_runs(2)["errors"]
    assert "model.layers.1.self_attn.k_proj.bias" in errors["shape"]
    assert "(5,)" in errors["shape"]
    assert "'model.norm.weight' is missing" in errors["missing"]
    assert "foo.w" in errors["extra"]
    assert "decoder.layers.0.mlp.extra" in errors["unknown_param"]
    assert errors["local_shape_ok"] == "no error"
    assert "decoder.layers.0.mlp.linear_fc1.weight" in errors["local_shape"], errors["local_shape"]
