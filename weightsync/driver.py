"""One weight update across a trainer job and a fleet of engines, with deadlines everywhere.

The whole contract, driver side (``WeightSync.update``)::

    lease lock -> [trainers] prepare: plan, identical on all ranks, finite, engines accept it;
                  export + int4 of the first SyncConfig.stage_bytes
    pause(mode) -> flush cache (not with kv_cache="reuse") -> begin session  <- control plane
    [trainers] export -> int4 -> buckets -> engines, each bucket acknowledged   <- data plane
    end session (engine post-processing, e.g. the int4 repack)
    -> prove: every rank loaded every tensor sent (always); read back through the kernels
       and compared with what was sent (SyncConfig.verify: sample | full) -> stamp version
    finally: resume every paused engine; an engine whose update broke is marked stale, one
    that failed the proof is held paused (SyncConfig.on_verify_failure="hold")

With engine-side staging (``SyncConfig.engine_stage_bytes``) the buckets reach every engine
before any pause, and the pause holds only ``apply_staged``; with ``min_serving`` the engines
then switch in waves (``weightsync.waves``), the rest of the fleet serving meanwhile.

``update_async`` runs the same update with the whole export staged on the source rank before
the pause, returns to the caller there, and runs the rest on a thread of its own
(``weightsync.inflight``): the source rank alone pushes, beside the trainer's next step.

Every bracketed step is a barrier: it returns only when every trainer rank finished it, within
``SyncConfig.step_timeout_s``. Nothing is paused before the plan is validated, so bad input
leaves the engines serving the old weights. A stale engine is excluded from ``live_engines``
(rollouts) until a later update reaches it in full.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

from weightsync.adapter_publish import AdapterPublisher
from weightsync.config import SyncConfig
from weightsync.engines.base import Applied, ControlPlane, EngineFailed
from weightsync.engines.spec import EngineSpec
from weightsync.inflight import BACKGROUND_GROUP, BackgroundSlot, UpdateHandle, UpdateInFlight
from weightsync.lease import Lease, LeaseLock, LocalLeaseLock
from weightsync.model_config import mismatches
from weightsync.proof import Probe
from weightsync.quant import Int4Config
from weightsync.sender import SendStats
from weightsync.stats import SyncStats, UpdateFailed, sync_stats
from weightsync.verify import Proof, VerifyReport, check_complete, check_proof
from weightsync.waves import Progress, Wave, plan_waves
from weightsync.worker import TrainerSync

log = logging.getLogger("weightsync")


class Trainers(Protocol):
    """A trainer job: runs ``fn(worker, *args)`` on every rank, returns results by rank;
    ``run_rank`` on one rank, in ``concurrency_group`` (``BACKGROUND_GROUP``: a thread of
    its own beside the trainer's calls; needed by ``update_async`` only)."""

    def run_all(self, fn: Callable, *args: Any, timeout_s: float) -> list[Any]: ...

    def run_rank(
        self, rank: int, fn: Callable, *args: Any, timeout_s: float, concurrency_group: str
    ) -> Any: ...


@dataclass(frozen=True)
class _Opened:
    """An update past its checks, before any pause (``WeightSync._open``)."""

    version: int
    probe: Probe | None
    sent: dict[str, int]
    lease: Lease
    t0: float
    export_s: float
    background: bool


class WeightSync(AdapterPublisher):
    def __init__(
        self,
        trainers: Trainers,
        engines: Sequence[EngineSpec],
        config: SyncConfig,
        int4: Int4Config | None = None,
        lock: LeaseLock | None = None,
        owner: str = "weightsync",
    ) -> None:
        if not engines:
            raise ValueError("engines: at least one EngineSpec")
        _check_wiring(engines, config)
        self.trainers = trainers
        self.specs = list(engines)
        self.config = config
        self.int4 = int4
        self.lock = lock or LocalLeaseLock()
        self.owner = owner
        self.engines: dict[str, ControlPlane] = {s.label: s.connect(config) for s in self.specs}
        self.stale: set[str] = set()
        self.held: set[str] = set()
        """Engines kept paused after failing the proof (``on_verify_failure="hold"``), serving
        nothing until an update verifies them; always also stale."""
        self._aliases: dict[str, str] = {}  # names the engines also compute with (tied heads)
        self._proof: Proof | None = None  # what the last update proved, for ``verify``
        self._proof_failed: set[str] = set()
        self._id = uuid.uuid4().hex[:12]  # this WeightSync's state on the trainer ranks
        self._connected = False
        self._model: dict | None = None  # the trainer's model_config summary
        self.adapter: str | None = None
        """The LoRA adapter rollouts ask for (``update_adapter``); None: the base alone."""
        self._adapters: list[str] = []  # loaded on the live engines, oldest first
        self._in_flight = BackgroundSlot()  # update_async's one background update

    @property
    def live_engines(self) -> list[EngineSpec]:
        """Engines that hold the current weights (rollouts go only there)."""
        return [s for s in self.specs if s.label not in self.stale]

    def _run(self, fn: Callable, *args: Any) -> list[Any]:
        return self.trainers.run_all(fn, self._id, *args, timeout_s=self.config.step_timeout_s)

    def connect(self) -> None:
        """Set up the transport between the source rank and every engine (once)."""
        self._in_flight.settle(self.config.in_flight, self._drain_s, "connect")
        self._check_ranks()
        unknown = {lb: u for lb, u in self._each(lambda e: e.unrepairable()).items() if u}
        if unknown:
            raise ValueError(f"engines whose post-processing an update could not redo: {unknown}")
        self._install()
        for found in self._each(lambda e: e.aliases()).values():
            self._aliases.update(found)
        self._run(TrainerSync.connect)
        self._connected = True

    def _install(self) -> None:
        """This WeightSync's state on every trainer rank, and the trainer's model summary."""
        self._run(TrainerSync.install, self.specs, self.config, self.int4)
        self._model = self._run(TrainerSync.model_summary)[0]

    def _check_ranks(self) -> None:
        """Every engine runs as many ranks as its spec says: the group's world size and each
        engine's rank offset are built from the specs, so a mismatch would hang the join."""
        served = self._each(lambda e: e.ranks())
        bad = {s.label: (s.tp_size, served[s.label]) for s in self.specs}
        bad = {label: n for label, n in bad.items() if n[0] != n[1]}
        if bad:
            raise ValueError(
                "EngineSpec.tp_size differs from the ranks the engine reports: "
                + ", ".join(f"{lb}: tp_size={a}, engine {b}" for lb, (a, b) in bad.items())
            )

    def _check_models(self) -> None:
        """Every engine serves the trainer's model: same config fields, before any pause."""
        served = self._each(lambda e: e.model_config())
        bad = {lb: mismatches(self._model, cfg) for lb, cfg in served.items() if cfg is not None}
        bad = {lb: m for lb, m in bad.items() if m}
        if bad:
            raise ValueError(f"engines serve another model than the trainer's: {bad}")

    def update(self, version: int) -> SyncStats:
        """Push the trainer's current weights to every engine as ``version``."""
        self._in_flight.settle(self.config.in_flight, self._drain_s, "update")
        with contextlib.ExitStack() as held:
            return self._complete(self._open(version, held, background=False))

    def update_async(self, version: int) -> UpdateHandle:
        """Like ``update``, but returns once the trainer ranks have exported the weights (and
        quantized them) into the source rank's memory: the trainer may step while the engines
        are paused, loaded from that copy, verified, stamped and resumed in the background.
        The handle's ``result()`` gives the ``SyncStats`` or raises ``UpdateFailed``. One
        update at a time: the next call waits for this one or fails (``SyncConfig.in_flight``),
        and raises this one's failure if nobody took it from the handle."""
        if self.config.sharded:
            raise ValueError(
                "update_async is not supported with SyncConfig.sharded yet: use update"
            )
        self._in_flight.settle(self.config.in_flight, self._drain_s, "update_async")
        _source_rank()  # megatron_bridge's first import (~1.6 s) here, not in the first pause
        held = contextlib.ExitStack()
        try:
            opened = self._open(version, held, background=True)
        except BaseException:
            held.close()
            raise

        def rest() -> SyncStats:
            with held:
                return self._complete(opened)

        try:
            return self._in_flight.start(version, opened.export_s, rest)
        except BaseException:
            held.close()  # no thread took the lease: release it
            raise

    @property
    def _drain_s(self) -> float:
        # Each of an update's steps has its own deadline; about eight follow one another,
        # five more for every further wave.
        waves = len(plan_waves(list(self.engines), self.config.min_serving))
        return self.config.step_timeout_s * (10 + 5 * (waves - 1))

    def _hold_lease(self) -> contextlib.AbstractContextManager[Lease]:
        """The lease for one call (update, audit, adapter). One token per call: the lease
        lets its holder renew, so a bare owner name would let two updates of this driver in
        at once."""
        token = f"{self.owner}#{uuid.uuid4().hex[:8]}"
        return self.lock.hold(token, lease_s=self.config.step_timeout_s * 4)

    def _open(self, version: int, held: contextlib.ExitStack, background: bool) -> _Opened:
        """Everything before the pause: the lease, the checks, the plan; staged export
        (all of it when ``background``: the trainer is free once this returns)."""
        lease = held.enter_context(self._hold_lease())
        if not self._connected:
            self.connect()
        t0 = time.perf_counter()
        self._check_models()
        probe = self._new_probe()
        # Raises before any engine is paused; returns what every engine rank must load.
        sent = self._run(TrainerSync.prepare, probe, self._aliases, background)[0]
        lease.check()
        return _Opened(version, probe, sent, lease, t0, time.perf_counter() - t0, background)

    def _complete(self, opened: _Opened) -> SyncStats:
        version, probe = opened.version, opened.probe
        progress = Progress()
        try:
            send = self._update_paused(opened, progress)
        except BaseException as e:  # noqa: BLE001 - _fail resumes, then re-raises
            self._fail(version, e, progress, opened.background)
        self._retire(self._adapters)  # trained against the old base: they no longer apply
        self.adapter = None
        self._proof = progress.proof  # what every engine was proved to hold (None: unverified)
        pause_s = max(w.pause_s for w in progress.waves)
        stats = sync_stats(version, send, pause_s, time.perf_counter() - opened.t0)
        stats.waves = progress.waves
        stats.kv_cache = self.config.kv_cache
        stats.verify = self.config.verify
        stats.unverified = send.unverified
        stats.verified = probe is not None and not send.unverified
        stats.trainer_blocked_s = opened.export_s if opened.background else stats.total_s
        return stats

    def _new_probe(self) -> Probe | None:
        """Fresh secret columns for verify, every update (the engine learns the seed only
        once it holds the bytes: after loading them, or with the call that loads them from
        its staging area)."""
        if self.config.verify == "off":
            return None
        group = self.int4.group_size if self.int4 and self.int4.group_size > 0 else 0
        return Probe(seed=secrets.randbits(62), level=self.config.verify, group=group)

    def verify(self, level: str | None = None) -> VerifyReport:
        """Prove, with no transfer, that every engine still holds the last version sent
        (before an eval, after an engine was restarted or touched): each reads back again
        what the last update's verify read, at its level and on its columns, and must give
        the same fingerprints. An engine that does not is held (``on_verify_failure``) and
        stale until the next update repairs it, stamped ``unverified-<version>``. ``level``:
        None or the last update's level; the trainer has moved on since, so no other
        columns can be compared."""
        self._in_flight.settle(self.config.in_flight, self._drain_s, "verify")
        proof = self._proof
        if proof is None:
            raise ValueError(
                "WeightSync.verify: no update was verified yet (SyncConfig.verify is "
                f"{self.config.verify!r} or no update ran): nothing to compare with"
            )
        if level not in (None, proof.probe.level):
            raise ValueError(
                f"WeightSync.verify(level={level!r}): the last update was verified at "
                f"{proof.probe.level!r}; an audit re-checks what it read"
            )
        with self._hold_lease():
            report = VerifyReport(proof.version, proof.probe.level, ok=True)
            failed = {lb: "stale since a failed update" for lb in sorted(self.stale)}
            live = [lb for lb in self.engines if lb not in self.stale]
            report.unverified = [lb for lb in live if not self.engines[lb].verifiable]
            check = [lb for lb in live if self.engines[lb].verifiable]
            outcome = self._settle(lambda e: check_proof(e, proof.probe, proof.digests), check)
            new = {lb: str(e) for lb, e in outcome.items() if e is not None}
            report.verified = [lb for lb in check if lb not in new]
            self._hold(new)
            report.failed = {**failed, **new}
            report.ok = not report.failed
            return report

    def _hold(self, failed: dict[str, str]) -> None:
        """Engines found not to hold the version: stale, and held paused by default."""
        if not failed:
            return
        self.stale.update(failed)
        log.error("weightsync: engines %s fail verify: %s", sorted(failed), failed)
        assert self._proof is not None
        stamp = f"unverified-{self._proof.version}"  # clients must not take it for the version
        self._settle(lambda e: e.set_version(stamp), list(failed))
        if self.config.on_verify_failure == "hold":
            paused = self._settle(lambda e: e.pause(self.config.pause_mode), list(failed))
            self.held.update(lb for lb, e in paused.items() if e is None)

    def _fail(
        self, version: int, error: BaseException, progress: Progress, background: bool = False
    ) -> NoReturn:
        # Partially written weights must never be served as if they were whole: an engine
        # whose session opened, or that the error names, waits for a full resync.
        begun, paused = progress.begun, progress.paused
        hit = set(begun) | (_failed_engines(error) & set(self.engines))
        # Never loaded: they let go of what they staged and serve the old weights, whole;
        # behind the fleet (stale) once an earlier wave switched.
        unapplied = [lb for lb in self.engines if lb not in begun and lb not in progress.switched]
        if self.config.engine_stage_bytes and unapplied:
            self._settle(lambda e: e.drop_staged(), unapplied)
        if progress.switched:
            hit.update(unapplied)
            # What the live engines (those switched) hold: the audit's reference.
            self._proof = progress.proof
        hit = sorted(hit)
        self.stale.update(hit)
        # The transport comes down while the engines are aborted and resumed: an engine still
        # waiting for a bucket that will never come returns from it only when the trainer's
        # side of the group is gone (else at its deadline), and only then takes the abort.
        # An open session is aborted before the resume: no engine serves half-reloaded layers.
        # Held: what this update's proof failed, and what an earlier one held (unless this
        # update's proof passed it: ``_prove`` took it out).
        hold = self.config.on_verify_failure == "hold"
        held = (self.held | self._proof_failed) if hold else set()
        self._proof_failed = set()
        self.held = set(held)
        with ThreadPoolExecutor(1, thread_name_prefix="teardown") as pool:
            teardown = pool.submit(self._disconnect, background)
            self._resume(paused, abort=begun, label=f"partial-{version}", hold=held)
            teardown.result()
        if begun or progress.switched:  # some engine's base changed: its adapters no longer apply
            self._retire(self._adapters)
            self.adapter = None
        if not isinstance(error, Exception):
            raise error
        raise UpdateFailed(f"update to version {version} failed: {error}", hit) from error

    def _disconnect(self, background: bool = False) -> None:
        """After a failed update the transport's state is unknown (a bucket half on the wire,
        a peer gone): tear it down on both sides; the next update builds it afresh."""
        self._connected = False
        try:
            # Twice the step deadline: a rank may still sit in a collective until its own
            # deadline fires, and a Ray actor runs one call at a time per group.
            timeout = 2 * self.config.step_timeout_s
            if background:
                # A push whose wait timed out may still run (Ray does not cancel it): the
                # source rank's reset queues behind it in its group, not beside it.
                self._on_source_beside(TrainerSync.reset, timeout_s=timeout)
            self.trainers.run_all(TrainerSync.reset, self._id, timeout_s=timeout)
        except Exception as e:  # noqa: BLE001 - a dead rank cannot reset; reconnect reports it
            log.warning("weightsync: trainer-side transport reset failed: %s", e)

    def _update_paused(self, opened: _Opened, progress: Progress) -> SendStats:
        """The paused part of an update, one wave at a time (``SyncConfig.min_serving``; by
        default one wave of every engine): each wave is paused, loaded, proved, stamped and
        resumed whole while the others serve."""
        send = None
        if self.config.engine_stage_bytes:  # every bucket into the engines' host memory
            send = self._push(opened.background, staged=True)  # while they all generate
            opened.lease.check()
        # Engines that serve nothing current (stale, held) switch first: the waves keep the
        # live ones generating.
        order = sorted(self.engines, key=lambda lb: lb not in self.stale)
        for wave in plan_waves(order, self.config.min_serving):
            opened.lease.check()  # a holder that lost it pauses no further wave
            t0, paused_at = time.perf_counter(), time.time()
            send = self._switch(opened, wave, progress, send)
            progress.switched.extend(wave)
            progress.begun.clear()
            if opened.probe is not None:  # what the switched engines hold, for an audit
                progress.proof = Proof(opened.version, opened.probe, send.digests)
            self.stale.difference_update(wave)  # they hold this version now
            self.held.difference_update(wave)
            self._resume(progress.paused)  # one that fails to resume is stale again
            progress.paused.clear()
            pause_s = time.perf_counter() - t0
            progress.waves.append(Wave(wave, pause_s, paused_at, time.time()))
        assert send is not None  # at least one wave
        return send

    def _switch(
        self, opened: _Opened, wave: list[str], progress: Progress, send: SendStats | None
    ) -> SendStats:
        """One wave's engines to ``opened.version``: pause, drop old KV (``kv_cache``), load
        (from staging; or, ``send`` None, the buckets as they arrive), prove, stamp. The lease
        is checked before every step (a holder that lost it stops at the next step, and the
        failure path resumes its engines)."""
        lease = opened.lease
        # Counted as paused before the call returns: a pause that timed out may still land.
        progress.paused.extend(wave)
        self._each(lambda e: e.pause(self.config.pause_mode), wave)
        if self.config.kv_cache == "recompute":
            self._flush(wave)
        lease.check()
        progress.begun.extend(wave)
        applied: dict[str, Applied | None] = {}
        if send is not None:  # the pause holds only the local load: one call, start to finish
            applied = self._each(lambda e: e.apply_staged(opened.probe), wave)
            # The engines' own load (the slowest); the call also answers completeness and
            # verify, so the pause holds one round trip for three.
            answers = [a for a in applied.values() if a is not None]
            send.apply_s += max((a.load_s for a in answers), default=0.0)
            send.verify_s += max((a.readback_s for a in answers), default=0.0)
        else:
            self._each(lambda e: e.begin_update(), wave)
            lease.check()
            send = self._push(opened.background)
            lease.check()
            self._each(lambda e: e.end_update(), wave)
        t0 = time.perf_counter()
        send.unverified += self._prove(opened, send.digests, wave, progress, applied)
        send.verify_s += time.perf_counter() - t0
        lease.check()
        self._each(lambda e: e.set_version(str(opened.version)), wave)
        return send

    def _flush(self, labels: list[str]) -> None:
        """KV computed under the old weights goes: the prefix cache, and (paused in place or
        retracted) the running requests' KV, recomputed under the new weights on resume."""
        flushed = self._each(lambda e: e.flush_cache(), labels)
        refused = [label for label, ok in flushed.items() if not ok]
        if refused:
            raise EngineFailed(
                tuple(refused),
                f"engines {refused} refused to flush their cache after "
                f"{self.config.flush_retries} retries (their reasons are in the log)",
            )

    def _push(self, background: bool, staged: bool = False) -> SendStats:
        """The buckets, to every engine (``staged``: into their staging areas, bounded by
        ``engine_stage_bytes``). In the background the whole export is staged on the source
        rank already: it pushes alone, on its own thread (the trainer steps on)."""
        bound = self.config.engine_stage_bytes if staged else 0
        if not background:
            return self._run(TrainerSync.send, bound)[0]
        return self._on_source_beside(TrainerSync.send, bound, timeout_s=self.config.step_timeout_s)

    def _on_source_beside(self, fn: Callable, *args: Any, timeout_s: float) -> Any:
        """``fn`` on the source rank, in its background group: beside the trainer's calls,
        one at a time (after a push still running there)."""
        return self.trainers.run_rank(
            _source_rank(),
            fn,
            self._id,
            *args,
            timeout_s=timeout_s,
            concurrency_group=BACKGROUND_GROUP,
        )

    def _prove(
        self,
        opened: _Opened,
        digests: dict[str, str],
        labels: list[str],
        progress: Progress,
        applied: dict[str, Applied | None],
    ) -> list[str]:
        """Every engine of ``labels`` loaded everything sent (always) and, at the probe's
        level, computes with it (those that can read back). An engine that passes holds this
        version: it is stamped with it and stays live even when another fails (it leaves
        ``begun`` for ``switched``: nothing of it is aborted); the failures are raised (and
        held, ``_fail``). Returns the engines nothing could be read back from."""
        probe, sent, version = opened.probe, opened.sent, opened.version
        # What an engine's apply already answered (keyed by the engine: ``prove`` gets it).
        answered = {self.engines[lb]: a for lb, a in applied.items() if a is not None}

        def prove(engine: ControlPlane) -> bool:
            got = answered.get(engine)
            check_complete(engine, sent, None if got is None else got.session)
            if probe is None or not engine.verifiable:
                return False
            check_proof(engine, probe, digests, None if got is None else got.digests)
            return True

        futures = self._run_engines(prove, labels)
        bad = {lb: f.exception() for lb, f in futures.items() if f.exception() is not None}
        if not bad:
            return [lb for lb, f in futures.items() if probe is not None and not f.result()]
        good = self._settle(
            lambda e: e.set_version(str(version)), [lb for lb in futures if lb not in bad]
        )
        whole = {lb for lb, e in good.items() if e is None}
        progress.begun[:] = [lb for lb in progress.begun if lb not in whole]
        progress.switched.extend(whole)
        self.stale.difference_update(whole)
        self.held.difference_update(whole)
        self._proof_failed = set(bad)
        if whole and probe is not None:  # what they hold now: an audit compares them with it
            progress.proof = Proof(version, probe, digests)
        raise EngineFailed(tuple(bad), "; ".join(map(str, bad.values())))

    def _settle(self, call: Callable, labels: Sequence[str] | None = None) -> dict:
        """``call(engine)`` on the engines ``labels`` (default all) at once; each one's error
        (naming it), or None."""
        return {lb: f.exception() for lb, f in self._run_engines(call, labels).items()}

    def _run_engines(self, call: Callable, labels: Sequence[str] | None = None) -> dict:
        """``call(engine)`` on the engines ``labels`` (default all) at once, each failure
        naming its engine; their futures, all done."""
        labels = list(self.engines) if labels is None else labels
        if not labels:
            return {}
        with ThreadPoolExecutor(len(labels), thread_name_prefix="engine") as pool:
            return {lb: pool.submit(_named, lb, call, self.engines[lb]) for lb in labels}

    def _each(self, call: Callable, labels: Sequence[str] | None = None) -> dict[str, Any]:
        """``call(engine)`` on the engines ``labels`` (default all) at once (one slow engine
        delays no other step of the others); every call has its own deadline. Raises naming
        each engine that failed."""
        futures = self._run_engines(call, labels)
        errors = [f.exception() for f in futures.values() if f.exception() is not None]
        if len(errors) == 1:
            raise errors[0]
        if errors:
            names = tuple(n for e in errors for n in _failed_engines(e))
            raise EngineFailed(names, "; ".join(map(str, errors))) from errors[0]
        return {label: f.result() for label, f in futures.items()}

    def _resume(
        self,
        paused: list[str],
        abort: Sequence[str] = (),
        label: str = "",
        hold: set[str] | frozenset = frozenset(),
    ) -> None:
        """Resume every paused engine but those to ``hold``, all at once (one that hangs
        delays no other), first aborting the sessions named in ``abort`` and stamping them
        ``label``: what they hold mixes two versions, and every client must be able to tell."""
        if paused:
            with ThreadPoolExecutor(len(paused), thread_name_prefix="resume") as pool:
                outcomes = {
                    lb: pool.submit(self._recover, lb, label if lb in abort else "", lb in hold)
                    for lb in paused
                }
            errors = {label: f.result() for label, f in outcomes.items() if f.result()}
            if errors:
                self.stale.update(errors)
                log.error("engines %s may not serve (marked stale): %s", sorted(errors), errors)

    def _recover(self, label: str, stamp: str, hold: bool = False) -> list[Exception]:
        engine, errors = self.engines[label], []
        steps = [engine.abort_update, lambda: engine.set_version(stamp)] if stamp else []
        for step in [*steps] if hold else [*steps, engine.resume]:  # resume even if abort failed
            try:
                step()
            except Exception as e:  # noqa: BLE001 - collected, reported by the caller
                errors.append(e)
        return errors

    def versions(self) -> dict[str, str | None]:
        """The weight version each engine reports."""
        with ThreadPoolExecutor(len(self.engines)) as pool:
            got = pool.map(lambda e: e.get_version(), self.engines.values())
            return dict(zip(self.engines, got, strict=True))

    def close(self) -> None:
        """Drains an update in flight (``update_async``), then releases the trainer side."""
        try:
            self._in_flight.settle("wait", self._drain_s, "close")
        except UpdateInFlight as e:
            # Tearing down under a push would break it halfway: leave both sides as they are.
            log.error("weightsync: close() left the trainer side installed: %s", e)
            return
        except Exception as e:  # noqa: BLE001 - closing goes on; the failure is not lost
            log.error("weightsync: the update in flight failed: %s", e)
        try:
            self._run(TrainerSync.uninstall)
        except Exception as e:  # noqa: BLE001 - the trainer job may already be gone
            log.warning("weightsync: trainer-side clean-up skipped: %s", e)
        finally:
            for engine in self.engines.values():
                engine.close()


def _source_rank() -> int:
    """The trainer rank that exports and pushes (megatron_bridge's; a heavy first import)."""
    from megatron_bridge import EXPORT_SOURCE_RANK

    return EXPORT_SOURCE_RANK


def _named(label: str, call: Callable, *args: Any) -> Any:
    try:
        return call(*args)
    except Exception as e:
        raise EngineFailed((label,), f"engine {label!r}: {e}") from e


def _failed_engines(error: BaseException | None) -> set[str]:
    """The engines a failure names, wherever it was raised (here, or on the source rank and
    carried back through the trainer job: Ray and the rank wrappers keep the chain)."""
    seen: set[str] = set()
    while error is not None:
        seen.update(getattr(error, "engines", ()) if isinstance(error, EngineFailed) else ())
        error = error.__cause__ or getattr(error, "cause", None)
    return seen


def _check_wiring(specs: Sequence[EngineSpec], config: SyncConfig) -> None:
    """Combinations no update could run, refused when WeightSync is built, naming the
    engines: the CPU shared-memory ring and engine-side staging are our vLLM plugin's."""
    plan_waves([s.label for s in specs], config.min_serving)  # raises if none could switch
    bad = [s.label for s in specs if s.kind != "vllm"]
    if config.pause_mode == "in_place" and config.kv_cache == "recompute" and bad:
        raise ValueError(
            f"SyncConfig.kv_cache='recompute' with pause_mode='in_place': SGLang engines {bad} "
            "cannot drop the KV of requests paused in place (their flush waits for idle); "
            "use pause_mode='retract', or kv_cache='reuse' to keep that KV"
        )
    if config.engine_stage_bytes and bad:
        # SGLang 0.5.23 holds bytes unloaded only through custom weight loaders on its tensor
        # path, inside an open update session, and drains every request in flight before
        # each such call (its model-update writer lock): nothing would arrive while it serves.
        raise ValueError(
            f"SyncConfig.engine_stage_bytes: engine-side staging is built for vLLM engines "
            f"(the weightsync plugin); not for {bad}: SGLang cannot hold an update unloaded "
            "while it serves (its update calls drain the requests in flight)"
        )
    if config.transport == "ipc" and bad:
        raise ValueError(
            f"SyncConfig.transport='ipc' is wired for vLLM engines; not for {bad}: "
            "use transport='broadcast' for SGLang"
        )
    if config.sharded and bad:
        raise ValueError(
            f"SyncConfig.sharded is wired for vLLM engines; not for {bad}: SGLang's API takes "
            "whole tensors (use sharded=False)"
        )
