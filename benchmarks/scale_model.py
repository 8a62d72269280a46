"""Scale model of a weight sync: sharded (many-to-many) vs gathered (today), from real plans.

    .venv/bin/python -m benchmarks.scale_model [--bw-gbs 50] [--latency-us 5] [--engines-planned 0]
    .venv/bin/python -m benchmarks.scale_model --calibrate    # + measured here (~40 s more)

Each case plans a named HF config (configs only, no weights) on a trainer layout
(``plan_holdings``) and engines (``plan_reshard``), and reads the loads off the plan:
- sharded: every trainer rank sends its moves, every engine rank receives exactly what it
  serves; the busiest sender's and receiver's bytes, and the most messages on one rank;
- gathered: one source rank (trainer rank 0) receives every slice it does not hold (bf16: int4
  is quantized after the gather) while it broadcasts the model (wire bytes) to every engine rank.
Time model, one formula for both paths, on a cluster and on this host:
    t = max(busiest rank's max(bytes in, bytes out) / bw, all bytes / host_bw)
        + fill / bw + messages on the busiest rank x per-message cost
bw is one rank's full-duplex link; host_bw the bytes all ranks move together: infinite on a
cluster (every GPU has its own NIC), measured here, where every process shares two cores and
one memory bus. ``fill``: the gathered path's first bucket cannot be broadcast before its
gathered pieces are in. The gathered broadcast is a pipelined ring on a cluster (NCCL: every
link carries the model once) and gloo's root sending each receiver here. The pause is not
modelled apart: without staging, the engines are paused for the whole transfer.

By default every engine is planned (the four cases in ~35 s and 1.5 GB here); ``--engines-planned
N`` plans N and scales the trainer side by engines / N: what each engine rank receives stays
exact, the senders' bytes become an upper bound (the N-engine assignment repeated).
``recv floor``: the busiest engine rank's own bytes over its link, which no plan beats.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from benchmarks.report import print_table

GB = 1e9
TARGET_S = 2.0
PUBLISHED = (
    "published (issue 23): checkpoint-engine Kimi-K2 1T in 16 s on 256 H20; Perplexity "
    "P2P RDMA 1T in 1.3 s; vLLM sharded transfer 235B in 3.2 s"
)
K2_INT4_IGNORE = (r"re:.*self_attn.*", r"re:.*shared_experts.*", r"re:.*mlp\.(gate|up|down)_proj$")
"""Kimi-K2-Thinking's int4 checkpoint quantizes the routed experts only (W4A16, group 32)."""


CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "kimi-k2": ("DeepseekV3Config", dict(
        vocab_size=163840, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=64, num_key_value_heads=64,
        n_shared_experts=1, n_routed_experts=384, num_experts_per_tok=8, first_k_dense_replace=1,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, tie_word_embeddings=False,
    )),
    "qwen3-235b": ("Qwen3MoeConfig", dict(
        vocab_size=151936, hidden_size=4096, num_hidden_layers=94, num_attention_heads=64,
        num_key_value_heads=4, head_dim=128, num_experts=128, moe_intermediate_size=1536,
        num_experts_per_tok=8, tie_word_embeddings=False,
    )),
    "llama3-70b": ("LlamaConfig", dict(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False,
    )),
    # ~157 MB bf16: what this host moves in a few tens of milliseconds.
    "calib": ("LlamaConfig", dict(
        vocab_size=16384, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
        num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False,
    )),
}  # fmt: skip
"""HF config class (transformers) and fields of each named model: configs only, no weights."""


def hf_config(name: str) -> Any:
    import transformers

    cls, fields = CONFIGS[name]
    return getattr(transformers, cls)(**fields)


LAST = "num_layers_in_last_pipeline_stage"


@dataclass(frozen=True)
class Case:
    model: str
    trainer: tuple[int, int, int, int, int]
    """world, tp, pp, ep, etp."""
    engines: int
    engine_tp: int
    expert_parallel: bool = False
    int4: bool = False
    pp_split: dict[str, int] = field(default_factory=dict)

    @property
    def label(self) -> str:
        w, tp, pp, ep, etp = self.trainer
        return f"{w} (TP{tp} PP{pp} EP{ep} ETP{etp})"


# Real runs' layouts (slime's scripts/run-kimi-k2-Thinking.sh: 32 nodes, TP 8, PP 8 with 5 layers
# last, CP 4, EP 32, ETP 1; scripts/run-qwen3-235B-A22B.sh: 8 nodes, TP 4, PP 4 with 22 last,
# CP 2, EP 16). Context-parallel ranks hold the same weights as data-parallel ones, so CP is
# folded into DP here (the holdings take no CP). The Llama layout is illustrative.
CASES = (
    Case("kimi-k2", (256, 8, 8, 32, 1), 32, 8, True, False, {LAST: 5}),
    Case("kimi-k2", (256, 8, 8, 32, 1), 32, 8, True, True, {LAST: 5}),
    Case("qwen3-235b", (64, 4, 4, 16, 1), 8, 8, True, False, {LAST: 22}),
    Case("llama3-70b", (32, 8, 2, 1, 1), 8, 8),
)
CALIB = Case("calib", (2, 1, 2, 1, 1), 1, 2)
"""Here: 2 trainer ranks (one per pipeline stage, each sending to both workers) -> 1 engine TP 2."""


@dataclass(frozen=True)
class Links:
    """Bytes/s of one rank's link, seconds per message, bytes/s of all ranks together, and
    whether the gathered broadcast is a pipelined ring (NCCL) or the root sending each one."""

    bw: float
    latency: float
    host_bw: float = math.inf
    ring: bool = True


@dataclass(frozen=True)
class Transfer:
    ranks: tuple[tuple[float, float], ...]
    """(bytes in, bytes out) of the ranks that can be the busiest."""
    total: float
    messages: int
    fill: float = 0.0


def predict(t: Transfer, links: Links) -> float:
    busiest = max(max(i, o) for i, o in t.ranks)
    moved = max(busiest / links.bw, t.total / links.host_bw)
    return moved + t.fill / links.bw + t.messages * links.latency


@dataclass(frozen=True)
class Planned:
    case: Case
    holdings: list
    itemsize: dict[str, int]
    plan: Any
    scale: int
    """Engines the plan stands for per engine planned (1: every engine planned)."""


def plan_case(case: Case, most: int) -> Planned:
    """Plan ``case`` with at most ``most`` engines (0: all), a divisor of its engine count."""
    from megatron_bridge.holdings import ParallelSizes, plan_holdings
    from megatron_bridge.model import padded_vocab_size
    from weightsync.engine_shards import EngineLayout, ModelShape
    from weightsync.quant import Int4Config
    from weightsync.quant.config import DEFAULT_IGNORE
    from weightsync.reshard import plan_reshard

    cfg = hf_config(case.model)
    w, tp, pp, ep, etp = case.trainer
    sizes = ParallelSizes(w, tp, pp, ep, etp, padded_vocab_size(cfg.vocab_size, 128, tp))
    holdings = plan_holdings(cfg, sizes, **case.pp_split)
    itemsize = {h.name: 2 for h in holdings}  # bf16 export
    shape = ModelShape.of(cfg)
    int4 = Int4Config(group_size=32, ignore=DEFAULT_IGNORE + K2_INT4_IGNORE) if case.int4 else None
    planned = math.gcd(case.engines, most) if most else case.engines
    layouts = [EngineLayout(case.engine_tp, case.expert_parallel)] * planned
    plan = plan_reshard(holdings, itemsize, layouts, shape, int4)
    return Planned(case, holdings, itemsize, plan, case.engines // planned)


def sharded(p: Planned) -> Transfer:
    sends = Counter(m.src for m in p.plan.moves)
    recvs = Counter((m.engine, m.worker) for m in p.plan.moves)
    sent = max(p.plan.sent.values()) * p.scale
    received = max(p.plan.received.values())
    messages = max(max(sends.values()) * p.scale, max(recvs.values()))
    return Transfer(((0, sent), (received, 0)), sum(p.plan.received.values()) * p.scale, messages)


def gather_pieces(p: Planned) -> list[tuple[int, int]]:
    """Today's path: (holder, bf16 bytes) of every slice, 0 where the source rank holds it."""
    from megatron_bridge.meta import box_numel

    return [
        (0 if 0 in h.ranks else h.ranks[0], box_numel(h.box) * p.itemsize[h.name])
        for h in p.holdings
    ]


def gathered(p: Planned, links: Links, bucket: int) -> Transfer:
    from benchmarks.plan_run import buckets

    pieces = gather_pieces(p)
    gather_in = sum(n for src, n in pieces if src)
    model, receivers = p.plan.model_bytes, p.case.engines * p.case.engine_tp
    fanout = 1 if links.ring else receivers
    source = (gather_in, model * fanout)
    engine_rank = (model, model if links.ring else 0)
    messages = sum(1 for src, _ in pieces if src) + math.ceil(model / bucket) * fanout
    total = gather_in + model * receivers
    first, end = buckets(pieces, bucket)[0]
    fill = sum(n for src, n in pieces[first:end] if src)
    return Transfer((source, engine_rank), total, messages, fill)


def report(plans: list[Planned], links: Links, bucket: int) -> None:
    header = ["model", "dtype", "trainer GPUs", "engines", "model GB", "max recv/served",
              "gathered recv/served", "max sent/fair", "msgs/rank", "recv floor s", "sharded s",
              "gathered s", f"GB/s for {TARGET_S:g} s"]  # fmt: skip
    rows = []
    for p in plans:
        c, s = p.case, sharded(p)
        ratio = max(p.plan.received[k] / v for k, v in p.plan.served.items())
        fair = p.plan.model_bytes * c.engines / c.trainer[0]
        busiest = max(max(i, o) for i, o in s.ranks)
        need = busiest / max(TARGET_S - s.messages * links.latency, 1e-9) / GB
        rows.append([
            c.model, "int4 (experts, g32)" if c.int4 else "bf16", c.label,
            f"{c.engines} x TP{c.engine_tp}{' EP' if c.expert_parallel else ''}",
            f"{p.plan.model_bytes / GB:.1f}", f"{ratio:.3f}",
            f"{p.plan.model_bytes / min(p.plan.served.values()):.2f}",
            f"{s.ranks[0][1] / fair:.3f}",
            f"{s.messages}", f"{s.ranks[1][0] / links.bw:.2f}", f"{predict(s, links):.2f}",
            f"{predict(gathered(p, links, bucket), links):.1f}", f"{need:.0f}",
        ])  # fmt: skip
    print_table(header, rows)


def calibrate(repeats: int, bucket: int) -> None:
    from benchmarks import plan_run

    p = plan_case(CALIB, 0)
    trainers = CALIB.trainer[0]
    moves = tuple((m.src, trainers + m.worker, m.nbytes) for m in p.plan.moves)
    sizes = (4 << 10, 1 << 20, 16 << 20, 64 << 20)
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        job = plan_run.Job(
            trainers, CALIB.engine_tp, moves, tuple(gather_pieces(p)), bucket, sizes, repeats,
            out.name,
        )  # fmt: skip
        m = plan_run.run(job)
    print(
        f"\n### Measured here (gloo over loopback, {job.world} processes, medians of {repeats})\n"
    )
    print_table(
        ["ping-pong bytes", "round trip ms", "GB/s"],
        [[k, f"{t * 1e3:.3f}", f"{int(k) / t / GB:.2f}"] for k, t in m["p2p"].items()],
    )
    med = m["medians"]
    less = {k: v - med["null"] for k, v in med.items()}  # the round's barriers taken off
    pairs = job.world // 2
    links = Links(
        bw=plan_run.LINK_BYTES / less["link"],
        latency=max(less["burst"], 0.0) / plan_run.BURST[0],
        host_bw=pairs * plan_run.LINK_BYTES / less["host"],
        ring=False,
    )
    print(
        f"\nconstants (in the rounds): link bw {links.bw / GB:.2f} GB/s (64 MiB, one pair), "
        f"host bw {links.host_bw / GB:.2f} GB/s ({pairs} pairs at once), per message "
        f"{links.latency * 1e6:.0f} us ({plan_run.BURST[0]} x 4 KiB at once), "
        f"one-way latency {m['p2p']['4096'] / 2 * 1e6:.0f} us, "
        f"barriers {med['null'] * 1e3:.2f} ms\n"
    )
    rows = []
    for mode, t in (("sharded", sharded(p)), ("gathered", gathered(p, links, bucket))):
        pred, got = predict(t, links), less[mode]
        rows.append([
            mode, f"{t.total / GB:.3f}", f"{max(max(i, o) for i, o in t.ranks) / GB:.3f}",
            f"{t.messages}", f"{pred * 1e3:.1f}", f"{got * 1e3:.1f}",
            f"{(pred - got) / got * 100:+.0f}%",
            " ".join(f"{(x - med['null']) * 1e3:.1f}" for x in m["runs"][mode]),
        ])  # fmt: skip
    header = ["path", "GB moved", "busiest rank GB", "msgs", "predicted ms", "measured ms",
              "error", "runs ms"]  # fmt: skip
    print_table(header, rows)
    print(f"\n(model {p.plan.model_bytes / GB:.3f} GB bf16: {CALIB.label} -> 1 engine TP 2)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bw-gbs", type=float, default=50.0, help="per GPU link, GB/s")
    ap.add_argument("--latency-us", type=float, default=5.0, help="per message")
    ap.add_argument("--bucket-mib", type=int, default=64, help="gathered pipeline bucket")
    ap.add_argument("--engines-planned", type=int, default=0, help="0: every engine")
    ap.add_argument("--calibrate", action="store_true", help="measure here and compare")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    links = Links(args.bw_gbs * GB, args.latency_us * 1e-6)
    bucket = args.bucket_mib << 20
    start = time.perf_counter()
    plans = []
    for case in CASES:
        try:
            plans.append(plan_case(case, args.engines_planned))
        except (ValueError, NotImplementedError) as e:
            print(f"{case.model}: skipped, cannot plan: {e}")
    most = args.engines_planned
    note = f"{most} engines planned, senders scaled" if most else "every engine planned"
    print(f"### Predicted sync, {args.bw_gbs:g} GB/s per GPU, {args.latency_us:g} us/message "
          f"({note})\n")  # fmt: skip
    report(plans, links, bucket)
    print(f"\n{PUBLISHED}; goal <= {TARGET_S:g} s for the 1T")
    print(f"(planned in {time.perf_counter() - start:.1f} s)")
    if args.calibrate:
        calibrate(args.repeats, bucket)


if __name__ == "__main__":
    main()
