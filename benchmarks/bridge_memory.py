"""Extra memory the megatron_bridge exporter needs: about one atomic unit, not the model.

Runs a llama-shaped megatron model at TP=2 on 2 gloo ranks (CPU) and streams the export on
rank 0 while a sampler thread records the process RSS every 0.2 ms. Reports, per rank, the peak
RSS above the pre-export baseline next to the largest atomic unit and the model size.

    .venv/bin/python -m benchmarks.bridge_memory [--hidden 1024 --layers 12 --vocab 8192]

RSS is a conservative measure (the allocator may keep freed pages), so the number is an upper
bound on what the exporter holds at once; the workers run with a fixed 1 MiB mmap threshold so
large blocks go back to the OS when freed.
"""

from __future__ import annotations

import argparse
import os
import time

from benchmarks.peak import PeakRss, rss_bytes
from weightsync.config import MiB


def measure(rank: int, world: int, dims: dict) -> dict:
    """Runs on each rank: build, export once to warm up, then export again under the sampler."""
    import gc

    import torch
    from transformers import AutoConfig

    import megatron_bridge as mb

    mb.init_parallel(tp=world)
    cfg = AutoConfig.for_model("llama", **dims)
    chunks = mb.build_model(cfg)
    meta = mb.hf_weight_metadata(chunks, cfg)
    units: dict[str, int] = {}
    for m in meta:
        units[m.unit] = units.get(m.unit, 0) + m.nbytes
    for _ in mb.export_hf_weights(chunks, cfg):
        pass  # warm-up: first-touch allocations of the collectives
    gc.collect()
    baseline = rss_bytes()
    sampler = PeakRss().start()
    t0 = time.perf_counter()
    count = 0
    for _name, tensor in mb.export_hf_weights(chunks, cfg):
        count += tensor.numel() > 0
        del tensor  # a consumer copies each tensor into its bucket and lets go
    seconds = time.perf_counter() - t0
    peak = sampler.stop()
    return {
        "rank": rank,
        "tensors": count,
        "export_s": seconds,
        "extra_peak_bytes": peak - baseline,
        "largest_unit_bytes": max(units.values()),
        "model_bytes": sum(units.values()),
        "local_param_bytes": sum(p.numel() * p.element_size() for p in chunks[0].parameters()),
        "dtype": str(torch.float32),
    }


def run(dims: dict, world: int = 2) -> list[dict]:
    from tests.bridge_helpers import run_ranks

    # A fixed mmap threshold: blocks >= 1 MiB are mmapped and unmapped on free, so RSS follows
    # live memory (glibc's dynamic threshold would otherwise retain freed blocks in its heap).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(MiB))
    return run_ranks(measure, world, dims, timeout=600)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=8192)
    args = ap.parse_args()
    dims = dict(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    for r in run(dims):
        print(
            f"rank {r['rank']}: exported model {r['model_bytes'] / MiB:.0f} MiB "
            f"(local shard {r['local_param_bytes'] / MiB:.0f} MiB) in {r['export_s']:.2f} s; "
            f"extra peak RSS {r['extra_peak_bytes'] / MiB:.1f} MiB; "
            f"largest unit {r['largest_unit_bytes'] / MiB:.1f} MiB"
        )


if __name__ == "__main__":
    main()
