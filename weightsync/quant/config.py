"""Which tensors are int4, and how: read from (and written to) a HF ``quantization_config``.

The checkpoint's compressed-tensors config is the single source of truth for the packer on
the rollout side and for fake-quant on the training side, so the two cannot drift (peers set
the QAT group size from an environment variable and the packer's from the checkpoint).
Anything this module does not implement exactly is refused, never passed through as bf16.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# Not Linear layers, or Linear layers engines keep in high precision.
DEFAULT_IGNORE: tuple[str, ...] = (
    "lm_head",
    "re:.*embed.*",
    "re:.*norm.*",
    r"re:.*mlp\.gate$",
    r"re:.*shared_expert_gate$",
    "re:.*visual.*",
    "re:.*vision.*",
)


@dataclass(frozen=True, kw_only=True, slots=True)
class Int4Config:
    """W4A16 weight-only int4 in the compressed-tensors pack-quantized format."""

    group_size: int = 128
    """Input elements per scale; -1 means one scale per output channel."""
    symmetric: bool = True
    targets: tuple[str, ...] = ("Linear",)
    """Module names ("re:" regexes allowed) or the class name "Linear"."""
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    """Module names or "re:" regexes (re.match on the module name) left unquantized."""

    def __post_init__(self) -> None:
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(
                f"group_size={self.group_size} is invalid: -1 (per channel) "
                "or a positive number of input elements"
            )
        for pattern in (*self.targets, *self.ignore):
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as e:
                    raise ValueError(f"bad regex {pattern!r} in targets/ignore: {e}") from e

    @property
    def strategy(self) -> str:
        return "channel" if self.group_size == -1 else "group"

    def is_quantized(self, name: str, shape: Sequence[int] | None = None) -> bool:
        """Whether the HF tensor ``name`` (e.g. ``model.layers.0.mlp.up_proj.weight``) is int4."""
        module, _, param = name.rpartition(".")
        if param != "weight" or (shape is not None and len(shape) not in (2, 3)):
            return False
        if any(_match(module, pattern) for pattern in self.ignore):
            return False
        return any(_targets(module, t) for t in self.targets)

    @classmethod
    def from_quantization_config(cls, qc: Mapping) -> Int4Config:
        """Parse a compressed-tensors ``quantization_config``; ValueError on anything else."""
        return _parse(qc)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> Int4Config:
        config = json.loads((Path(model_dir) / "config.json").read_text())
        if "quantization_config" not in config:
            raise ValueError(f"{model_dir}/config.json has no quantization_config")
        return _parse(config["quantization_config"])

    def to_quantization_config(self) -> dict:
        """The compressed-tensors ``quantization_config`` that vLLM, SGLang and HF load."""
        weights = {
            "num_bits": 4,
            "type": "int",
            "symmetric": self.symmetric,
            "strategy": self.strategy,
            "group_size": None if self.group_size == -1 else self.group_size,
            "dynamic": False,
            "actorder": None,
            "observer": "minmax",
        }
        group = {
            "targets": list(self.targets),
            "weights": weights,
            "input_activations": None,
            "output_activations": None,
            "format": "pack-quantized",
        }
        return {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": {"group_0": group},
            "ignore": list(self.ignore),
            "kv_cache_scheme": None,
            "sparsity_config": {},
        }


def _match(module: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], module) is not None
    return module == pattern


def _targets(module: str, target: str) -> bool:
    # From names alone "Linear" cannot be told apart from nn.Embedding, whose weight is also
    # 2-D: embeddings are excluded by name, as compressed-tensors' tensor matcher does norms.
    if target == "Linear":
        return "embed" not in module.rpartition(".")[2]
    return _match(module, target)


def _parse(qc: Mapping) -> Int4Config:
    def fail(field: str, value: object, allowed: str) -> ValueError:
        return ValueError(f"quantization_config.{field}={value!r} is not supported: {allowed}")

    if qc.get("quant_method") != "compressed-tensors":
        raise fail("quant_method", qc.get("quant_method"), "only 'compressed-tensors'")
    groups = qc.get("config_groups") or {}
    if not groups:
        raise fail("config_groups", groups, "at least one group with int4 weights")
    schemes, targets = set(), []
    for gname, group in groups.items():
        where = f"config_groups.{gname}"
        fmt = group.get("format") or qc.get("format")
        if fmt != "pack-quantized":
            raise fail(f"{where}.format", fmt, "only 'pack-quantized'")
        if group.get("input_activations") or group.get("output_activations"):
            raise fail(
                f"{where}.input_activations",
                group.get("input_activations"),
                "only weight-only (W4A16) schemes",
            )
        schemes.add(_weights_scheme(group.get("weights") or {}, f"{where}.weights", fail))
        targets += list(group.get("targets") or [])
    if len(schemes) != 1:
        raise fail("config_groups", sorted(groups), "one weight scheme shared by all groups")
    group_size, symmetric = schemes.pop()
    return Int4Config(
        group_size=group_size,
        symmetric=symmetric,
        targets=tuple(dict.fromkeys(targets)) or ("Linear",),
        ignore=tuple(qc.get("ignore") or ()),
    )


def _weights_scheme(w: Mapping, where: str, fail) -> tuple[int, bool]:
    checks = (("num_bits", 4), ("type", "int"), ("dynamic", False))
    for key, want in checks:
        if w.get(key, want) != want:
            raise fail(f"{where}.{key}", w.get(key), f"only {want!r}")
    if w.get("actorder") not in (None, "static"):
        raise fail(f"{where}.actorder", w.get("actorder"), "None (no activation reordering)")
    strategy = w.get("strategy")
    if strategy == "channel":
        return -1, bool(w.get("symmetric", True))
    if strategy != "group":
        raise fail(f"{where}.strategy", strategy, "'group' or 'channel'")
    group_size = w.get("group_size")
    if not isinstance(group_size, int) or group_size <= 0:
        raise fail(f"{where}.group_size", group_size, "a positive int for strategy 'group'")
    return group_size, bool(w.get("symmetric", True))
