"""``weightsync bench``: full sync vs the raw transport, pause window, memory, int4 kernels.

::

    weightsync bench --out bench_out            # 50M / 200M / 1B, bf16 + int4, vLLM run
    weightsync bench --quick --out /tmp/b       # < 2 minutes: one small model, no engine

Writes ``bench.json``, ``bench.md`` (README table) and ``bench.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

__all__ = ["BenchConfig", "add_bench_parser", "main", "quick_config", "run_bench"]


def __getattr__(name: str) -> Any:
    # The CLI builds its parser from here: torch and the runner load only when a bench runs.
    if name in ("BenchConfig", "quick_config", "run_bench", "SIZES"):
        from weightsync.bench import runner

        return getattr(runner, name)
    raise AttributeError(name)


def _csv(kind):
    return lambda s: tuple(kind(x) for x in s.split(",") if x)


def add_bench_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="measure sync vs raw transport, pause window, memory, int4")
    _arguments(p)
    p.set_defaults(func=_run)
    return p


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="bench_out", help="output directory")
    p.add_argument("--quick", action="store_true", help="one small model, no engine (< 2 min)")
    p.add_argument(
        "--sizes", type=_csv(str), default=("50M", "200M", "1B"), help="of 5M,50M,200M,1B"
    )
    p.add_argument("--transports", type=_csv(str), default=("bcast", "shm"))
    p.add_argument("--bucket-mib", type=_csv(int), default=(16, 64, 256))
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each process")
    # BooleanOptionalAction, never type=bool.
    p.add_argument("--vllm", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--cuda", action="store_true", help="also the Triton int4 kernel on a GPU")


def _config(args: argparse.Namespace) -> Any:
    from weightsync.bench.runner import BenchConfig, quick_config

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


def _run(args: argparse.Namespace) -> int:
    from weightsync.bench.report import markdown, write_all
    from weightsync.bench.runner import run_bench

    report = run_bench(_config(args))
    paths = write_all(report, args.out)
    print(markdown(report))
    print(f"wrote {paths['json']}, {paths['md']}, {paths['png']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    p = argparse.ArgumentParser(prog="weightsync-bench", description=__doc__.splitlines()[0])
    _arguments(p)
    return _run(p.parse_args(argv))
