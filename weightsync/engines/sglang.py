"""SGLang engine adapter: speaks SGLang 0.5.23's HTTP RL API (its ``http_server.py`` routes).

One update through this adapter::

    validate(plan, named)            # names/dtypes/shapes vs the engine's checkpoint, finiteness
    pause(mode)                      # POST /pause_generation {mode}
    flush_cache()                    # GET /flush_cache, bounded retries with backoff; not in_place
    begin_update()                   # POST /begin_weight_update; 404 -> legacy (<=0.5.20) flow
    update_bucket(bucket, ticket)    # POST /update_weights_from_distributed, in flight with the
                                     #   transport's async broadcast of the bucket, then wait;
                                     #   or /update_weights_from_tensor, one payload per TP rank
    end_update()                     # POST /end_weight_update (re-packs quantized layers)
    set_version(v); resume()         # /update_weight_version, /continue_generation

A LoRA adapter (``WeightSync.update_adapter``) goes in memory, from the source rank:
``load_adapter_tensors`` -> /load_lora_adapter_from_tensors, one payload per TP rank, checked
by SGLang against each tensor's sha256 before it loads; unloading is the control plane's.

The broadcast group is created once with ``init_group(...)`` *while* the trainer (rank 0, which
hosts the TCP store) builds its side like SGLang's ``init_custom_process_group``. sglang itself
is imported only lazily, for request structs and payload checks (``sglang_payloads``).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import requests
import torch

from weightsync.config import DEFAULT_TIMEOUT_S
from weightsync.engines.base import BroadcastLink, Link
from weightsync.engines.http import DeadlineSession, InFlight, retry_flush
from weightsync.engines.sglang_http import checked, error_text
from weightsync.engines.sglang_payloads import (
    TensorSpec,
    check_meta,
    check_payload,
    check_tensor,
    manifest_from_checkpoint,
    request_body,
)
from weightsync.plan import Bucket, Plan, flat_bucket
from weightsync.tensors import dtype_name, sha256
from weightsync.transport.base import Ticket

log = logging.getLogger(__name__)
_LEGACY_NOTE = (
    "SGLang at {url} answered 404 on /begin_weight_update: a server older than 0.5.21. Using "
    "the legacy flow (no begin/end session); such servers never re-pack quantized layers after "
    "an update (sglang #14158), so only send unquantized weights to them."
)


@dataclass(kw_only=True, frozen=True, slots=True)
class SGLangConfig:
    url: str
    """Base URL of the server, e.g. http://10.0.0.5:30000."""
    api_key: str | None = None
    """Sent as ``Authorization: Bearer`` when the server runs with --api-key/--admin-api-key."""
    path: Literal["distributed", "tensor"] = "distributed"
    """distributed: broadcast group (NCCL/gloo); tensor: serialized per-TP-rank payloads (IPC)."""
    group_name: str = "weight_update_group"
    """The broadcast group's name for ``init_group``; ``join`` takes the link's instead."""
    tp_size: int = 1
    """Engine TP ranks: one payload each on the tensor path; the group ranks it occupies."""
    selector: Literal["target", "draft", "all"] = "all"
    timeout_s: float = DEFAULT_TIMEOUT_S
    """Deadline of every HTTP call."""
    flush_retries: int = 8
    flush_backoff_s: float = 0.05
    """First wait between refused flushes; doubles each time up to ``flush_backoff_max_s``."""
    flush_backoff_max_s: float = 2.0
    flush_wait_s: float = 0.0
    """Per attempt, let the server itself wait this long for idleness (0.5.23's ?timeout=)."""
    model_dir: str | None = None
    """Checkpoint (*.safetensors) the update is validated against; default: /model_info's
    model_path when it is a local directory, else names are not checked."""
    require_full: bool = False
    """validate() also rejects a plan that leaves out tensors of the checkpoint."""

    def __post_init__(self) -> None:
        checks = [
            (self.url.startswith(("http://", "https://")), "url", "an http(s):// URL"),
            (self.path in ("distributed", "tensor"), "path", "'distributed' or 'tensor'"),
            (self.tp_size >= 1, "tp_size", ">= 1"),
            (self.timeout_s > 0, "timeout_s", "> 0"),
            (self.flush_retries >= 0, "flush_retries", ">= 0"),
            (self.flush_wait_s >= 0, "flush_wait_s", ">= 0"),
            (
                0 <= self.flush_backoff_s <= self.flush_backoff_max_s,
                "flush_backoff_s",
                "0 <= flush_backoff_s <= flush_backoff_max_s",
            ),
            (bool(self.group_name), "group_name", "non-empty"),
        ]
        for ok, field, allowed in checks:
            if not ok:
                raise ValueError(f"SGLangConfig.{field}={getattr(self, field)!r}: {allowed}")


def checksum(tensor: torch.Tensor) -> str:
    """SGLang's weights_checker hash of a CPU tensor: first 8 bytes of sha256, hex."""
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(data)).digest()[:8].hex()


class SGLangEngine:
    """One SGLang server (all its TP ranks): both planes of ``weightsync.engines.base``."""

    verifiable = False
    """Cannot read its weights back by HF name: updates name it as unverified."""

    def __init__(self, config: SGLangConfig, name: str = "") -> None:
        self.config = config
        self.name = name or f"sglang@{config.url}"
        self.legacy: bool | None = None  # known after begin_update()
        self.pause_mode: str | None = None
        self.flush_error = ""
        self.group_name = config.group_name  # the group joined last (bucket requests name it)
        self._manifest: dict[str, TensorSpec] | bool | None = False  # False: not looked up yet
        self._http = DeadlineSession()  # every call's timeout is a deadline, not per read
        if config.api_key:
            self._http.headers["Authorization"] = f"Bearer {config.api_key}"
        # One worker: SGLang must get bucket requests in send order, since each one receives
        # the next broadcast of the group. A later bucket's request waits for the earlier reply.
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sglang-http")

    # -- plumbing ------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: dict | None = None) -> requests.Response:
        return self._http.request(
            method, self.config.url.rstrip("/") + path, json=body, timeout=self.config.timeout_s
        )

    def _post(self, path: str, body: dict) -> dict:
        return checked(self._request("POST", path, body), path)

    def _submit(self, path: str, body: dict, what: str) -> InFlight:
        return InFlight(self._pool.submit(self._post, path, body), f"SGLang {what}")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()

    # -- state ---------------------------------------------------------------------------
    def health(self) -> bool:
        try:
            return self._request("GET", "/health").status_code == 200
        except requests.RequestException:
            return False

    def model_info(self) -> dict:
        return checked(self._request("GET", "/model_info"), "/model_info")

    def ranks(self) -> int:
        """The server's TP size (``/server_info``; ``/get_server_info`` before 0.5.2x)."""
        response = self._request("GET", "/server_info")
        if response.status_code == 404:
            response = self._request("GET", "/get_server_info")
        return int(checked(response, "/server_info")["tp_size"])

    def get_version(self) -> str | None:
        return self.model_info().get("weight_version")

    def _model_dir(self) -> str | None:
        return self.config.model_dir or self.model_info().get("model_path")

    def manifest(self) -> dict[str, TensorSpec] | None:
        """The engine checkpoint's tensors (cached), or None where it cannot be read here."""
        if self._manifest is False:
            model_dir = self._model_dir()
            if model_dir and os.path.isdir(model_dir):
                self._manifest = manifest_from_checkpoint(model_dir)
            else:
                log.warning(
                    "%s: no local checkpoint (%r); tensor names are not validated",
                    self.name,
                    model_dir,
                )
                self._manifest = None
        return self._manifest

    def model_config(self) -> dict | None:
        """The served model's config fields (``weightsync.model_config``) from the engine's
        checkpoint ``config.json``, or None where it cannot be read from here."""
        import json

        from weightsync.model_config import summary

        model_dir = self._model_dir()
        path = os.path.join(model_dir or "", "config.json")
        if not model_dir or not os.path.isfile(path):
            return None
        with open(path) as f:
            return summary(json.load(f))

    # -- validation, before anything is paused -------------------------------------------
    def validate(
        self, plan: Plan, named_tensors: Iterable[tuple[str, torch.Tensor]] | None = None
    ) -> None:
        manifest = self.manifest()
        specs: dict[str, TensorSpec] = {}
        for bucket in plan.buckets:
            for name, dtype, shape in bucket.metas():
                check_meta(name, dtype, shape, manifest)
                specs[name] = TensorSpec(dtype, shape)
            if self.config.path == "distributed":
                self._distributed_body(bucket)  # the struct check, ahead of time
        if self.config.require_full and manifest is not None:
            missing = sorted(set(manifest) - set(specs))
            if missing:
                raise ValueError(
                    f"full update leaves out {len(missing)} tensor(s) of the "
                    f"engine's checkpoint, e.g. {missing[:3]}"
                )
        for name, tensor in named_tensors or ():
            if name not in specs:
                raise ValueError(f"tensor {name!r} is not in the bucket plan")
            check_tensor(name, tensor, specs[name])

    # -- generation control --------------------------------------------------------------
    def pause(self, mode: str) -> None:
        self._post("/pause_generation", request_body("PauseGenerationReqInput", mode=mode))
        self.pause_mode = mode

    def resume(self) -> None:
        self._post("/continue_generation", request_body("ContinueGenerationReqInput"))
        self.pause_mode = None

    def load_adapter(self, name: str, path: str) -> None:
        body = request_body("LoadLoRAAdapterReqInput", lora_name=name, lora_path=path)
        self._post("/load_lora_adapter", body)

    def load_adapter_tensors(
        self, name: str, tensors: Mapping[str, torch.Tensor], config: dict
    ) -> None:
        """Data plane (source rank): adapter ``name`` (PEFT names, ``config`` its
        adapter_config.json) in memory, its bytes inside the request (megabytes: no file, no
        shared memory, no process SGLang must be related to). Each TP rank opens its own
        flattened_bucket payload and refuses the adapter unless every tensor's sha256 is the
        one sent."""
        from weightsync.transport.ipc import encode_payload

        bucket, flat = flat_bucket(dict(tensors))
        payload = encode_payload(bucket, flat, inline=True)  # bytes inside: one copy serves all
        body = request_body(
            "LoadLoRAAdapterFromTensorsReqInput",
            lora_name=name,
            config_dict=config,
            serialized_named_tensors=[payload] * self.config.tp_size,
            load_format="flattened_bucket",
            expected_checksums={n: sha256(t) for n, t in tensors.items()},
        )
        self._post("/load_lora_adapter_from_tensors", body)

    def unload_adapter(self, name: str) -> None:
        body = request_body("UnloadLoRAAdapterReqInput", lora_name=name)
        response = self._request("POST", "/unload_lora_adapter", body)
        # SGLang refuses an unknown name like any other failure (400); only its text tells it
        # apart. Unloading an adapter the engine does not hold is a no-op (ControlPlane).
        unknown = f"LoRA with name {name} does not exist"
        if response.status_code == 400 and unknown in error_text(response):
            return
        checked(response, "/unload_lora_adapter")

    def flush_cache(self) -> bool:
        """True once flushed; False (reason in ``flush_error``) after the bounded retries.

        Skipped under ``in_place``: requests keep their KV there, so SGLang always refuses.
        """
        if self.pause_mode == "in_place":
            log.info("%s: paused in_place, cache flush skipped (stale prefix KV kept)", self.name)
            return True
        c = self.config

        def attempt() -> str | None:
            query = f"?timeout={c.flush_wait_s}" if c.flush_wait_s else ""
            response = self._request("GET", "/flush_cache" + query)
            return None if response.status_code == 200 else error_text(response)

        reason = retry_flush(attempt, c.flush_retries, c.flush_backoff_s, c.flush_backoff_max_s)
        self.flush_error = (
            f"{self.name}: /flush_cache refused {c.flush_retries + 1} time(s); last answer: "
            f"{reason}"
            if reason is not None
            else ""
        )
        if reason is not None:
            log.warning(self.flush_error)
        return reason is None

    # -- the update session --------------------------------------------------------------
    def begin_update(self) -> None:
        body = request_body("BeginWeightUpdateReqInput", selector=self.config.selector)
        response = self._request("POST", "/begin_weight_update", body)
        self.legacy = response.status_code == 404
        if self.legacy:
            log.warning(_LEGACY_NOTE.format(url=self.config.url))
            return
        checked(response, "/begin_weight_update")

    # Engine-side staging is built for the vLLM plugin; WeightSync refuses it for SGLang
    # engines when it is built (``_check_wiring``), so these are never reached.
    def open_staging(self, nbytes: int, bound: int) -> None:
        raise ValueError(f"{self.name}: engine-side staging is not built for SGLang engines")

    def stage_bucket(self, bucket: Bucket, ticket: Ticket) -> InFlight:
        raise ValueError(f"{self.name}: engine-side staging is not built for SGLang engines")

    def apply_staged(self, probe=None) -> None:
        raise ValueError(f"{self.name}: engine-side staging is not built for SGLang engines")

    def drop_staged(self) -> None:
        pass  # nothing is ever staged

    def update_bucket(self, bucket: Bucket, ticket: Ticket) -> InFlight:
        """Send the bucket's request; the transport's bytes may go before or after this."""
        if self.config.path == "distributed":
            path, body = "/update_weights_from_distributed", self._distributed_body(bucket)
        else:
            path, body = "/update_weights_from_tensor", self._tensor_body(bucket, ticket)
        return self._submit(path, body, f"{path} (bucket {bucket.index})")

    def end_update(self) -> None:
        if self.legacy:
            return  # no session to close on a pre-0.5.21 server
        self._post("/end_weight_update", request_body("EndWeightUpdateReqInput"))

    def abort_update(self) -> None:
        """Close a session an update could not finish: SGLang's end re-runs the quantized
        layers' post-processing, without which they cannot serve (the engine is stale)."""
        if self.legacy:
            return
        try:
            self._post("/end_weight_update", request_body("EndWeightUpdateReqInput"))
        except RuntimeError as e:
            if "no weight-update session is open" not in str(e):
                raise

    def set_version(self, version: str) -> None:
        # abort_all_requests defaults to True in SGLang; requests paused in place must survive.
        body = request_body(
            "UpdateWeightVersionReqInput", new_version=str(version), abort_all_requests=False
        )
        self._post("/update_weight_version", body)

    def _selector(self) -> str | None:
        return None if self.config.selector == "all" else self.config.selector  # older servers

    def _distributed_body(self, bucket: Bucket) -> dict:
        metas = bucket.metas()  # byte order: exactly SGLang's FlattenedTensorBucket layout
        return request_body(
            "UpdateWeightsFromDistributedReqInput",
            names=[name for name, _, _ in metas],
            dtypes=[dtype_name(dtype) for _, dtype, _ in metas],
            shapes=[list(shape) for _, _, shape in metas],
            group_name=self.group_name,
            load_format="flattened_bucket",
            flush_cache=False,  # flushed once after end_update; a refused flush fails the update
            selector=self._selector(),
        )

    def _tensor_body(self, bucket: Bucket, ticket: Ticket) -> dict:
        if len(ticket.payloads) != self.config.tp_size:
            raise ValueError(
                f"bucket {bucket.index}: {len(ticket.payloads)} payload(s) for "
                f"{self.config.tp_size} TP rank(s); SGLang needs one per rank"
            )
        for rank, payload in enumerate(ticket.payloads):
            check_payload(payload, bucket, rank)
        return request_body(
            "UpdateWeightsFromTensorReqInput",
            serialized_named_tensors=list(ticket.payloads),
            load_format="flattened_bucket",
            flush_cache=False,
            selector=self._selector(),
        )

    # -- joining the transport (data plane) ----------------------------------------------
    def check_link(self, link: Link) -> None:
        if not isinstance(link, BroadcastLink):
            raise ValueError(
                f"engine {self.name!r}: SGLang takes weights over broadcast (or CUDA IPC "
                f"payloads), not {type(link).__name__}: use transport='broadcast' for SGLang"
            )
        if not 1 <= link.rank_offset <= link.world_size - self.config.tp_size:
            raise ValueError(
                f"engine {self.name!r}: rank_offset={link.rank_offset}: its "
                f"{self.config.tp_size} rank(s) must fit in 1..{link.world_size - 1} (rank 0 "
                "is the trainer)"
            )

    def join(self, link: Link) -> InFlight:
        """Join the trainer's broadcast group (``init_group``) under the link's group name,
        which the bucket requests then name. The tensor path takes no link: its payloads
        carry their own handles."""
        self.check_link(link)
        return self.init_group(
            link.master_address,
            link.master_port,
            link.rank_offset,
            link.world_size,
            backend=link.backend,
            group_name=link.group_name,
        )

    def init_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        backend: str = "nccl",
        group_name: str | None = None,
    ) -> InFlight:
        """Ask the engine to join the group; returns at once: the HTTP call only completes
        when the trainer (rank 0) joins too, so build the trainer side, then ``wait``."""
        if not 1 <= rank_offset <= world_size - self.config.tp_size:
            raise ValueError(
                f"rank_offset={rank_offset}: the engine's {self.config.tp_size} "
                f"rank(s) must fit in 1..{world_size - 1} (rank 0 is the trainer)"
            )
        self.group_name = group_name or self.config.group_name
        body = request_body(
            "InitWeightsUpdateGroupReqInput",
            master_address=master_address,
            master_port=master_port,
            rank_offset=rank_offset,
            world_size=world_size,
            group_name=self.group_name,
            backend=backend,
        )
        return self._submit("/init_weights_update_group", body, "/init_weights_update_group")

    def destroy_group(self) -> None:
        body = request_body("DestroyWeightsUpdateGroupReqInput", group_name=self.group_name)
        self._post("/destroy_weights_update_group", body)

    # -- verification --------------------------------------------------------------------
    def live_digests(self, probe) -> dict[str, str]:
        raise ValueError(
            f"{self.name}: SGLang cannot read its weights back through its kernels by HF "
            "name (its checksums are of fused, sharded parameters): WeightSync reports it "
            "as unverified"
        )

    def session_report(self) -> None:
        """SGLang does not say what a session loaded (its loaders count nothing we can ask)."""
        return None

    def aliases(self) -> dict[str, str]:
        return {}

    def unrepairable(self) -> list[str]:
        """SGLang reloads through its own loaders, which post-process what they load."""
        return []

    def adapter_digests(self, name: str, seed: int) -> dict[str, str]:
        raise ValueError(
            f"{self.name}: SGLang cannot read a LoRA adapter back from its kernels' buffers; "
            "WeightSync reports it as unverified"
        )

    def weights_checker(self, action: str = "checksum", skip: list[str] | None = None) -> dict:
        """SGLang's /weights_checker: checksum, or snapshot -> reset_tensors -> compare."""
        body = request_body("CheckWeightsReqInput", action=action, skip_tensor_list=skip)
        return self._post("/weights_checker", body)

    def check_weights(self, expected: Mapping[str, torch.Tensor]) -> list[str]:
        """Names whose engine checksum differs from ``expected`` (SGLang's /weights_checker).

        SGLang hashes its own parameters: fused (qkv_proj, gate_up_proj), TP-sharded and, on
        GPU, with a GPU hash. Only names it reports are compared; none in common is an error.
        """
        engine: dict[str, str] = {}
        for rank in self.weights_checker("checksum").get("ranks") or []:
            engine.update(rank.get("checksums", {}))
        common = [name for name in expected if name in engine]
        if not common:
            raise ValueError(
                f"{self.name}: none of the {len(expected)} expected names appear in "
                "the engine's checksums (fused or sharded names)"
            )
        return [name for name in common if engine[name] != checksum(expected[name])]
