"""The ``weightsync`` weight-transfer backend, created by vLLM's factory inside its worker.

Buckets arrive as flat per-dtype buffers, over a gloo broadcast group or from a persistent
shared-memory ring, and are loaded through vLLM's layerwise reload (start -> load_weights per
bucket -> finish), the same lifecycle as vLLM's NCCL backend. That lifecycle matters on CPU:
the CPU build repacks linear weights for oneDNN after loading, so a bare ``load_weights`` after
start hits zero-sized parameters; layerwise reload restores the checkpoint layout first and
re-runs the repack (e.g. the WNA16 int4 repack) once a layer is complete.

A session that breaks must still leave a model that can serve: between start and finish the
layers being reloaded sit on the meta device, and the first forward over them kills vLLM's
EngineCore (and with it the API server). So a failed bucket aborts the session on the spot
(vLLM's worker forgets the session when ``update_weights`` raises, but not the reload state),
and the trainer's driver aborts a session it can no longer finish (``abort``, below). Aborting
keeps every layer whole: a layer that got all of its tensors holds the new weights, every
other layer its old ones.

Finalizing also redoes what the reload leaves undone (``repair``: a tied LM head, the CPU MoE
experts' prepack), and ``readback`` digests the weights the kernels then compute with.

Queries (expected parameters, the model config, what the last session received and which
layers it left unloaded, the aliases, fingerprints of what the kernels read, load timings,
``abort``) are answered by ``__call__`` and reach the trainer over
vLLM's dev ``/collective_rpc`` route as ``{"method": "weight_transfer_engine", "args":
[query]}``: the worker resolves the method name to this object and calls it.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import WeightTransferEngine

from weightsync.engines.vllm_plugin import lora_readback, receive
from weightsync.engines.vllm_plugin.repair import (
    ReloadRepair,
    aliases,
    unloaded_layers,
    unrepairable,
)
from weightsync.engines.vllm_plugin.shards import ShardSource
from weightsync.engines.vllm_plugin.staging import Staging
from weightsync.engines.vllm_plugin.wire import InitInfo, UpdateInfo
from weightsync.model_config import summary
from weightsync.plan import unpack_bucket
from weightsync.proof import Probe


class WeightsyncTransferEngine(WeightTransferEngine[InitInfo, UpdateInfo]):
    init_info_cls = InitInfo
    update_info_cls = UpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.source = None
        self.timings: list[dict[str, float]] = []
        self._expected: dict[str, list] | None = None
        self._open = False
        self._repair: ReloadRepair | None = None
        self._faults: dict = {}  # test-only, see inject_faults
        self._untied: list = []
        self._stale: list = []
        self._staging: Staging | None = None  # engine-side staging (SyncConfig.engine_stage_bytes)
        self._session_faults: dict = {}
        self._session: dict = {"received": {}, "unloaded": []}  # completeness of the last one
        lora_readback.track_adapters()  # before any adapter is loaded: they load at runtime

    def init_transfer_engine(self, init_info: InitInfo) -> None:
        pc = self.parallel_config
        if init_info.transport == "sharded":
            _check_sharded_layout(pc)  # before the working transport is dropped
        self.shutdown()
        worker = pc.data_parallel_index * pc.world_size + pc.rank
        self.source = receive.open_source(init_info, worker)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        self.timings = []
        self._session = {"received": {}, "unloaded": []}
        if isinstance(self.source, ShardSource):
            self.source.close()  # pieces an update cut short never load into another one
        self._session_faults, self._faults = self._faults, {}
        _retie(self._untied)  # a stale_alias fault lasts one session
        self._untied = _untie(self.model) if self._session_faults.get("stale_alias") else []
        # Layers are processed as they complete: the copies they derive are taken now.
        self._stale = _derived_copies(self.model, self._session_faults.get("stale_derived", []))
        self._repair = ReloadRepair(self.model)  # before the reload swaps in meta tensors
        initialize_layerwise_reload(self.model)
        self._open = True

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class ends with torch.accelerator.synchronize(), which raises on a
        # machine without an accelerator; CPU copies are synchronous anyway.
        try:
            self.receive_weights(self.parse_update_info(update_info))
        except BaseException:
            self.abort_weight_update()
            raise

    def receive_weights(self, update_info: UpdateInfo) -> None:
        if not self._open:
            raise RuntimeError("weightsync backend: no weight-update session is open")
        if self.source is None:
            raise RuntimeError("weightsync backend: init_weight_transfer_engine was not called")
        t0 = time.perf_counter()
        if isinstance(self.source, ShardSource):
            named = self.source.receive(update_info, self._answer("expected_params"))
            wire = self.source.last_wire_bytes  # what this worker received, not what it loads
            self._load_named(update_info.bucket, named, wire, time.perf_counter() - t0)
            return
        bucket, ticket = update_info.to_bucket()
        buffers = self.source.recv(bucket, ticket)
        try:
            self._load(bucket, buffers, receive_s=time.perf_counter() - t0)
        finally:
            self.source.release(ticket)

    def _load(self, bucket, buffers: dict, receive_s: float) -> None:
        """One bucket's tensors into the model, counted for completeness."""
        named = unpack_bucket(bucket, buffers)
        self._load_named(bucket.index, named, bucket.nbytes, receive_s)
        receive.unalias_pending(self.model, list(buffers.values()))

    def _load_named(self, index: int, named: list, nbytes: int, receive_s: float) -> None:
        t1 = time.perf_counter()
        skip = tuple(self._session_faults.get("skip", ()))
        if skip:
            named = [(n, t) for n, t in named if not n.startswith(skip)]
        named = [(n, _corrupt(n, t, self._session_faults)) for n, t in named]
        self.model.load_weights(named)
        self._session["received"].update((n, t.numel()) for n, t in named)
        self.timings.append(
            {
                "bucket": index,
                "receive_s": receive_s,
                "load_s": time.perf_counter() - t1,
                "bytes": nbytes,
            }
        )

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        if not self._open:
            return  # aborted after a failed bucket; vLLM still counted the session as open
        t0 = time.perf_counter()
        self._open = False
        self._finalize(finalize_layerwise_reload)
        self.timings.append({"bucket": -1, "finish_s": time.perf_counter() - t0})

    def abort_weight_update(self) -> bool:
        """Close an open session keeping every layer whole; False if none was open."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        if not self._open:
            return False
        self._open = False
        if isinstance(self.source, ShardSource):
            self.source.close()
        receive.discard_partial_layers(self.model)
        with set_current_vllm_config(self.vllm_config):
            self._finalize(finalize_layerwise_reload)
        return True

    def _finalize(self, finalize) -> None:
        repair, faults = self._repair, self._session_faults
        self._session["unloaded"] = unloaded_layers(self.model, repair)
        if self._session["unloaded"]:
            # The update fails: layers it left part-loaded keep their old weights whole
            # (finalize would process them with the missing part uninitialized).
            receive.discard_partial_layers(self.model)
        reloaded = repair.reloaded() if repair else set()
        finalize(self.model, self.model_config)
        for module, attr, old in self._stale:  # fault injection: a copy left stale
            _swap(module, attr, old)
        if repair is not None:
            repair.apply(reloaded)
            if faults.get("post_twice"):
                repair.apply(reloaded, skip_aliases=True)
        self._repair, self._session_faults, self._stale = None, {}, []

    def shutdown(self) -> None:
        if self.source is not None:
            source, self.source = self.source, None
            receive.close_source(source)

    def __call__(self, query: str) -> dict:
        """The answer to ``query``, or ``{"error": ...}``: a query never raises. vLLM's
        multiprocess executor stops reading a collective RPC's answers at the first rank that
        raised, so the other ranks' answers would be read by the next RPC instead."""
        try:
            return self._answer(query)
        except Exception as e:  # noqa: BLE001 - reported to the caller, rank by rank
            return {"error": f"{type(e).__name__}: {e}"[:2000]}

    def _answer(self, query: str) -> dict:
        if not isinstance(query, str):
            raise TypeError(f"a weightsync query is a string, got {type(query).__name__}")
        if query == "expected_params":
            if self._expected is None:
                self._expected = receive.checkpoint_params(self.model_config.model)
            return self._expected
        if query == "timings":
            return {"timings": list(self.timings)}
        if query == "abort":
            return {"aborted": self.abort_weight_update()}
        if query == "model_config":
            return summary(self.model_config.hf_config)
        if query == "session":
            return self._session
        if query == "aliases":
            return aliases(self.model, self("expected_params"))
        if query == "unrepairable":
            return {"layers": unrepairable(self.model)}
        if query == "drop_staged":
            self._staging = None
            return {"dropped": True}
        kind, _, arg = query.partition(":")
        if kind == "apply_staged":  # apply_staged[:proof:<level>:<group>:<seed>]
            tag, _, probe = arg.partition(":")
            if arg and tag != "proof":
                raise ValueError(f"apply_staged:{arg[:60]!r}: expected proof:<probe>")
            return self.apply_staged(Probe.parse(probe) if arg else None)
        if kind == "stage_open":
            return self.open_staging(arg)
        if kind == "stage":
            return self.stage(self.parse_update_info(json.loads(arg)))
        if kind == "proof":
            return self.proof(Probe.parse(arg))
        seed, _, name = arg.partition(":")
        if kind == "adapter" and seed.isdigit() and int(seed) < 1 << 31 and name:
            return self.adapter_readback(name, int(seed))
        if kind == "forget_adapter" and arg:
            return {"forgotten": lora_readback.forget(arg)}
        if kind == "fault":
            return self.inject_faults(json.loads(arg))
        raise ValueError(
            f"unknown weightsync query {query[:80]!r}: expected_params|model_config|session|"
            "aliases|unrepairable|timings|abort|proof:<level>:<group>:<seed>|adapter:<seed>:<name>|"
            "forget_adapter:<name>|stage_open:<bytes>:<bound>|stage:<update_info>|apply_staged[:proof:...]|"
            "drop_staged"
        )

    # --- engine-side staging (``staging``): received while generating, loaded in the pause --
    def open_staging(self, arg: str) -> dict:
        nbytes, _, bound = arg.partition(":")
        if not (nbytes.isdigit() and bound.isdigit()):
            raise ValueError(f"stage_open:{arg[:40]!r}: expected <bytes>:<bound>")
        if self._open:
            raise RuntimeError("weightsync backend: staging during an open update session")
        self._staging = Staging(int(nbytes), int(bound))
        return {"opened": int(nbytes)}

    def stage(self, update_info: UpdateInfo) -> dict:
        """One bucket off the wire into the staging area; the model is not touched."""
        if self._staging is None:
            raise RuntimeError("weightsync backend: stage_open first")
        if isinstance(self.source, ShardSource):
            raise RuntimeError("weightsync backend: the sharded transport does not stage yet")
        if self.source is None:
            raise RuntimeError("weightsync backend: init_weight_transfer_engine was not called")
        bucket, ticket = update_info.to_bucket()
        try:
            buffers = self.source.recv(bucket, ticket)
            try:
                self._staging.take(bucket, buffers)
            finally:
                self.source.release(ticket)
        except BaseException:
            self._staging = None  # half an update is never applied
            raise
        return {"staged": bucket.index}

    def apply_staged(self, probe: Probe | None) -> dict:
        """The whole staged update, as one session (start, every bucket, finish): the pause
        holds only the local load. A failure aborts it, keeping every layer whole. Answers
        with its load time, the session report and, given ``probe``, this rank's proof
        parts: the driver's next two calls, without their round trips."""
        from vllm.config import set_current_vllm_config

        staging, self._staging = self._staging, None
        if staging is None:
            raise RuntimeError("weightsync backend: nothing is staged")
        if staging.held != staging.nbytes:
            raise RuntimeError(
                f"weightsync backend: {staging.held} of {staging.nbytes} staged bytes arrived"
            )
        t0 = time.perf_counter()
        with set_current_vllm_config(self.vllm_config):
            self.start_weight_update()
            try:
                for bucket, buffers in staging.buckets:
                    self._load(bucket, buffers, receive_s=0.0)
            except BaseException:
                self.abort_weight_update()
                raise
            self.finish_weight_update()
        t1 = time.perf_counter()
        parts, error = None, None
        try:
            parts = None if probe is None else self.proof(probe)
        except Exception as e:  # noqa: BLE001 - the load stands: verify fails this engine alone
            error = f"{type(e).__name__}: {e}"[:2000]
        answer = {"load_s": t1 - t0, "readback_s": time.perf_counter() - t1}
        return answer | {"session": self._session, "proof": parts, "proof_error": error}

    def proof(self, probe: Probe) -> dict[str, dict[str, dict]]:
        """This rank's fingerprint parts of the weights the kernels compute with
        (``weightsync.proof``; the driver adds the ranks' parts), aliases included."""
        from weightsync.engines.vllm_plugin.readback import live_parts
        from weightsync.probe import logical_name

        if self._open:
            raise RuntimeError("weightsync backend: readback during an open update session")
        expected = self("expected_params")
        wanted = {logical_name(n) for n in expected} - {None}
        return live_parts(self.model, probe, wanted | set(aliases(self.model, expected)))

    def adapter_readback(self, name: str, seed: int) -> dict[str, dict]:
        """This rank's probe pieces of LoRA adapter ``name`` as its kernels' slot holds it
        (``lora_readback``); the name only looks up an adapter this worker loaded."""
        if not hasattr(self.model, "lora_manager"):
            raise RuntimeError("weightsync backend: the engine does not serve LoRA")
        lora, slot = lora_readback.activate(self.model, name)
        for prefix in self._faults.pop("lora_zero", []):
            _zero_slot(self.model.lora_manager.modules, slot, prefix)
        return lora_readback.slot_pieces(self.model, lora, slot, seed)

    def inject_faults(self, faults: dict) -> dict:
        """Test-only (the engine must run with WEIGHTSYNC_FAULT_INJECTION=1): break the next
        session the way real bugs do, so tests can see ``verify`` catch it. ``skip``: names
        (prefixes) never loaded; ``stale_alias``: a tied head keeps a private copy of the old
        embedding; ``post_twice``: the MoE kernels' post-processing applied twice;
        ``lora_zero``: the next adapter read back first loses the LoRA B of these modules
        (prefixes) in its slot; ``corrupt``: ``[{"name", "rows": [start, stop] | None,
        "cols": [start, stop] | None}]`` one element, a row, a block (one int4 scale: its
        ``weight_scale``) of a tensor changed on its way into ``load_weights``;
        ``stale_derived``: copies derived at finalize (MLA's ``W_UK_T``, ``W_UV``) keep their
        old values; ``tp_ranks``: only these ranks of a TP>1 engine break (default: all)."""
        if os.environ.get("WEIGHTSYNC_FAULT_INJECTION") != "1":
            raise PermissionError("fault injection is off (WEIGHTSYNC_FAULT_INJECTION=1)")
        allowed = {
            *("skip", "stale_alias", "post_twice", "lora_zero", "corrupt", "stale_derived"),
            "tp_ranks",
        }
        if not isinstance(faults, dict) or set(faults) - allowed:
            raise ValueError(f"faults: a dict with keys from {sorted(allowed)}")
        for key in ("skip", "lora_zero", "stale_derived"):
            names = faults.get(key, [])
            if not (isinstance(names, list) and all(isinstance(n, str) and n for n in names)):
                what = "attribute names" if key == "stale_derived" else "tensor names or prefixes"
                raise ValueError(f"faults.{key}: a list of {what}")
        for spot in faults.get("corrupt", []):
            if not (isinstance(spot, dict) and isinstance(spot.get("name"), str)):
                raise ValueError("faults.corrupt: a list of {name, rows, cols}")
        ranks = faults.pop("tp_ranks", None)
        if ranks is not None and not (
            isinstance(ranks, list) and all(type(r) is int for r in ranks)
        ):
            raise ValueError("faults.tp_ranks: a list of TP rank numbers")
        self._faults = faults if ranks is None or self.parallel_config.rank in ranks else {}
        return {"armed": sorted(self._faults)}


def _corrupt(name: str, t, faults: dict):
    """Fault injection: ``t`` with the spots ``faults["corrupt"]`` names for it changed (a
    copy: the receive buffers are reused)."""
    spots = [s for s in faults.get("corrupt", ()) if s["name"] == name]
    if not spots:
        return t
    t = t.clone()
    view = t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t.reshape(1, -1)
    for spot in spots:
        rows, cols = spot.get("rows") or [0, view.shape[0]], spot.get("cols") or [0, view.shape[1]]
        block = view[rows[0] : rows[1], cols[0] : cols[1]]
        block.copy_(block * -2 + 1 if block.is_floating_point() else block ^ 1)
    return t


def _derived_copies(model, attrs: list[str]) -> list:
    """Fault injection: (module, attribute, a copy of its values now) of each attribute in
    ``attrs`` any module holds (MLA layers: ``W_UK_T``, ``W_UV``)."""
    return [
        (m, a, getattr(m, a).detach().clone())
        for m in model.modules()
        for a in attrs
        if isinstance(getattr(m, a, None), torch.Tensor)
    ]


def _swap(module, attr: str, old) -> None:
    """Fault injection: ``module.attr`` becomes a private tensor holding ``old`` (a derived
    copy may share the memory of the weight it was derived from: writing into it would
    change both)."""
    if isinstance(getattr(module, attr), torch.nn.Parameter):
        module.register_parameter(attr, torch.nn.Parameter(old, requires_grad=False))
    else:
        setattr(module, attr, old)


def _zero_slot(modules: dict, slot: int, prefix: str) -> None:
    """Fault injection: LoRA layers under ``prefix`` lose their B in ``slot``."""
    for name, module in modules.items():
        if name.startswith(prefix) and hasattr(module, "lora_b_stacked"):
            for b in module.lora_b_stacked:
                b[slot].zero_()


def _untie(model) -> list:
    """Fault injection: every alias of a shared parameter gets a private copy of it (the
    old weights, never updated). Returns what ``_retie`` needs to undo it."""
    from weightsync.engines.vllm_plugin.repair import alias_groups

    undo = []
    for group in alias_groups(model):
        shared = {id(p) for p in group[0]._parameters.values() if p is not None}
        for module in group[1:]:
            for name, p in list(module._parameters.items()):
                if p is not None and id(p) in shared:
                    copy = torch.nn.Parameter(p.data.clone(), requires_grad=False)
                    copy.__dict__.update(p.__dict__)
                    module.register_parameter(name, copy)
                    undo.append((module, name, p))
            _reprocess(module)
    return undo


def _retie(undo: list) -> None:
    for module, name, shared in undo:
        module.register_parameter(name, shared)
        _reprocess(module)


def _reprocess(module) -> None:
    if hasattr(module, "quant_method"):
        module.quant_method.process_weights_after_loading(module)


def _check_sharded_layout(pc) -> None:
    """The sharded plan cuts each tensor by tensor parallelism alone
    (``weightsync.engine_shards``): an engine laid out otherwise is refused before it joins."""
    bad = [f"pipeline_parallel_size={pc.pipeline_parallel_size}"] * (pc.pipeline_parallel_size != 1)
    bad += [f"data_parallel_size={pc.data_parallel_size}"] * (pc.data_parallel_size != 1)
    bad += ["enable_expert_parallel"] * bool(pc.enable_expert_parallel)
    if bad:
        raise ValueError(
            f"the sharded transport plans by tensor parallelism alone; engine has {bad}"
        )
