"""Rollouts from an inference engine over its HTTP API: token ids in, token ids + logprobs out.

vLLM: ``/inference/v1/generate`` (``vllm serve --enable-scale-out``) takes token ids with no
tokenizer and reports, per sample, the weight versions its tokens were generated with.
SGLang: ``/generate`` with ``input_ids``; ``meta_info.weight_versions`` spans per sample
(not exercised on CPU: no SGLang server runs here).
Prompts are sent concurrently, one request per prompt with ``n`` samples; ``submit`` returns
at once (the async loop generates the next step's rollouts while the trainer steps).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import requests

from weightsync.config import DEFAULT_TIMEOUT_S


@dataclass(frozen=True, slots=True)
class Sample:
    prompt: list[int]
    tokens: list[int]
    logprobs: list[float]
    """The engine's log p of each sampled token (temperature 1)."""
    token_versions: list[str]
    """The engine's weight version each token was sampled with: an update that lands while
    a request runs (an ``in_place`` pause) switches the versions mid-sample."""

    @property
    def weight_version(self) -> str | None:
        """The one weight version of the whole sample; None when it spans an update."""
        return one_version(self.token_versions)


def one_version(versions: Iterable[str | None]) -> str | None:
    """The version all of ``versions`` share; None when they differ."""
    distinct = set(versions)
    return distinct.pop() if len(distinct) == 1 else None


class PendingRollouts:
    """Rollouts submitted to the client's pool; ``result()`` waits for them and checks them."""

    def __init__(self, futures: list[Future], max_tokens: int, engine: str, timeout_s: float):
        self._futures, self._max_tokens, self._engine = futures, max_tokens, engine
        self._t0 = time.perf_counter()
        self._deadline = time.monotonic() + timeout_s
        self._ends: list[float] = []
        for f in futures:
            # When each request answered: generation time, however late the loop collects.
            f.add_done_callback(lambda _: self._ends.append(time.perf_counter()))

    @property
    def generation_s(self) -> float:
        """From submission to the last answer (so far)."""
        return max(self._ends, default=time.perf_counter()) - self._t0

    def result(self) -> list[list[Sample]]:
        """``n`` samples per prompt, each exactly ``max_tokens`` long (EOS ignored)."""
        groups = [
            f.result(timeout=max(0.0, self._deadline - time.monotonic())) for f in self._futures
        ]
        for group in groups:
            for s in group:
                # Fixed lengths keep the batch rectangular; an engine ignoring min/ignore_eos
                # would silently misalign tokens and logprobs.
                if len(s.tokens) != self._max_tokens or len(s.logprobs) != self._max_tokens:
                    raise RuntimeError(
                        f"{self._engine} returned {len(s.tokens)} tokens and {len(s.logprobs)} "
                        f"logprobs for a sample, asked for exactly {self._max_tokens}"
                    )
        return groups


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
        return self.submit(prompts, n, max_tokens, seed).result()

    def submit(
        self, prompts: Sequence[Sequence[int]], n: int, max_tokens: int, seed: int
    ) -> PendingRollouts:
        """``generate`` without waiting: the requests run on the client's pool."""
        one = self._vllm if self.engine == "vllm" else self._sglang
        futures = [
            self._pool.submit(one, list(p), n, max_tokens, seed + i) for i, p in enumerate(prompts)
        ]
        return PendingRollouts(futures, max_tokens, self.engine, self.timeout_s)

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
            tokens = list(choice["token_ids"])
            if self.adapter:
                # vLLM computes with exactly the adapter asked for: its version is every token's.
                versions = [_adapter_version(self.adapter)] * len(tokens)
            else:
                request = f"vllm request {out.get('request_id')} choice {choice.get('index')}"
                versions = token_versions(choice.get("weight_versions"), len(tokens), request)
            samples.append(Sample(prompt, tokens, lps, versions))
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
            if not spans and meta.get("weight_version") is not None:
                # An SGLang without per-token spans: its one label covers the sample.
                spans = [{"version": meta["weight_version"], "start": 0, "end": len(tokens)}]
            request = f"sglang request {meta.get('id')}"
            versions = token_versions(spans, len(tokens), request)
            samples.append(Sample(prompt, tokens, lps, versions))
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


def token_versions(spans: Sequence[Mapping] | None, num_tokens: int, request: str) -> list[str]:
    """One weight version per output token, from the engine's spans ``{version, start, end}``
    (output tokens ``[start, end)``; vLLM's ``WeightVersionSpan``, SGLang's
    ``meta_info.weight_versions``). RuntimeError naming ``request`` unless the spans cover
    every token exactly once: a token of unknown version would hide its staleness."""
    versions: list[str | None] = [None] * num_tokens
    for span in spans or []:
        start, end = span["start"], span["end"]
        if not (type(start) is int and type(end) is int and 0 <= start <= end <= num_tokens):
            raise RuntimeError(
                f"{request}: weight_versions span {dict(span)} is outside its {num_tokens} "
                "output tokens"
            )
        if any(v is not None for v in versions[start:end]):
            raise RuntimeError(f"{request}: weight_versions spans overlap at {dict(span)}")
        versions[start:end] = [str(span["version"])] * (end - start)
    missing = [i for i, v in enumerate(versions) if v is None]
    if missing:
        raise RuntimeError(
            f"{request}: weight_versions {list(spans or [])} leave output tokens {missing} "
            f"of {num_tokens} without a version"
        )
    return [v for v in versions if v is not None]


def _adapter_version(name: str) -> str:
    """'7' for 'policy@v7' (``weightsync.config.LoraSync.served_name``)."""
    return name.rpartition("@v")[2]
