"""Sharded vs gathered weight sync (issue 23), real megatron trainer ranks into engine ranks.

From the repository root::

    python -m benchmarks.shard_sync --size 50M,200M --trainer-tp 2 --engine-tp 2 --engines 1

One spawned job per size: the trainer ranks (megatron, bf16, random init, TP=``--trainer-tp``,
data parallel 1) and one receiving process per engine rank (``--engines`` engines of TP
``--engine-tp``). Rounds of the two paths alternate (the order flips every round), each
bracketed by barriers over every process and timed on trainer rank 0 barrier to barrier; the
medians are over ``--repeats`` rounds after one warm-up round:

- gathered: today's path. ``export_hf_weights`` on every trainer rank (TP gathers every full
  tensor onto rank 0), rank 0 sends every bucket (weightsync's broadcast transport, 64 MiB
  buckets of ``build_plan``, two in flight) to every engine rank, which keeps only its
  ``engine_box`` slice of each tensor;
- sharded: ``weightsync.shard_transfer``: every trainer rank sends its own slices of the reshard
  plan point to point, every engine rank assembles only what it serves.

After the warm-up round every engine rank checks that the two paths gave it bit-identical
slices (and exactly the bytes it serves), or the run fails. ``--int4`` packs the weights
(``Int4Config(group_size=128)``): the gathered path packs full tensors on rank 0, the sharded
path each trainer rank's own slice; a plan the group boundaries refuse is reported, not run.

Every process runs with one torch thread. On this box all ranks share 2 CPU cores: the
parallel links that the sharded path is built for do not exist here (every byte of every
process crosses the same two cores), so the time ratio measures the work each path does
(gathering, copying, bytes moved in total), not link parallelism.
"""

from __future__ import annotations

import argparse
import io
import queue
import statistics
import sys
import time
from typing import Any

import torch
import torch.multiprocessing as mp

from benchmarks.runner import SIZES
from benchmarks.shard_procs import KINDS, TIMEOUT_S, Job, derive, root_copies, run
from weightsync.config import MiB
from weightsync.net import free_port


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.shard_sync", description=__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--size", default="50M", help=f"comma-separated, of {','.join(SIZES)}")
    p.add_argument("--trainer-tp", type=int, default=2)
    p.add_argument("--engine-tp", type=int, default=2)
    p.add_argument("--engines", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds of each path")
    p.add_argument("--int4", action="store_true", help="Int4Config(group_size=128)")
    p.add_argument("--bucket-mib", type=int, default=64, help="gathered path's buckets")
    p.add_argument("--bound-mib", type=int, default=64, help="sharded path's bytes in flight")
    return p


def run_job(job: Job) -> list[dict]:
    """Every process's result, by rank (trainer ranks, then engine ranks); fails loudly on the
    first error, killing the rest."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=run, args=(r, job, results), daemon=True) for r in range(job.total)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    try:
        for _ in range(job.total):
            try:
                rank, status, value = results.get(timeout=TIMEOUT_S)
            except queue.Empty:
                hung = sorted(set(range(job.total)) - set(out))
                raise TimeoutError(f"ranks {hung} hung") from None
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            out[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return [out[r] for r in range(job.total)]


def summarize(job: Job, plan: Any, ranks: list[dict]) -> dict:
    lead, engines = ranks[0], ranks[job.world :]
    model = plan.model_bytes
    med = {k: statistics.median(lead["times"][k][1:]) for k in KINDS}

    def worst_received(kind: str) -> float:
        return max(max(r["received"][kind][1:]) / r["served"] for r in engines)

    gathered_sent = lead["gathered_bytes"] * root_copies(1 + job.receivers)
    return {
        "model_bytes": model,
        "gathered_bytes": lead["gathered_bytes"],
        "params": lead["params"],
        "buckets": lead["buckets"],
        "build_s": lead["build_s"],
        "median_s": med,
        "runs_s": {k: lead["times"][k][1:] for k in KINDS},
        "warmup_s": {k: lead["times"][k][0] for k in KINDS},
        "received_over_served": {k: worst_received(k) for k in KINDS},
        "max_sent_over_model": {
            "gathered": gathered_sent / model,
            "sharded": max(plan.sent.values()) / model,
        },
        "moves": len(plan.moves),
    }


def table(label: str, job: Job, s: dict) -> str:
    quant = "int4 (group 128)" if job.int4 else "bf16"
    head = (
        f"### {label}: trainer TP={job.trainer_tp} -> {job.engines} engine(s) x TP={job.engine_tp}"
        f", {quant}; medians of {job.repeats} interleaved rounds after 1 warm-up"
    )
    mib = s["model_bytes"] / MiB
    ratio = s["median_s"]["sharded"] / s["median_s"]["gathered"]
    rows = [
        "| path | model MiB | median s | sharded/gathered | received / served, per engine "
        "rank (max) | max sent by a trainer rank / model bytes |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    rows += [
        f"| {kind} | {mib:.1f} | {s['median_s'][kind]:.3f} | "
        f"{f'{ratio:.2f}' if kind == 'sharded' else ''} | "
        f"{s['received_over_served'][kind]:.2f} | {s['max_sent_over_model'][kind]:.2f} |"
        for kind in KINDS
    ]
    runs = "; ".join(
        f"{k} "
        + ", ".join(f"{t:.3f}" for t in s["runs_s"][k])
        + f" (warm-up {s['warmup_s'][k]:.3f})"
        for k in KINDS
    )
    notes = [
        f"runs s: {runs}",
        f"{s['params'] / 1e6:.1f}M parameters on trainer rank 0; {s['buckets']} gathered "
        f"buckets; {s['moves']} sharded moves; gathered sent = rank 0's broadcast "
        f"({root_copies(1 + job.receivers)} copies of the model in gloo's binomial tree to "
        f"{job.receivers} engine ranks; the TP gather's bytes into rank 0 not counted); sharded "
        "sent and received from the plan (the receivers check they hold exactly what they serve)",
    ]
    if s["gathered_bytes"] != s["model_bytes"]:
        why = " (its int4 weight_shape tensors, which the sharded path does not send)"
        notes.append(
            f"gathered stream {s['gathered_bytes']} B vs the plan's model {s['model_bytes']} B"
            f"{why if job.int4 else ''}"
        )
    return "\n".join([head, "", *rows, "", *notes])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)
    labels = [x for x in args.size.split(",") if x]
    unknown = [x for x in labels if x not in SIZES]
    if unknown:
        raise SystemExit(f"unknown sizes {unknown}, allowed {sorted(SIZES)}")
    refused = 0
    t_all = time.perf_counter()
    for label in labels:
        t0 = time.perf_counter()
        job = Job(
            dims=SIZES[label],
            trainer_tp=args.trainer_tp,
            engine_tp=args.engine_tp,
            engines=args.engines,
            repeats=args.repeats,
            int4=args.int4,
            bucket_bytes=args.bucket_mib * MiB,
            bound_bytes=args.bound_mib * MiB,
            ports=(free_port(), free_port(), free_port()),
        )
        try:
            plan = derive(job).plan  # the plan refuses before any process starts
        except ValueError as e:
            print(f"### {label}: the sharded plan refuses: {e}\n", flush=True)
            refused += 1
            continue
        s = summarize(job, plan, run_job(job))
        print(table(label, job, s), flush=True)
        print(f"\n{label}: {time.perf_counter() - t0:.1f} s wall (build {s['build_s']:.1f} s)\n")
    print(f"total {time.perf_counter() - t_all:.1f} s wall", flush=True)
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
