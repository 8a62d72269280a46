"""TEST FIXTURE: the protocol server's runtime LoRA (SGLang 0.5.23's ``/load_lora_adapter``,
``/load_lora_adapter_from_tensors`` and ``/unload_lora_adapter``).

The checks and their messages are SGLang's, in its order: the tokenizer manager's (LoRA
enabled, name registered for unload), then the LoRA manager's (``LoRAConfig`` reads
``adapter_config.json``, ``validate_new_adapter``: DoRA, name already loaded, rank and target
modules against the memory pool), then the weights (``*.safetensors`` in the directory). Answers
are SGLang's own ``LoRAUpdateOutput``. Unlike SGLang, the server process itself loads the
adapter (its TP ranks do not see it), and it also checks every tensor's shape against the base
checkpoint, which SGLang finds out only when it copies them into its buffers. From tensors, each
TP rank's payload is opened on its own with SGLang's deserializer and held to the request's
``expected_checksums`` as SGLang's TP worker does (its message); the copies must agree.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from dataclasses import dataclass

import torch

# Qwen2's linear projections: what SGLang's --lora-target-modules all resolves to there.
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraServing:
    """The server launched with ``--enable-lora --max-lora-rank --lora-target-modules``."""

    max_lora_rank: int = 8
    target_modules: tuple[str, ...] = ALL_LINEAR


def _normalized(modules) -> set[str]:
    from sglang.srt.lora.utils import get_normalized_target_modules

    return get_normalized_target_modules(modules)


def _base_shape(base: dict[str, tuple], name: str) -> tuple | None:
    """``...q_proj.lora_A.weight`` (PEFT) -> the shape of ``...q_proj.weight`` it adapts."""
    module, _, suffix = name.removeprefix(_PEFT_PREFIX).rpartition(".lora_")
    return base.get(module + ".weight") if suffix in ("A.weight", "B.weight") else None


def _check_shapes(tensors: dict[str, torch.Tensor], base: dict[str, tuple], r: int) -> None:
    for name, tensor in tensors.items():
        shape = _base_shape(base, name)
        if shape is None:
            raise ValueError(f"fixture: {name} adapts no linear weight of the base model")
        out_dim, in_dim = shape
        want = (r, in_dim) if ".lora_A." in name else (out_dim, r)
        if tuple(tensor.shape) != want:
            raise ValueError(f"fixture: {name} has shape {tuple(tensor.shape)}, expected {want}")


def _sglang_sha256(t: torch.Tensor) -> str:
    """The hash SGLang's TP worker takes (its own expression, not weightsync's helper)."""
    raw = t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(raw).hexdigest()


def _check_sums(rank: int, tensors: dict[str, torch.Tensor], expected: dict | None) -> None:
    """SGLang's TP worker: each tensor's sha256 against ``expected_checksums``, if sent."""
    if expected is None:
        return
    mismatch = [
        n for n, want in expected.items() if n in tensors and _sglang_sha256(tensors[n]) != want
    ]
    missing = [n for n in expected if n not in tensors]
    extra = [n for n in tensors if n not in expected]
    if mismatch or missing or extra:
        raise RuntimeError(
            f"[LORA-CHECK] rank{rank} adapter sync MISMATCH of {len(expected)} expected: "
            f"{len(mismatch)} value-diff {mismatch[:5]}, {len(missing)} missing {missing[:5]}, "
            f"{len(extra)} extra {extra[:5]}"
        )


class LoraAdapters:
    """Loaded adapters by name (path and tensors), as SGLang's registry and LoRA manager."""

    def __init__(self, io, serving: LoraServing | None, checkpoint: str) -> None:
        from safetensors import safe_open

        self.io, self.launched = io, serving
        with safe_open(checkpoint, "pt") as f:  # the base shapes adapters must fit
            names = f.keys()  # a safe_open handle is not iterable
            self.base = {n: tuple(f.get_slice(n).get_shape()) for n in names}
        self.reset()

    def reset(self) -> None:
        self.serving = self.launched
        self.refuse = False  # test fault: every rank fails the next loads
        self.loaded: dict[str, tuple[str, dict[str, torch.Tensor]]] = {}

    def set(self, key: str, value) -> None:
        """Test faults: ``refuse_lora`` every load; as if launched with ``max_lora_rank``, or
        without ``enable_lora``."""
        if key == "refuse_lora":
            self.refuse = bool(value)
        elif key == "enable_lora":
            self.serving = self.launched if value else None
        else:
            self.serving = dataclasses.replace(self.launched, max_lora_rank=value)

    def paths(self) -> dict[str, str]:
        return {name: path for name, (path, _) in self.loaded.items()}

    def _answer(self, error: str | None = None, listed: bool = True):
        """SGLang's reply: the adapters loaded after the call, except on the tokenizer
        manager's own refusals, which never reach the ranks."""
        return self.io.LoRAUpdateOutput(
            success=error is None,
            error_message=error or "",
            loaded_adapters=self.paths() if listed else None,
        )

    def _not_enabled(self):
        if self.serving is None:
            error = "LoRA is not enabled. Please set `--enable-lora` to enable LoRA."
            return self._answer(error, listed=False)
        return None

    def load(self, req):
        if (refused := self._not_enabled()) is not None:
            return refused
        try:
            self.loaded[req.lora_name] = (req.lora_path, self._read(req.lora_name, req.lora_path))
        except Exception as e:  # noqa: BLE001 - SGLang's ranks report any failure this way
            return self._answer(str(e))
        return self._answer()

    def load_tensors(self, req, opened: list[list[tuple[str, torch.Tensor]]]):
        """``/load_lora_adapter_from_tensors``: ``opened`` is every TP rank's own payload."""
        if (refused := self._not_enabled()) is not None:
            return refused
        try:
            self._check_config(req.lora_name, req.config_dict)
            per_rank = [dict(named) for named in opened]
            for rank, tensors in enumerate(per_rank):
                _check_sums(rank, tensors, req.expected_checksums)
            tensors = per_rank[0]
            if any(set(t) != set(tensors) for t in per_rank) or not all(
                torch.equal(t[n], tensors[n]) for t in per_rank for n in tensors
            ):
                raise RuntimeError("fixture: the TP ranks' copies of the adapter differ")
            _check_shapes(tensors, self.base, req.config_dict["r"])
            self.loaded[req.lora_name] = ("__tensor__", tensors)
        except Exception as e:  # noqa: BLE001 - SGLang's ranks report any failure this way
            return self._answer(str(e))
        return self._answer()

    def unload(self, req):
        if (refused := self._not_enabled()) is not None:
            return refused
        if req.lora_name not in self.loaded:
            error = f"LoRA with name {req.lora_name} does not exist. Loaded LoRAs: "
            return self._answer(error + str(self.loaded.keys()), listed=False)
        del self.loaded[req.lora_name]
        return self._answer()

    def _read(self, name: str, path: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        with open(os.path.join(path, "adapter_config.json")) as f:  # LoRAConfig
            config = json.load(f)
        self._check_config(name, config)
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise RuntimeError(f"Cannot find any model weights with `{path}`")
        tensors = {n: t for f in files for n, t in load_file(f).items()}
        _check_shapes(tensors, self.base, config["r"])
        return tensors

    def _check_config(self, name: str, config: dict) -> None:
        """SGLang's LoRAConfig and ``validate_new_adapter`` checks, in its order."""
        targets, r = config["target_modules"], config["r"]
        if config.get("use_dora", False):
            raise ValueError(
                f"Failed to load {name} because LoRA serving currently doesn't support DoRA "
                "adapters"
            )
        if name in self.loaded:
            raise ValueError(f"Failed to load LoRA adapter {name} because it is already loaded")
        wanted = _normalized(targets)
        fits = "all" in wanted or wanted <= _normalized(list(self.serving.target_modules))
        if r > self.serving.max_lora_rank or not fits:
            raise ValueError(
                f"LoRA adapter {name} with rank {r} is incompatible with the current LoRA memory "
                "pool configuration. Please ensure that the LoRA adapter's rank is within the "
                "configured `--max-lora-rank` and that the target modules are included in "
                "`--lora-target-modules`."
            )
        if self.refuse:
            raise RuntimeError("refused to load (test fault)")
