"""API-key guard for EVERY route of a vLLM server we launch, loaded with ``--middleware``.

vLLM's own ``--api-key`` guards only /v1, /v2, /inference and /cohere: the RL routes that
pause the engine, open weight-transfer groups and rewrite its weights (/pause,
/init_weight_transfer_engine, /update_weights, /collective_rpc ...) stay open to anyone who
reaches the port. This guard asks for the same bearer token on all paths but the liveness
probes. The key comes from ``WEIGHTSYNC_API_KEY`` in the server's environment (set by the
launcher), so it never appears on a command line.
"""

from __future__ import annotations

import hashlib
import hmac
import os

ENV_KEY = "WEIGHTSYNC_API_KEY"
OPEN_PATHS = ("/health", "/ping")


class GuardAllRoutes:
    """Pure ASGI middleware; vLLM adds it with ``app.add_middleware(GuardAllRoutes)``."""

    def __init__(self, app) -> None:
        self.app = app
        key = os.environ.get(ENV_KEY, "")
        self._digest = hashlib.sha256(key.encode()).digest() if key else None

    def _authorized(self, scope) -> bool:
        # Bytes throughout: ASGI hands raw header bytes, the key is compared as its UTF-8
        # bytes (decoding the header as latin-1 and re-encoding it broke non-ASCII keys).
        headers = dict(scope.get("headers") or [])
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        given = hashlib.sha256(token).digest()
        return scheme.lower() == b"bearer" and hmac.compare_digest(given, self._digest)

    async def __call__(self, scope, receive, send) -> None:
        guarded = (
            self._digest is not None
            and scope["type"] in ("http", "websocket")
            and scope.get("method") != "OPTIONS"
            and scope["path"] not in OPEN_PATHS
        )
        if guarded and not self._authorized(scope):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            body = b'{"error": "Unauthorized"}'
            head = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
            await send({"type": "http.response.start", "status": 401, "headers": head})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)
