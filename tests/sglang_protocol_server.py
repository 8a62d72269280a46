"""TEST FIXTURE, NOT A PRODUCT: an HTTP stand-in for an SGLang 0.5.23 server, for CPU tests.

SGLang's server cannot run on CPU, so the SGLang adapter is tested against this process. It is
assembled from SGLang's own importable receiver pieces: the io_struct request structs (bodies
validated the way FastAPI does, 422 on a bad body), ``init_custom_process_group`` for the update
group, ``FlattenedTensorBucket`` to rebuild received buffers and ``MultiprocessingSerializer``
(SafeUnpickler) for the tensor path. The server starts from a tiny transformers Qwen2
checkpoint; its TP ranks are processes of their own (``sglang_fixture_ranks``), each joining
the group, receiving every bucket and keeping its shard by HF name, as SGLang's are. Endpoint
semantics follow SGLang 0.5.23's HTTP server: session gating, pause modes, flush refusals,
weight_version in /model_info, and a tensor-path failure "kills the scheduler" (every later
call answers 503), as the real server's uncaught exceptions do. Runtime LoRA adapters
(``/load_lora_adapter``, ``/unload_lora_adapter``) live in ``sglang_fixture_lora``. Test-only
endpoints live under /_test/ and skip auth.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.abc
import importlib.machinery
import json
import multiprocessing as mp
import multiprocessing.connection
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import requests
import torch

from tests.models import tiny_config
from tests.sglang_fixture_lora import LoraAdapters, LoraServing
from tests.sglang_fixture_ranks import RankError, Ranks, rank_main

_DISTRIBUTED_FAIL = "Failed to update parameter online: {} The full weights of the ModelRunner are "
_FLUSH_REFUSED = "Weights were updated, but the cache was not flushed because requests are still "


class _PermissiveModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _stub_module(f"{self.__name__}.{name}")

    def __call__(self, *args, **kwargs):
        return self

    def __mro_entries__(self, bases):
        return (object,)


def _stub_module(name: str) -> _PermissiveModule:
    if name not in sys.modules:
        module = _PermissiveModule(name)
        module.__path__ = []
        module.__version__ = "0.0.0"  # transformers parses it; below every version it gates on
        sys.modules[name] = module
    return sys.modules[name]


class _TorchvisionStubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] != "torchvision":
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        return _stub_module(spec.name)

    def exec_module(self, module):
        pass


@contextlib.contextmanager
def torchvision_stub() -> Iterator[None]:
    """Within the block, ``import torchvision`` yields a permissive stub. Tests only.

    ``sglang.srt.managers.io_struct`` reaches ``torchvision.transforms`` through a multimodal
    config import chain; the PyPI torchvision is built against CUDA torch and breaks here.
    Nothing in the weight-update structs touches torchvision. On exit the
    stub is removed again, so other code in the process still sees no torchvision.
    """
    finder = _TorchvisionStubFinder()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        import_utils = sys.modules.get("transformers.utils.import_utils")
        for fn in ("is_torchvision_v2_available", "is_torchvision_greater_or_equal"):
            getattr(getattr(import_utils, fn, None), "cache_clear", lambda: None)()


def import_io_struct() -> types.ModuleType:
    """SGLang's request structs, imported once under the torchvision stub."""
    with torchvision_stub():
        from sglang.srt.managers import io_struct
    return io_struct


def tiny_qwen2(seed: int = 0, **overrides) -> torch.nn.Module:
    from transformers import Qwen2ForCausalLM

    # Narrower than the tiny default: the dims the SGLang adapter tests size their buckets for.
    config = tiny_config(
        "qwen2",
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        **overrides,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16).eval()
    for name, param in model.named_parameters():
        if "norm" in name:  # fp32 norms make every bucket mixed-dtype, as in RL checkpoints
            param.data = param.data.float()
    return model


@dataclass
class Reply:
    status: int
    body: object  # dict -> JSON, str -> text/plain, bytes -> octet-stream


def _ok(message: str, **extra) -> Reply:
    return Reply(200, {"success": True, "message": message, **extra})


def _fail(message: str) -> Reply:
    return Reply(400, {"success": False, "message": message})


class FakeSGLangEngine:
    """Engine state. One lock serialises control calls, like SGLang's single scheduler loop;
    the weights live in the TP rank processes behind ``conns``."""

    def __init__(
        self,
        model_dir: str,
        seed: int,
        conns: list[mp.connection.Connection],
        lora: LoraServing | None = None,
    ) -> None:
        import pydantic
        from safetensors.torch import save_file

        self.io, self.adapter = import_io_struct(), pydantic.TypeAdapter
        # The "checkpoint the server was launched from": /model_info reports its directory.
        self.model_dir = model_dir
        checkpoint = os.path.join(model_dir, "model.safetensors")
        if not os.path.exists(checkpoint):  # else the test's own, copied in by ProtocolServer
            save_file(tiny_qwen2(seed).state_dict(), checkpoint)
        self.ranks = Ranks(conns, model_dir)
        self.loras = LoraAdapters(self.io, lora, checkpoint)
        self.tp_size = len(conns)
        self.lock = threading.Lock()
        self.groups: set[str] = set()
        self.reset()

    def reset(self) -> None:
        self.ranks.run_all("reset")
        self.loras.reset()
        self.version, self.paused, self.session, self.dead = "default", None, None, None
        self.running = self.waiting = self.busy_flushes = 0
        self.api_key: str | None = None
        self.legacy = False
        self.log: list[dict] = []

    def refuse_rank(self, rank: int | None) -> None:
        """Test fault: TP rank ``rank`` receives updates but refuses to load them."""
        self.ranks.run("set_refuse", [{"refuse": r == rank} for r in range(self.tp_size)])

    def parse(self, struct: str, raw: bytes):
        return self.adapter(getattr(self.io, struct)).validate_json(raw or b"null")

    # -- generation control --------------------------------------------------------------
    def pause_generation(self, req) -> Reply:
        self.paused = req.mode
        if req.mode == "abort":
            self.running = 0
        elif req.mode == "retract":
            self.running, self.waiting = 0, self.waiting + self.running
        return Reply(200, {"message": "Generation paused successfully.", "status": "ok"})

    def continue_generation(self, req) -> Reply:
        self.paused, self.running, self.waiting = None, self.running + self.waiting, 0
        return Reply(200, {"message": "Generation continued successfully.", "status": "ok"})

    def flush_cache(self, timeout_s: float) -> Reply:
        idle = self.running == 0 and (self.waiting == 0 or self.paused in ("retract", "in_place"))
        if self.busy_flushes > 0 or not idle:
            self.busy_flushes = max(0, self.busy_flushes - 1)
            message = "Timed out waiting for idle state." if timeout_s > 0 else ""
            return Reply(400, message or "Flush cache failed.\n")
        return Reply(200, "Cache flushed.\nPlease check backend logs for more details.\n")

    # -- session -------------------------------------------------------------------------
    def begin_weight_update(self, req) -> Reply:
        if self.session is not None:
            return _fail("a weight-update session is already open; call end_weight_update() first")
        self.session = {"selector": req.selector, "loaded": False}
        return _ok("Weight update session started.")

    def end_weight_update(self, req) -> Reply:
        if self.session is None:
            return _fail("no weight-update session is open; call begin_weight_update() first")
        self.session = None
        return _ok("Weight update session finished.")

    def _gate(self, what: str) -> Reply | None:
        if self.session is None and not self.legacy:
            return _fail(f"{what} must run between begin_weight_update() and end_weight_update()")
        return None

    def _finish_update(self, req, message: str) -> Reply:
        if self.session is not None:
            self.session["loaded"] = True
        if req.weight_version is not None:
            self.version = req.weight_version
            message += f" Weight version updated to {req.weight_version}."
        if req.flush_cache and self.flush_cache(0).status != 200:
            return _fail(_FLUSH_REFUSED + "running or queued.")
        return _ok(message)

    # -- distributed path ----------------------------------------------------------------
    # Any rank's failure fails the request (SGLang answers with TP rank 0's result): stricter,
    # so that a test sees a rank that went wrong.
    def init_weights_update_group(self, req) -> Reply:
        try:
            self.ranks.run_all(
                "init_group",
                master_address=req.master_address,
                master_port=req.master_port,
                world_size=req.world_size,
                rank_offset=req.rank_offset,
                group_name=req.group_name,
                backend=req.backend,
            )
        except RankError as e:  # reported to the client like SGLang does
            return _fail(f"Failed to initialize custom process group: {e}.")
        self.groups.add(req.group_name)
        return _ok("Succeeded to initialize custom process group.")

    def destroy_weights_update_group(self, req) -> Reply:
        if req.group_name not in self.groups:
            return _fail("The group to be destroyed does not exist.")
        self.groups.remove(req.group_name)
        self.ranks.run_all("destroy_group", group_name=req.group_name)
        return _ok("Succeeded to destroy custom process group.")

    def update_weights_from_distributed(self, req) -> Reply:
        if (refused := self._gate("update_weights_from_distributed")) is not None:
            return refused
        try:
            self.ranks.run_all(
                "receive",
                names=req.names,
                dtypes=req.dtypes,
                shapes=req.shapes,
                group_name=req.group_name,
                load_format=req.load_format,
            )
        except RankError as e:
            return _fail(_DISTRIBUTED_FAIL.format(e) + "partially updated.")
        return self._finish_update(req, "Succeeded to update parameter online.")

    # -- tensor path ---------------------------------------------------------------------
    def update_weights_from_tensor(self, req) -> Reply:
        if (refused := self._gate("update_weights_from_tensor")) is not None:
            return refused
        # Uncaught in SGLang's scheduler: any failure from here on kills the server.
        try:
            payloads = [req.serialized_named_tensors[rank] for rank in range(self.tp_size)]
            per_rank = [{"payload": p, "load_format": req.load_format} for p in payloads]
            self.ranks.run("load_payload", per_rank)  # each rank opens only its own payload
        except Exception as e:  # noqa: BLE001
            self.dead = f"Scheduler hit an exception: {type(e).__name__}: {e}"
            return Reply(500, {"error": {"message": self.dead}})
        return self._finish_update(req, "Success")

    # -- LoRA adapters ---------------------------------------------------------------------
    def load_lora_adapter(self, req) -> Reply:
        return self._lora_reply(self.loras.load(req))

    def load_lora_adapter_from_tensors(self, req) -> Reply:
        from tests.sglang_fixture_ranks import open_payload

        if self.loras.serving is None:  # the tokenizer manager refuses before any rank opens
            return self._lora_reply(self.loras.load_tensors(req, []))
        try:
            opened = [open_payload(p, req.load_format) for p in req.serialized_named_tensors]
        except Exception as e:  # noqa: BLE001 - a rank that cannot open its payload says so
            return self._lora_reply(self.loras._answer(f"{type(e).__name__}: {e}"))
        if len(opened) != self.tp_size:
            return self._lora_reply(self.loras._answer("fixture: one payload per TP rank"))
        return self._lora_reply(self.loras.load_tensors(req, opened))

    def unload_lora_adapter(self, req) -> Reply:
        return self._lora_reply(self.loras.unload(req))

    @staticmethod
    def _lora_reply(result) -> Reply:
        from sglang.srt.utils.msgspec_utils import msgspec_to_builtins

        return Reply(200 if result.success else 400, msgspec_to_builtins(result))

    # -- version and checks --------------------------------------------------------------
    def update_weight_version(self, req) -> Reply:
        if req.abort_all_requests:
            self.running = self.waiting = 0
        self.version = req.new_version
        return _ok(f"Weight version updated to {req.new_version}", new_version=req.new_version)

    def model_info(self) -> Reply:
        return Reply(
            200,
            {
                "model_path": self.model_dir,
                "served_model_name": "tiny-qwen2",
                "weight_version": self.version,
                "load_format": "auto",
            },
        )

    def weights_checker(self, req) -> Reply:
        if req.action != "checksum":
            return _fail(f"action {req.action!r} is not implemented by the test fixture")
        # Over the reassembled HF tensors: SGLang's own are of fused, sharded parameters.
        sums = {
            k: hashlib.sha256(v.contiguous().view(torch.uint8).numpy()).digest()[:8].hex()
            for k, v in self.ranks.state().items()
        }
        return _ok("ok", ranks=[{"checksums": sums, "parallelism_info": []}])

    def state_bytes(self) -> bytes:
        from safetensors.torch import save

        return save({k: v.contiguous() for k, v in self.ranks.state().items()})

    def lora_bytes(self, name: str) -> Reply:
        """The tensors of loaded adapter ``name``, as it read them."""
        from safetensors.torch import save

        if name not in self.loras.loaded:
            return Reply(404, f"adapter {name!r} is not loaded")
        return Reply(200, save(self.loras.loaded[name][1]))


# path -> (request struct or None, handler name); all update endpoints take a JSON body.
_ROUTES = {
    "/pause_generation": ("PauseGenerationReqInput", "pause_generation"),
    "/continue_generation": ("ContinueGenerationReqInput", "continue_generation"),
    "/begin_weight_update": ("BeginWeightUpdateReqInput", "begin_weight_update"),
    "/end_weight_update": ("EndWeightUpdateReqInput", "end_weight_update"),
    "/init_weights_update_group": ("InitWeightsUpdateGroupReqInput", "init_weights_update_group"),
    "/destroy_weights_update_group": (
        "DestroyWeightsUpdateGroupReqInput",
        "destroy_weights_update_group",
    ),
    "/update_weights_from_distributed": (
        "UpdateWeightsFromDistributedReqInput",
        "update_weights_from_distributed",
    ),
    "/update_weights_from_tensor": (
        "UpdateWeightsFromTensorReqInput",
        "update_weights_from_tensor",
    ),
    "/update_weight_version": ("UpdateWeightVersionReqInput", "update_weight_version"),
    "/weights_checker": ("CheckWeightsReqInput", "weights_checker"),
    "/load_lora_adapter": ("LoadLoRAAdapterReqInput", "load_lora_adapter"),
    "/unload_lora_adapter": ("UnloadLoRAAdapterReqInput", "unload_lora_adapter"),
    "/load_lora_adapter_from_tensors": (
        "LoadLoRAAdapterFromTensorsReqInput",
        "load_lora_adapter_from_tensors",
    ),
}
_LEGACY_ABSENT = ("/begin_weight_update", "/end_weight_update")


def _summarise(raw: bytes) -> object:
    try:
        body = json.loads(raw) if raw else None
    except ValueError:
        return "<invalid json>"
    if isinstance(body, dict) and "serialized_named_tensors" in body:
        body = {
            **body,
            "serialized_named_tensors": [len(p) for p in body["serialized_named_tensors"]],
        }
    return body


class _Handler(BaseHTTPRequestHandler):
    engine: FakeSGLangEngine  # set on the subclass built in serve()

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        url = urlparse(self.path)
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if url.path.startswith("/_test/"):
            return self._send(self._test_endpoint(url.path, raw))
        engine = self.engine
        with engine.lock:
            engine.log.append(
                {
                    "method": self.command,
                    "path": url.path,
                    "query": url.query,
                    "auth": self.headers.get("Authorization"),
                    "body": _summarise(raw),
                }
            )
            self._send(self._control(url, raw))

    def _control(self, url, raw: bytes) -> Reply:
        engine = self.engine
        if engine.dead:
            return Reply(503, {"error": {"message": engine.dead}})
        if engine.api_key and self.headers.get("Authorization") != f"Bearer {engine.api_key}":
            return Reply(401, {"error": "Unauthorized"})
        if url.path == "/health":
            return Reply(200, "")
        if url.path == "/model_info":
            return engine.model_info()
        if url.path == "/server_info":  # SGLang reports its resolved server args here
            return Reply(200, {"tp_size": engine.tp_size, "pp_size": 1, "dp_size": 1})
        if url.path == "/flush_cache":
            return engine.flush_cache(float(parse_qs(url.query).get("timeout", ["0"])[0]))
        if url.path not in _ROUTES or (engine.legacy and url.path in _LEGACY_ABSENT):
            return Reply(404, {"detail": "Not Found"})
        struct, handler = _ROUTES[url.path]
        try:
            req = engine.parse(struct, raw)
        except Exception as e:  # noqa: BLE001 - FastAPI turns validation errors into 422
            return Reply(422, {"detail": str(e)})
        return getattr(engine, handler)(req)

    def _test_endpoint(self, path: str, raw: bytes) -> Reply:
        engine = self.engine
        with engine.lock:
            if path == "/_test/state":
                try:
                    return Reply(200, engine.state_bytes())
                except (RankError, ValueError) as e:  # e.g. replicas that disagree
                    return Reply(409, str(e))
            if path == "/_test/log":
                return Reply(200, {"log": engine.log})
            if path == "/_test/lora":
                return engine.lora_bytes(json.loads(raw)["name"])
            if path == "/_test/reset":
                engine.reset()
            elif path == "/_test/set":
                for key, value in json.loads(raw).items():
                    if key == "refuse_rank":
                        engine.refuse_rank(value)
                        continue
                    if key in ("refuse_lora", "enable_lora", "max_lora_rank"):
                        engine.loras.set(key, value)
                        continue
                    assert key in ("api_key", "legacy", "running", "waiting", "busy_flushes"), key
                    setattr(engine, key, value)
            else:
                return Reply(404, {"detail": "Not Found"})
            return Reply(
                200,
                {
                    "paused": engine.paused,
                    "session": engine.session,
                    "version": engine.version,
                    "dead": engine.dead,
                    "running": engine.running,
                    "waiting": engine.waiting,
                    "loras": engine.loras.paths(),
                },
            )

    def _send(self, reply: Reply) -> None:
        body, ctype = reply.body, "application/json"
        if isinstance(body, bytes):
            ctype = "application/octet-stream"
        elif isinstance(body, str):
            body, ctype = body.encode(), "text/plain"
        else:
            body = json.dumps(body).encode()
        self.send_response(reply.status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def serve(
    ready: mp.Queue, model_dir: str, seed: int, conns: list, lora: LoraServing | None
) -> None:
    """Process entry point: bind 127.0.0.1 on a free port, report it, serve until killed."""
    engine = FakeSGLangEngine(model_dir, seed, conns, lora)
    handler = type("Handler", (_Handler,), {"engine": engine})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    ready.put(server.server_address[1])
    server.serve_forever()


class ProtocolServer:
    """Test-side handle: starts ``serve`` and its TP rank processes, reads its test endpoints.

    Spawned by multiprocessing so the children share this process's authkey: torch shares CPU
    tensors by file descriptor through multiprocessing's resource sharer, which checks it. The
    ranks are the server's siblings, not its children: a daemonic process cannot have any.
    """

    def __init__(
        self,
        seed: int = 0,
        tp_size: int = 1,
        start_timeout_s: float = 120,
        checkpoint: str | None = None,
        lora: LoraServing | None = None,
    ) -> None:
        """``checkpoint``: a safetensors file to serve instead of ``tiny_qwen2(seed)``;
        ``lora``: serve runtime LoRA adapters (else SGLang's "not enabled" answers)."""
        ctx = mp.get_context("spawn")
        ready = ctx.Queue()
        self.model_dir = tempfile.mkdtemp(prefix="sglang-fixture-")
        if checkpoint:
            shutil.copy(checkpoint, os.path.join(self.model_dir, "model.safetensors"))
        pipes = [ctx.Pipe() for _ in range(tp_size)]
        self.ranks = [
            ctx.Process(target=rank_main, args=(child, rank, tp_size), daemon=True)
            for rank, (_, child) in enumerate(pipes)
        ]
        args = (ready, self.model_dir, seed, [server_end for server_end, _ in pipes], lora)
        self.process = ctx.Process(target=serve, args=args, daemon=True)
        for process in (*self.ranks, self.process):
            process.start()
        for conn in (c for pipe in pipes for c in pipe):  # the children hold their own copies
            conn.close()
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                self.url = f"http://127.0.0.1:{ready.get(timeout=1)}"
                return
            except queue.Empty:
                if not self.process.is_alive() or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("SGLang protocol server did not start") from None

    def _call(self, path: str, body: dict | None = None) -> requests.Response:
        response = requests.post(self.url + path, json=body or {}, timeout=30)
        if not response.ok:
            raise RuntimeError(f"{path}: HTTP {response.status_code}: {response.text}")
        return response

    def reset(self) -> dict:
        return self._call("/_test/reset").json()

    def set(self, **fields) -> dict:
        return self._call("/_test/set", fields).json()

    def status(self) -> dict:
        return self._call("/_test/set", {}).json()

    def log(self) -> list[dict]:
        return self._call("/_test/log").json()["log"]

    def paths(self) -> list[str]:
        return [entry["path"] for entry in self.log()]

    def state(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load

        return load(self._call("/_test/state").content)

    def loras(self) -> dict[str, str]:
        """Loaded adapters: name -> the path each was loaded from."""
        return self.status()["loras"]

    def lora(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load

        return load(self._call("/_test/lora", {"name": name}).content)

    def stop(self) -> None:
        for process in (self.process, *self.ranks):
            process.kill()
            process.join(timeout=10)
        shutil.rmtree(self.model_dir, ignore_errors=True)
