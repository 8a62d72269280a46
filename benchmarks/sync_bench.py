"""The sync benchmark: full sync vs the raw transport, pause window, memory, int4 kernels.

From the repository root::

    python -m benchmarks.sync_bench --out bench_out      # 50M / 200M / 1B, bf16 + int4, vLLM run
    python -m benchmarks.sync_bench --quick --out bench_q  # < 2 minutes: one small model, no engine

Writes ``bench.json``, ``bench.md`` (README table) and ``bench.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import logging

from benchmarks.runner import BenchConfig, quick_config


def _csv(kind):
    return lambda s: tuple(kind(x) for x in s.split(",") if x)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sync_bench", description=__doc__)
    p.add_argument("--out", default="bench_out", help="output directory")
    p.add_argument("--quick", action="store_true", help="one small model, no engine (< 2 min)")
    p.add_argument(
        "--sizes", type=_csv(str), default=("50M", "200M", "1B"), help="of 5M,50M,200M,1B"
    )
    p.add_argument("--transports", type=_csv(str), default=("broadcast", "ipc"))
    p.add_argument("--bucket-mib", type=_csv(int), default=(16, 64, 256))
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each process")
    # BooleanOptionalAction, never type=bool.
    p.add_argument("--vllm", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--cuda", action="store_true", help="also the Triton int4 kernel on a GPU")
    return p


def config(args: argparse.Namespace) -> BenchConfig:
    if args.quick:
        return quick_config(args.out)
    return BenchConfig(
        out_dir=args.out,
        sizes=args.sizes,
        transports=args.transports,
        bucket_mibs=args.bucket_mib,
        repeats=args.repeats,
        threads=args.threads,
        vllm=args.vllm,
        cuda=args.cuda,
    )


def main(argv: list[str] | None = None) -> int:
    from benchmarks.report import markdown, write_all
    from benchmarks.runner import run_bench

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    report = run_bench(config(args))
    paths = write_all(report, args.out)
    print(markdown(report))
    print(f"wrote {paths['json']}, {paths['md']}, {paths['png']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
