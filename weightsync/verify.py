"""What the driver checks on each engine after its update session ends, before it is stamped
with the version (``WeightSync.update``), and again on demand (``WeightSync.verify``).

- ``check_complete``, whatever ``SyncConfig.verify`` says: every rank handed every tensor the
  plan sent, whole, to the model's ``load_weights``, and no layer of the model was left short
  of its weights (vLLM's own layerwise-reload count of the elements each layer took). Free:
  the engine counted while it loaded.
- ``check_proof``: the weights the engine's kernels compute with, read back and fingerprinted
  (``weightsync.proof``), equal what the trainer sent, aliases included.

Each raises ``RuntimeError`` naming the parameters; the driver names the engine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from weightsync.engines.base import ControlPlane
from weightsync.proof import Probe, source_of


def check_complete(
    engine: ControlPlane, sent: dict[str, int], ranks: list[dict] | None = None
) -> bool:
    """RuntimeError unless every rank of ``engine`` loaded all of ``sent`` (``{tensor
    name: elements}``) and left no layer unloaded. False where the engine cannot tell.
    ``ranks``: its session report, when the apply already answered it."""
    ranks = engine.session_report() if ranks is None else ranks
    if ranks is None:
        return False
    for rank, report in enumerate(ranks):
        if "error" in report:
            raise RuntimeError(f"rank {rank} could not say what it loaded: {report['error']}")
        got = report["received"]
        missing = sorted(n for n, numel in sent.items() if got.get(n) != numel)
        if missing:
            raise RuntimeError(
                f"rank {rank} did not load {len(missing)} of the {len(sent)} tensors sent "
                f"(completeness), e.g. {missing[:3]}"
            )
        if report["unloaded"]:
            raise RuntimeError(
                f"rank {rank} left {len(report['unloaded'])} layers without their new "
                f"weights (completeness), e.g. {report['unloaded'][:3]}"
            )
    return True


def check_proof(
    engine: ControlPlane, probe: Probe, sent: dict[str, str], live: dict[str, str] | None = None
) -> None:
    """The engine's kernels compute with exactly the weights whose fingerprints are
    ``sent``: every weight, aliases included, at ``probe.level``. ``live``: its
    fingerprints at ``probe``, when the apply already answered them."""
    live = engine.live_digests(probe) if live is None else live
    # A derived copy (MLA's decode copies) must hold exactly the weight it was derived from.
    derived = {n: sent[source_of(n)] for n in live if source_of(n) != n and source_of(n) in sent}
    bad = sorted(n for n, d in {**sent, **derived}.items() if live.get(n) != d)
    if bad:
        missing = [n for n in bad if n not in live]
        absent = f"; not found in the engine: {missing[:3]}" if missing else ""
        why = [live[n] for n in bad if live.get(n, "").startswith("mismatch")]
        raise RuntimeError(
            f"{len(bad)} weights the engine computes with differ from the trainer's "
            f"(verify {probe.level}), e.g. {bad[:3]}{absent}" + (f" ({why[0]})" if why else "")
        )


def check_adapter(engine: ControlPlane, served: str, sent: dict[str, str], seed: int) -> None:
    """The engine's LoRA kernels compute with exactly the adapter that was written: every
    A and B, read from the slot a request for ``served`` uses, and nothing else in it."""
    live = engine.adapter_digests(served, seed)
    bad = sorted(n for n, d in sent.items() if live.get(n) != d)
    extra = sorted(set(live) - set(sent))
    if bad or extra:
        name = (bad + extra)[0]
        first, want = live.get(name, "not read back"), sent.get(name, "nothing")
        why = first if first.startswith(("mismatch", "not")) else "other values"
        if why == "other values" and first.partition(":")[0] != want.partition(":")[0]:
            why = f"the engine holds {first.partition(':')[0]}, the trainer sent "
            why += want.partition(":")[0]  # e.g. vLLM serving with another --lora-dtype
        raise RuntimeError(
            f"{len(bad) + len(extra)} LoRA tensors the engine computes with differ from the "
            f"trainer's (verify), e.g. {(bad + extra)[:3]} ({why})"
        )


@dataclass
class Proof:
    """What the last verified update proved: re-checked by ``WeightSync.verify``."""

    version: int
    probe: Probe
    digests: dict[str, str]


@dataclass
class VerifyReport:
    """``WeightSync.verify``: which engines still hold the last version sent."""

    version: int | None
    level: str
    ok: bool
    """Every engine that can be verified holds it (``failed`` empty)."""
    verified: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    """Engine -> why (parameters named); each is held (or stale) until the next update."""
    unverified: list[str] = field(default_factory=list)
    """Engines that cannot read their weights back (SGLang): never counted as verified."""

    def as_dict(self) -> dict:
        return asdict(self)
