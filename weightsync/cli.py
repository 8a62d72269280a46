"""``weightsync`` command line: one subcommand per job, each a thin shell over the library."""

from __future__ import annotations

import argparse
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weightsync", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_convert(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"weightsync {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
