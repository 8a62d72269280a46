"""HTTP plumbing of the SGLang adapter: the server's error texts and checked answers."""

from __future__ import annotations

import requests


def error_text(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip() or response.reason
    if isinstance(body, dict):
        error = body.get("error")
        detail = error.get("message") if isinstance(error, dict) else error
        # error_message: the LoRA routes answer with SGLang's LoRAUpdateOutput
        message = body.get("message") or body.get("error_message")
        return str(message or detail or body.get("detail") or body)
    return str(body)


def checked(response: requests.Response, what: str) -> dict:
    """The JSON answer of a successful call; RuntimeError with the server's own text otherwise."""
    if response.status_code != 200:
        raise RuntimeError(f"SGLang {what}: HTTP {response.status_code}: {error_text(response)}")
    body = response.json() if response.content else {}
    if isinstance(body, dict) and body.get("success") is False:
        raise RuntimeError(f"SGLang {what}: {body.get('message') or body.get('error_message')}")
    return body
