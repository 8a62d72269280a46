"""Rollouts from an inference engine over its HTTP API: token ids in, token ids + logprobs out.

vLLM: ``/inference/v1/generate`` (``vllm serve --enable-scale-out``) takes token ids with no
tokenizer and reports, per sample, the weight versions its tokens were generated with.
SGLang: ``/generate`` with ``input_ids``; ``meta_info.weight_versions`` spans per sample
(not exercised on CPU: no SGLang server runs here).
Prompts are sent concurrently, one request per prompt with ``n`` samples.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import requests

from weightsync.config import DEFAULT_TIMEOUT_S


@dataclass(frozen=True, slots=True)
class Sample:
    prompt: list[int]
    tokens: list[int]
    logprobs: list[float]
    """The engine's log p of each sampled token (temperature 1)."""
    weight_version: str | None
    """The engine's weight version for the whole sample (None if it reported several)."""


class RolloutClient:
    def __init__(
        self,
        url: str,
        engine: str = "vllm",
        api_key: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        if engine not in ("vllm", "sglang"):
            raise ValueError(f"engine={engine!r}: one of ('vllm', 'sglang')")
        self.url, self.engine, self.timeout_s = url.rstrip("/"), engine, timeout_s
        self._http = requests.Session()
        if api_key:
            self._http.headers["Authorization"] = f"Bearer {api_key}"
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="rollout")
        self.adapter: str | None = None
        """The LoRA adapter rollouts ask for (``<name>@v<version>``); None: the base."""

    def generate(
        self, prompts: Sequence[Sequence[int]], n: int, max_tokens: int, seed: int
    ) -> list[list[Sample]]:
        """``n`` samples per prompt, each exactly ``max_tokens`` long (EOS ignored)."""
        one = self._vllm if self.engine == "vllm" else self._sglang
        futures = [
            self._pool.submit(one, list(p), n, max_tokens, seed + i) for i, p in enumerate(prompts)
        ]
        deadline = time.monotonic() + self.timeout_s
        groups = [f.result(timeout=max(0.0, deadline - time.monotonic())) for f in futures]
        for group in groups:
            for s in group:
                # Fixed lengths keep the batch rectangular; an engine ignoring min/ignore_eos
                # would silently misalign tokens and logprobs.
                if len(s.tokens) != max_tokens or len(s.logprobs) != max_tokens:
                    raise RuntimeError(
                        f"{self.engine} returned {len(s.tokens)} tokens and {len(s.logprobs)} "
                        f"logprobs for a sample, asked for exactly {max_tokens}"
                    )
        return groups

    def _post(self, path: str, body: dict) -> dict:
        r = self._http.post(self.url + path, json=body, timeout=self.timeout_s)
        if r.status_code != 200:
            raise RuntimeError(f"{self.engine} {path} -> HTTP {r.status_code}: {r.text[:2000]}")
        return r.json()

    def _vllm(self, prompt: list[int], n: int, max_tokens: int, seed: int) -> list[Sample]:
        params = {
            "n": n,
            "max_tokens": max_tokens,
            "min_tokens": max_tokens,
            "temperature": 1.0,
            "logprobs": 0,
            "ignore_eos": True,
            "seed": seed,
        }
        body = {"token_ids": prompt, "sampling_params": params, "model": self.adapter}
        out = self._post("/inference/v1/generate", body)
        samples = []
        for choice in out["choices"]:
            lps = [entry["logprob"] for entry in choice["logprobs"]["content"]]
            # vLLM computes with exactly the adapter asked for: its version is the sample's.
            stamped = _single(choice.get("weight_versions") or [])
            version = _adapter_version(self.adapter) if self.adapter else stamped
            samples.append(Sample(prompt, list(choice["token_ids"]), lps, version))
        return samples

    def _sglang(self, prompt: list[int], n: int, max_tokens: int, seed: int) -> list[Sample]:
        params = {
            "n": n,
            "max_new_tokens": max_tokens,
            "min_new_tokens": max_tokens,
            "temperature": 1.0,
            "ignore_eos": True,
            "sampling_seed": seed,
        }
        body = {"input_ids": prompt, "sampling_params": params, "return_logprob": True}
        out = self._post("/generate", body)
        samples = []
        for item in out if isinstance(out, list) else [out]:
            meta = item["meta_info"]
            # output_token_logprobs: [(logprob, token_id, text), ...]
            lps = [float(e[0]) for e in meta["output_token_logprobs"]]
            tokens = [int(e[1]) for e in meta["output_token_logprobs"]]
            spans = meta.get("weight_versions")
            version = _single(spans) if spans else meta.get("weight_version")
            samples.append(Sample(prompt, tokens, lps, version))
        return samples

    def newest_adapter(self) -> str | None:
        """The newest version of the adapters the engine lists (vLLM /v1/models)."""
        r = self._http.get(self.url + "/v1/models", timeout=self.timeout_s)
        r.raise_for_status()
        loaded = [m["id"] for m in r.json()["data"] if m.get("parent")]
        versions = sorted(int(v) for v in map(_adapter_version, loaded) if v.isdigit())
        return str(versions[-1]) if versions else None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()


def _single(spans: list[dict]) -> str | None:
    """The one weight version of a sample's token spans; None when an update landed mid-sample."""
    versions = {span["version"] for span in spans}
    return versions.pop() if len(versions) == 1 else None


def _adapter_version(name: str) -> str:
    """'7' for 'policy@v7' (``weightsync.config.LoraSync.served_name``)."""
    return name.rpartition("@v")[2]
