"""The ``weightsync`` weight-transfer backend, created by vLLM's factory inside its worker.

Buckets arrive as flat per-dtype buffers, over a gloo broadcast group or from a persistent
shared-memory ring, and are loaded through vLLM's layerwise reload (start -> load_weights per
bucket -> finish), the same lifecycle as vLLM's NCCL backend. That lifecycle matters on CPU:
the CPU build repacks linear weights for oneDNN after loading, so a bare ``load_weights`` after
start hits zero-sized parameters; layerwise reload restores the checkpoint layout first and
re-runs the repack (e.g. the WNA16 int4 repack) once a layer is complete.

Read-only queries (expected parameters, digests of what was loaded, load timings) are answered
by ``__call__`` and reach the trainer over vLLM's dev ``/collective_rpc`` route as
``{"method": "weight_transfer_engine", "args": [query]}``: the worker resolves the method
name to this object and calls it.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import WeightTransferEngine

from weightsync.engines.vllm_plugin import receive
from weightsync.engines.vllm_plugin.wire import InitInfo, UpdateInfo


class WeightsyncTransferEngine(WeightTransferEngine[InitInfo, UpdateInfo]):
    init_info_cls = InitInfo
    update_info_cls = UpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.source: receive.Source | None = None
        self.record_digests = False
        self.digests: dict[str, str] = {}
        self.timings: list[dict[str, float]] = []
        self._expected: dict[str, list] | None = None

    def init_transfer_engine(self, init_info: InitInfo) -> None:
        self.shutdown()
        self.record_digests = init_info.record_digests
        if init_info.transport == "broadcast":
            self.source = receive.BroadcastSource(init_info)
        else:
            self.source = receive.ShmSource(init_info)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        self.timings = []
        initialize_layerwise_reload(self.model)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class ends with torch.accelerator.synchronize(), which raises on a
        # machine without an accelerator; CPU copies are synchronous anyway.
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: UpdateInfo) -> None:
        if self.source is None:
            raise RuntimeError("weightsync backend: init_weight_transfer_engine was not called")
        t0 = time.perf_counter()
        named = self.source.receive(update_info)
        t1 = time.perf_counter()
        if self.record_digests:
            for name, t in named:
                self.digests[name] = sha256(t)
        self.model.load_weights(named)
        # A layer whose tensors straddle two buckets keeps the first bucket's tensors
        # buffered until it is complete; they are views of a buffer the next bucket
        # overwrites, so give them their own memory.
        receive.unalias_pending(self.model, self.source.buffers())
        self.timings.append(
            {
                "bucket": update_info.bucket,
                "receive_s": t1 - t0,
                "load_s": time.perf_counter() - t1,
                "bytes": sum(t.numel() * t.element_size() for _, t in named),
            }
        )

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        t0 = time.perf_counter()
        finalize_layerwise_reload(self.model, self.model_config)
        self.timings.append({"bucket": -1, "finish_s": time.perf_counter() - t0})

    def shutdown(self) -> None:
        if self.source is not None:
            self.source.close()
            self.source = None

    def __call__(self, query: str) -> dict:
        if query == "expected_params":
            if self._expected is None:
                self._expected = receive.checkpoint_params(self.model_config.model)
            return self._expected
        if query == "digests":
            return dict(self.digests)
        if query == "timings":
            return {"timings": list(self.timings)}
        raise ValueError(f"unknown weightsync query {query!r}: expected_params|digests|timings")


def sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy()).hexdigest()
