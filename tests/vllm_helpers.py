"""Shared pieces of the vLLM engine tests: tiny checkpoints, perturbed weights, a reference.

The model is a 2-layer Qwen2 with head_dim 64 (the CPU attention kernel needs >= 64), built from
a config: no download, no tokenizer (the server runs with --skip-tokenizer-init and is fed
token ids).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from tests.models import tiny_config

# Every wait of the engine tests; generous because the CI machine is shared and loaded.
TIMEOUT_S = 120.0
PROMPTS = [[1, 5, 9, 33, 77, 101, 3], [200, 17, 42, 8], [64, 64, 2, 150, 9, 11]]


def build_tiny_qwen2(out_dir: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Save a bf16 checkpoint into out_dir and return its state dict (HF names)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config("qwen2", max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    # The default init (std 0.02) gives near-uniform logits; a larger scale makes greedy
    # generations depend visibly on the weights.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(out_dir)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def perturbed(state: dict[str, torch.Tensor], seed: int, scale: float = 0.5):
    """New weights in the same layout: every 2-D tensor gets relative noise."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in state.items():
        if t.dim() == 2 and t.is_floating_point():
            noise = torch.randn(t.shape, generator=g, dtype=torch.float32)
            t = (t.float() * (1 + scale * noise)).to(t.dtype)
        out[name] = t.contiguous()
    return out


def save_random_model(hf_config, out_dir: Path, std: float = 0.08) -> None:
    """A bf16 transformers model of ``hf_config`` with N(0, std) matrices (seed 0), saved to
    ``out_dir``: large enough weights that the engine's outputs tell updates apart."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
    model.save_pretrained(out_dir)


def reference_model(model_dir: Path, state: dict[str, torch.Tensor]):
    """A transformers model holding ``state`` (fp32 compute): saved as a checkpoint beside the
    config and loaded the way users load one, so transformers' own checkpoint conversion (MoE
    experts, tied heads) applies. A compressed-tensors checkpoint (int4) is decompressed first
    by the compressed-tensors library and loaded with the plain config: transformers refuses
    ``.float()`` on a quantized model, and the library is the format's oracle."""
    import json
    import tempfile

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    config = json.loads((Path(model_dir) / "config.json").read_text())
    quantization = config.pop("quantization_config", None)
    if quantization is not None:
        state = decompressed(state, quantization)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        save_file({n: t.contiguous() for n, t in state.items()}, f"{tmp}/model.safetensors")
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16)
    return model.float().eval()


def decompressed(state: dict[str, torch.Tensor], quantization_config: dict):
    """``state`` with every pack-quantized weight (``X.weight_packed``, ``X.weight_scale``,
    ...) replaced by ``X.weight``, decompressed by compressed-tensors under the checkpoint's
    own ``quantization_config``."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    groups = QuantizationConfig.model_validate(quantization_config).config_groups
    if len(groups) != 1:
        raise ValueError(f"one config group expected (what Int4Config writes), got {list(groups)}")
    (scheme,) = groups.values()
    out, packed = {}, {}
    for name, t in state.items():
        module, _, leaf = name.rpartition(".")
        if leaf.startswith("weight_") and f"{module}.weight_packed" in state:
            packed.setdefault(module, {})[leaf] = t
        else:
            out[name] = t
    for module, parts in packed.items():
        out[f"{module}.weight"] = PackedQuantizationCompressor.decompress(parts, scheme)["weight"]
    return out


def reference_logprobs(model_dir: Path, state: dict[str, torch.Tensor], prompt: list[int]):
    """Per-token prompt logprobs of a transformers model holding `state` (fp32 compute)."""
    return model_logprobs(reference_model(model_dir, state), prompt)


def model_logprobs(model, prompt: list[int]) -> list[float]:
    """Per-token prompt logprobs of a transformers ``model``."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0]
    logp = torch.log_softmax(logits, dim=-1)
    return [logp[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)]


def join_ring(engine, ring, timeout_s: float = TIMEOUT_S) -> None:
    """``engine`` maps the shared-memory ``ring`` as its only consumer."""
    from weightsync.engines.base import ShmLink

    engine.join(ShmLink(ring=ring.spec, consumer_index=0)).wait(timeout_s)
    ring.unlink()


def assert_kernels_hold(engine, named: dict[str, torch.Tensor], int4=None, seed: int = 7):
    """The engine's kernels compute with exactly ``named``: every element read back through
    them (``verify`` level full)."""
    from weightsync.proof import Probe, checkpoint_fingerprints

    probe = Probe(seed=seed, level="full")
    group = (int4.group_size, int4.symmetric) if int4 is not None else ()
    expected = checkpoint_fingerprints(named, probe, *group)
    live = engine.live_digests(probe)
    differ = sorted(n for n, d in expected.items() if live.get(n) != d)
    assert expected and not differ, f"{len(differ)} weights differ, e.g. {differ[:3]}"


def unit_of(name: str, fused: bool = True) -> str:
    """Atomic unit of an HF tensor: with ``fused``, a layer's attention (q/k/v/o) and MLP
    (gate/up/down) each travel whole; otherwise every tensor is its own unit, so a fused vLLM
    layer can straddle two buckets."""
    return name.rsplit(".", 2)[0] if fused and ".layers." in name else name


def plan_for(named: dict[str, torch.Tensor], bucket_bytes: int, fused: bool = True):
    """Bucket plan of ``named``, each unit's tensors kept together (first-appearance order)."""
    from weightsync.plan import TensorMeta, build_plan

    units: dict[str, list[TensorMeta]] = {}
    for n, t in named.items():
        unit = unit_of(n, fused)
        units.setdefault(unit, []).append(TensorMeta(n, t.dtype, tuple(t.shape), unit))
    return build_plan([m for metas in units.values() for m in metas], bucket_bytes)


def ordered(named: dict[str, torch.Tensor], plan) -> list[tuple[str, torch.Tensor]]:
    return [(n, named[n]) for b in plan.buckets for n in b.names()]


def push(
    engine,
    sender,
    plan,
    named,
    version: str,
    mode: str = "abort",
    timeout_s=TIMEOUT_S,
    flush=True,
    paused=False,
):
    """One full update the way the driver (WeightSync) drives it; returns the wall seconds.
    ``flush``: drop the old KV in the pause (``SyncConfig.kv_cache="recompute"``);
    ``paused``: the caller paused the engine already."""
    import time

    from weightsync.transport.base import send_stream

    engine.validate(plan, named.items())
    t0 = time.perf_counter()
    if not paused:
        engine.pause(mode)
    if flush:
        assert engine.flush_cache()
    engine.begin_update()

    def on_sent(bucket, ticket):
        engine.update_bucket(bucket, ticket).wait(timeout_s)
        sender.acknowledge(ticket)

    send_stream(sender, plan, ordered(named, plan), on_sent)
    engine.end_update(version)
    engine.set_version(version)
    engine.resume()
    return time.perf_counter() - t0


def push_and_report(engine, sender, plan, named, version: str, what: str) -> None:
    """``push``, then print its wall time and the engine's own receive + load time (-s)."""
    seconds = push(engine, sender, plan, named, version)
    load_s = sum(t.get("load_s", 0) + t.get("finish_s", 0) for t in engine.timings())
    print(
        f"\n{what}: {len(plan.buckets)} buckets, {plan.total_nbytes} B, "
        f"wall {seconds:.3f} s, engine receive+load {load_s:.3f} s"
    )


def generate(url: str, prompt: list[int], max_tokens=8, api_key=None, ignore_eos=False):
    """Greedy token ids and the prompt's per-token logprobs from /inference/v1/generate."""
    import requests

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {
        "token_ids": prompt,
        "sampling_params": {
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "prompt_logprobs": 0,
            "ignore_eos": ignore_eos,
        },
    }
    r = requests.post(f"{url}/inference/v1/generate", json=body, headers=headers, timeout=TIMEOUT_S)
    r.raise_for_status()
    out = r.json()
    logprobs = [
        entry[str(tok)]["logprob"]
        for tok, entry in zip(prompt[1:], out["prompt_logprobs"][1:], strict=True)
    ]
    return out["choices"][0]["token_ids"], logprobs


def weight_checksums(url: str, api_key: str) -> dict[str, str]:
    """vLLM's own weight checker: sha256 of every parameter the engine holds after its
    post-processing, keyed ``dp0:pp0:pcp0:tp0:<param>``. On CPU a bf16 dense linear is prepacked
    into its GEMM and its parameter left empty: the checker sees it only in int4."""
    import requests

    r = requests.post(
        f"{url}/weight_checker",
        json={"action": "checksum"},
        headers={"Authorization": f"Bearer {api_key}"},  # every route is guarded
        timeout=TIMEOUT_S,
    )
    r.raise_for_status()
    return r.json()["checksums"]


def differing(got: dict[str, str], want: dict[str, str]) -> list[str]:
    """Names whose checksum differs between two checker results, or that only one holds."""
    return sorted(n for n in got.keys() | want.keys() if got.get(n) != want.get(n))


@contextmanager
def broadcast_link(engine, group_name: str, timeout_s: float = TIMEOUT_S):
    """A trainer-side BroadcastSender (rank 0) with ``engine`` joined as rank 1."""
    from weightsync.engines.base import BroadcastLink
    from weightsync.net import free_port
    from weightsync.transport.broadcast import (
        BroadcastSender,
        destroy_weight_group,
        init_weight_group,
    )

    port = free_port()
    link = BroadcastLink(
        master_address="127.0.0.1",
        master_port=port,
        world_size=2,
        rank_offset=1,
        group_name=group_name,
        backend="gloo",
    )
    # The engine joins from inside its HTTP call, which returns once both ranks are in.
    joining = engine.join(link)
    group = init_weight_group("127.0.0.1", port, 2, 0, group_name, timeout_s=timeout_s)
    joining.wait(timeout_s)
    sender = BroadcastSender(group, timeout_s=timeout_s)
    try:
        yield sender
    finally:
        sender.close()
        destroy_weight_group(group)
