"""Network-facing safety of the package, checked on its source (AST, not regex on text):

- no unpickling of bytes (pickle/cloudpickle/marshal ``loads``/``load``, ``torch.load``
  without ``weights_only=True``) outside the one audited place: ``transport/ipc.py``'s
  ``safe=False`` branch for a trusted local process, which no package code selects; engines'
  payloads are opened by SGLang's own SafeUnpickler;
- nothing we start binds a wildcard address by default, and the vLLM launcher guards every
  route with the API key (vLLM's own ``--api-key`` leaves the RL routes open).

The live counterpart (the launched server's listening socket, 401 on /pause without the key)
is in test_faults_engine.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = [ROOT / "weightsync", ROOT / "megatron_bridge"]
UNPICKLERS = {"pickle", "cloudpickle", "marshal", "dill", "_pickle"}
ALLOWED = {("weightsync/transport/ipc.py", "_open")}
"""(file, function) allowed to unpickle: the trusted-local branch, reviewed."""


def _sources():
    for pkg in PACKAGES:
        for path in sorted(pkg.rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text(), str(path))


def _functions(tree: ast.AST):
    """(enclosing function name, call node) for every call in the module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Call):
                    yield node.name, inner
    for node in tree.body:  # module-level calls
        for inner in ast.walk(node):
            if isinstance(inner, ast.Call) and not isinstance(node, ast.FunctionDef):
                yield "<module>", inner


def _dotted(func: ast.expr) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _unsafe(call: ast.Call) -> str | None:
    name = _dotted(call.func)
    head, _, attr = name.rpartition(".")
    if head in UNPICKLERS and attr in ("loads", "load", "Unpickler"):
        return name
    if name == "torch.load":
        weights_only = next((k.value for k in call.keywords if k.arg == "weights_only"), None)
        if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
            return "torch.load without weights_only=True"
    return None


def test_no_network_input_is_unpickled_outside_the_audited_branch():
    found = [
        f"{path}:{call.lineno} in {fn}(): {what}"
        for path, tree in _sources()
        for fn, call in _functions(tree)
        if (what := _unsafe(call)) and (path, fn) not in ALLOWED
    ]
    assert not found, "unpickling outside the audited places:\n" + "\n".join(found)


def test_the_plain_pickle_branch_is_never_selected_by_package_code():
    selected = [
        f"{path}:{call.lineno}"
        for path, tree in _sources()
        for _, call in _functions(tree)
        if _dotted(call.func).endswith("decode_payload")
        and any(
            k.arg == "safe" and not (isinstance(k.value, ast.Constant) and k.value.value is True)
            for k in call.keywords
        )
    ]
    assert not selected, f"decode_payload(safe=...) not True at {selected}"


def test_no_wildcard_bind_by_default():
    wild = [
        f"{path}:{node.lineno}"
        for path, tree in _sources()
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value in ("0.0.0.0", "::")
    ]
    assert not wild, f"wildcard bind addresses in the package: {wild}"


def test_vllm_launcher_defaults_to_loopback_and_guards_every_route(tmp_path, monkeypatch):
    from weightsync.engines.vllm_launcher import VllmServer, VllmServerConfig

    (tmp_path / "config.json").write_text("{}")
    server = VllmServer(VllmServerConfig(model_dir=str(tmp_path), log_path="l", api_key="k"))
    cmd = server.command()
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--middleware") + 1].endswith("GuardAllRoutes")
    assert "k" not in cmd[cmd.index("--middleware") :]
    assert "k" not in cmd and "--api-key" not in cmd  # /proc/<pid>/cmdline is world-readable
    assert server.env()["WEIGHTSYNC_API_KEY"] == server.env()["VLLM_API_KEY"] == "k"


@pytest.mark.parametrize(
    ("path", "header", "status"),
    [
        ("/pause", None, 401),
        ("/update_weights", b"Bearer wrong", 401),
        ("/collective_rpc", b"Bearer k", 200),
        ("/health", None, 200),
    ],
)
def test_guard_middleware_answers_401_without_the_key(monkeypatch, path, header, status):
    import asyncio

    from weightsync.engines.vllm_plugin.auth import GuardAllRoutes

    monkeypatch.setenv("WEIGHTSYNC_API_KEY", "k")
    sent: list[dict] = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def send(message):
        sent.append(message)

    headers = [(b"authorization", header)] if header else []
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
    asyncio.run(GuardAllRoutes(app)(scope, None, send))
    assert sent[0]["status"] == status


def test_guard_middleware_accepts_a_non_ascii_key(monkeypatch):
    import asyncio

    from weightsync.engines.vllm_plugin.auth import GuardAllRoutes

    monkeypatch.setenv("WEIGHTSYNC_API_KEY", "clé-ü-鍵")
    statuses: list[int] = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def send(message):
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    for token in ("clé-ü-鍵".encode(), b"cle-u"):
        headers = [(b"authorization", b"Bearer " + token)]
        scope = {"type": "http", "method": "POST", "path": "/pause", "headers": headers}
        asyncio.run(GuardAllRoutes(app)(scope, None, send))
    assert statuses == [200, 401]


def test_launcher_refuses_a_port_another_process_answers_on(tmp_path):
    import sys
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from weightsync.engines.vllm_launcher import VllmServer, VllmServerConfig

    class Impostor(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    # The port the launcher picked, taken by someone else before vLLM could bind it.
    impostor = ThreadingHTTPServer(("127.0.0.1", 0), Impostor)
    threading.Thread(target=impostor.serve_forever, daemon=True).start()

    class NeverBinds(VllmServer):
        def command(self):
            return [sys.executable, "-c", "import time; time.sleep(60)"]

    (tmp_path / "config.json").write_text("{}")
    cfg = VllmServerConfig(
        model_dir=str(tmp_path),
        log_path=str(tmp_path / "log"),
        port=impostor.server_address[1],
        weight_transfer_backend=None,
        startup_timeout_s=30,
    )
    server = NeverBinds(cfg)
    try:
        with pytest.raises(RuntimeError, match="held by another process"):
            server.start()
        assert not server.alive()  # and what it started is stopped again
    finally:
        impostor.shutdown()
