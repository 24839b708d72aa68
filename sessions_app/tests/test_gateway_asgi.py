"""The gateway's lean ASGI handler: which requests it serves, and that responses keep their headers."""

from __future__ import annotations

import asyncio

import pytest

from config import asgi
from sessions_app.gateway.asgi import GatewayHandler, is_gateway_path


@pytest.mark.parametrize(
    "path",
    [
        "/api/chat",
        "/api/generate",
        "/api/version",
        "/api/tags",
        "/v1/chat/completions",
        "/v1/models/ollama:llama3.2",
        "/api/embed",
        "/t/secret-token/",
        "/t/secret-token/api/chat",
        "/t/secret-token/v1/models",
        # Issue 18: unknown paths in the gateway's spaces answer in the protocol's shape (they were
        # the site's HTML 404, and under /t/ logged the token).
        "/api/sessions/",
        "/api/chatx",
        "/v1/unknown",
        "/v1/models/",
        "/t/secret-token/anything",
    ],
)
def test_gateway_routes_go_to_the_gateway_handler(path):
    assert is_gateway_path(path)


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/accounts/login/",
        "/sessions/",
        "/api/ollama/signing-key",
        "/api/ollama/unknown",
        "/admin/",
        "/static/x.css",
        "/t/",
    ],
)
def test_every_other_page_goes_through_the_full_stack(path):
    assert not is_gateway_path(path)


def test_the_gateway_handler_has_no_thread_hopping_middleware():
    handler = asgi.gateway_app
    assert isinstance(handler, GatewayHandler)
    assert handler._view_middleware == [] and handler._exception_middleware == []
    layer, names = handler._middleware_chain, []
    # Walk the chain: each inline middleware's get_response is the next one (or the view getter).
    while hasattr(layer, "__wrapped__") or hasattr(layer, "get_response"):
        inner = getattr(layer, "__wrapped__", layer)
        if not hasattr(inner, "get_response"):
            break
        names.append(type(inner).__name__)
        layer = inner.get_response
    assert names == ["InlineSecurityMiddleware", "InlineCommonMiddleware", "InlineXFrameOptionsMiddleware"]


@pytest.mark.django_db
async def test_gateway_responses_keep_the_sites_security_headers():
    headers = await _get(asgi.application, "/api/version")
    assert headers[b"x-content-type-options"] == b"nosniff" and headers[b"referrer-policy"] == b"same-origin"
    assert headers[b"x-frame-options"] == b"DENY"
    assert b"set-cookie" not in headers


async def _get(app, path: str) -> dict[bytes, bytes]:
    """One GET through the ASGI application; the response's headers."""
    messages: list[dict] = []
    requests = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive():
        if requests:
            return requests.pop()
        await asyncio.Event().wait()  # the client stays connected until the response is sent

    async def send(message):
        messages.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1")],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 80),
    }
    await app(scope, receive, send)
    start = next(m for m in messages if m["type"] == "http.response.start")
    assert start["status"] == 200
    return {name.lower(): value for name, value in start["headers"]}
