"""``WeightSync.update_adapter``: a LoRA adapter published to every live engine, the base
weights untouched and nothing paused (``weightsync.lora`` writes and loads it).

The driver's half of adapter sync, apart from the full update's: ``WeightSync`` inherits it
and provides what it uses (the engines and their fan-out calls, the trainer job, the lease
lock, the config).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Sequence

from weightsync.config import SyncConfig
from weightsync.engines.base import ControlPlane
from weightsync.engines.spec import EngineSpec
from weightsync.inflight import BackgroundSlot
from weightsync.lease import Lease
from weightsync.stats import AdapterStats, UpdateFailed
from weightsync.verify import check_adapter
from weightsync.worker import TrainerSync

log = logging.getLogger("weightsync")


class AdapterPublisher:
    """Adapter-only sync; the attributes below are ``WeightSync``'s."""

    config: SyncConfig
    engines: dict[str, ControlPlane]
    adapter: str | None
    _adapters: list[str]
    _model: dict | None
    _in_flight: BackgroundSlot
    _drain_s: float
    live_engines: list[EngineSpec]
    # And its methods _run (on every trainer rank), _settle (on engines at once, each one's
    # error), _hold_lease, _install and _check_models.

    def update_adapter(self, version: int) -> AdapterStats:
        """Publish the trainer's LoRA adapter (``SyncConfig.lora``, ``weightsync.lora``) as
        ``<name>@v<version>`` on every live engine; nothing is paused, the base weights are
        not sent. Rollouts then ask for ``self.adapter``. If an engine cannot load it, no
        engine switches: UpdateFailed, and ``adapter`` still names the previous version,
        which every engine still holds."""
        lora = self.config.lora
        if lora is None:
            raise ValueError("SyncConfig.lora is not set: adapter-only sync is off")
        self._in_flight.settle(self.config.in_flight, self._drain_s, "update_adapter")
        if type(version) is not int:
            raise ValueError(f"version={version!r}: an int")
        served = lora.served_name(version)
        if served in self._adapters:  # its directory may be read again: never rewritten
            raise ValueError(f"adapter {served} is already published: use a new version")
        with self._hold_lease() as lease:
            t0 = time.perf_counter()
            live = [s.label for s in self.live_engines]
            if not live:
                raise UpdateFailed(f"adapter {served}: no live engine (all stale)", [])
            if self._model is None:  # adapters need the trainer-side state, no transport
                self._install()
            self._check_models()
            seed = secrets.randbits(31) if self.config.verify != "off" else None
            try:
                out, t1, t2, t3 = self._publish(served, version, live, seed, lease)
            except BaseException as error:
                # Refused on the trainer (a bad adapter or root) before any engine was asked,
                # here or carried back from the rank (Ray keeps the error's class).
                refused = isinstance(error, ValueError) or isinstance(error.__cause__, ValueError)
                if not refused:
                    # Any engine may hold it by now (the source rank loads some from memory,
                    # a timed-out load may still land): none keeps it.
                    self._unload_failed(served, live)
                raise
            self.adapter = served
            self._adapters.append(served)
            retired = self._retire(self._adapters[: -lora.keep])
        return AdapterStats(
            version=version,
            adapter=served,
            path=out["path"],
            nbytes=out["nbytes"],
            export_s=out["export_s"],
            transfer_s=out["write_s"],
            engine_load_s=t2 - t1,
            total_s=time.perf_counter() - t0,
            unloaded=retired,
            verified=seed is not None and all(self.engines[lb].verifiable for lb in live),
            unverified=[lb for lb in live if seed is not None and not self.engines[lb].verifiable],
            verify_s=t3 - t2,
        )

    def _publish(
        self, served: str, version: int, live: list[str], seed: int | None, lease: Lease
    ) -> tuple[dict, float, float, float]:
        """The source rank's publish_adapter, the disk loads, verify; raises on any failure
        (the caller unloads). Returns its result and when the loads and verify began/ended."""
        publish, loaded = TrainerSync.publish_adapter, list(self._adapters)
        lora = self.config.lora
        out = next(r for r in self._run(publish, lora, version, live, loaded, seed) if r)
        lease.check()
        t1 = time.perf_counter()
        self._load_everywhere(served, out, live)
        t2 = time.perf_counter()
        readable = [lb for lb in live if self.engines[lb].verifiable]
        if seed is not None and readable:
            self._verify_adapter(served, out["digests"], seed, readable)
        return out, t1, t2, time.perf_counter()

    def _load_everywhere(self, served: str, out: dict, live: list[str]) -> None:
        """Every live engine holds adapter ``served`` (the source rank handed it to those
        that load from memory; the others load ``out["path"]``), or UpdateFailed."""
        failed = dict(out["errors"])
        if not failed:  # else no engine keeps it anyway: spare the disk loads
            disk = [lb for lb in live if lb not in out["in_memory"]]
            loaded = self._settle(lambda e: e.load_adapter(served, out["path"]), disk)
            failed = {lb: e for lb, e in loaded.items() if e is not None}
        if failed:
            raise UpdateFailed(
                f"adapter {served} not loaded: " + "; ".join(map(str, failed.values())), []
            )

    def _verify_adapter(self, served: str, sent: dict[str, str], seed: int, live: list) -> None:
        """Every live engine's LoRA slots hold exactly the adapter written (``verify``), or
        UpdateFailed: rollouts stay on the previous version."""
        outcome = self._settle(lambda e: check_adapter(e, served, sent, seed), live)
        bad = {lb: e for lb, e in outcome.items() if e is not None}
        if bad:
            raise UpdateFailed(
                f"adapter {served} failed verify: " + "; ".join(map(str, bad.values())), []
            )

    def _unload_failed(self, served: str, live: list[str]) -> None:
        # Every live engine: one whose load timed out may still have taken it.
        undone = self._settle(lambda e: e.unload_adapter(served), live)
        if any(undone.values()):
            log.warning("weightsync: unloading failed adapter %s: %s", served, undone)

    def _retire(self, names: Sequence[str]) -> list[str]:
        """Unload adapters from every engine, then remove their directories (the source rank
        wrote them), best effort: an engine that keeps one only holds memory, rollouts no
        longer ask for it."""
        names = list(names)
        if not names:
            return names
        for name in names:
            errors = {
                lb: e for lb, e in self._settle(lambda e, n=name: e.unload_adapter(n)).items() if e
            }
            if errors:
                log.warning("weightsync: unloading adapter %s failed on %s", name, errors)
        self._adapters = [a for a in self._adapters if a not in names]
        try:
            self._run(TrainerSync.remove_adapters, self.config.lora, names)
        except Exception as e:  # noqa: BLE001 - the next write prunes them
            log.warning("weightsync: removing adapter directories %s failed: %s", names, e)
        return names
