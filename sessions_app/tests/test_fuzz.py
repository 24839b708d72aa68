"""Hostile input on every entry (issue 18, item 2): no 500, and every refusal in its transport's
error shape. Seeded, so a failure replays: REST and gateway endpoints get malformed bodies,
hostile values in every field, odd methods and query strings; the chat socket gets every frame
type with the same values, and must answer each with a frame and stay open."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
from channels.layers import InMemoryChannelLayer, channel_layers
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.test import Client

from sessions_app import services
from sessions_app.frames import check_outbound
from sessions_app.models import ApiToken
from sessions_app.routing import websocket_urlpatterns

SEED = 18
ROUNDS = 6  # bodies per endpoint and method, beyond the fixed hostile ones

# Raw text spliced into JSON: each broke an entry before the input boundary (issue 18).
HOSTILE_JSON = [
    "[" * 50_000,
    '"\\ud800"',
    '"\\udfff tail"',
    '"nul\\u0000byte"',
    "9223372036854775808",
    "-9223372036854775809",
    "1e400",
    "NaN",
    "-Infinity",
    "[" * 40 + "]" * 40,
    '{"a": ' * 40 + "1" + "}" * 40,
    "1" * 5000,
    '"' + "x" * 40_000 + '"',
    "null",
    "true",
    "[]",
    "{}",
    '["a", 1]',
    '{"role": "user"}',
    '"\\ud83d\\ude00 an emoji escaped"',
    '"<script>alert(1)</script>"',
]
RAW_BODIES = [
    b"",
    b"   ",
    b"not json",
    b"\xff\xfe\x00",
    b'{"a": 1',
    b"[" * 50_000,
    b'{"message": "\\ud800"}',
    b'--boundary\r\nContent-Disposition: form-data; name="a"\r\n\r\nb\r\n--boundary--\r\n',
    b"a=1&b=2",
]
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def _value(rng: random.Random) -> str:
    return rng.choice(HOSTILE_JSON)


def _body(rng: random.Random, fields: list[str]) -> bytes:
    """A JSON object of the endpoint's own fields, some valid, some hostile, as raw text."""
    parts = []
    for name in fields:
        if rng.random() < 0.8:
            parts.append(f'"{name}": {_value(rng)}')
    if rng.random() < 0.3:
        parts.append(f'"\\u0000{rng.randint(0, 9)}": 1')
    return ("{" + ", ".join(parts) + "}").encode()


def _rest_shape(response) -> None:
    body = json.loads(response.content)
    assert set(body) == {"error"} and isinstance(body["error"]["code"], str), body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


def _ollama_shape(response) -> None:
    body = json.loads(response.content)
    assert isinstance(body.get("error"), str) and body["error"], body


def _openai_shape(response) -> None:
    error = json.loads(response.content)["error"]
    assert {"message", "type", "param", "code"} <= set(error), error


def _drain(response) -> bytes:
    if getattr(response, "streaming", False):
        return b"".join(response.streaming_content)
    return response.content


def _check(response, shape, where: str) -> None:
    status = response.status_code
    assert status != 500 and status < 600, (where, status, _drain(response)[:300])
    if status >= 400:
        assert response["Content-Type"].startswith("application/json"), (where, status, response["Content-Type"])
        shape(response)
    else:
        _drain(response)


@pytest.fixture
def callers(owner, client_acme, client_globex, use_simulator):
    _token, bound = ApiToken.issue(user=owner, client=client_acme)
    _token, free = ApiToken.issue(user=owner)
    session = services.session_start(user=owner, client="acme", model="ollama:llama3.2")
    other = services.session_start(user=owner, client="globex", model="ollama:llama3.2")
    return {"bound": bound, "free": free, "session": str(session.pk), "other": str(other.pk)}


@pytest.mark.django_db
def test_no_rest_endpoint_answers_500_to_hostile_input(callers, owner):
    rng = random.Random(SEED)
    sid, other = callers["session"], callers["other"]
    endpoints = {
        "/api/ollama/session/start": ["client", "model", "brand", "name", "system_prompt"],
        f"/api/ollama/session/{sid}/chat": ["message", "stream"],
        f"/api/ollama/session/{other}/chat": ["message", "stream"],
        f"/api/ollama/session/{sid}/switch": ["client", "model", "reason"],
        f"/api/ollama/session/{sid}/summary": [],
        f"/api/ollama/session/{sid}/export": [],
        "/api/ollama/session/import": ["format", "version", "session", "messages", "seal"],
        "/api/ollama/sessions": [],
        "/api/ollama/search": [],
        "/api/ollama/stats": [],
        "/api/ollama/signing-key": [],
        "/api/ollama/openapi.json": [],
        "/api/ollama/no-such-thing": [],
        "/api/ollama/session/%00/summary": [],
        f"/api/ollama/session/{sid}/end": [],
    }
    queries = [
        "",
        "?q=%00",
        "?client=%00",
        "?offset=9223372036854775808",
        "?limit=-1",
        "?from=%00&to=x",
        "?status=%ED%A0%80",
        "?q=" + "a" * 5000,
        "?limit=1e3",
        "?client=globex",
    ]
    cookie = Client()
    cookie.force_login(owner)
    checked = 0
    for path, fields in endpoints.items():
        for method in METHODS:
            bodies = [*RAW_BODIES, *(_body(rng, fields) for _ in range(ROUNDS))]
            for index, body in enumerate(bodies):
                caller = (
                    cookie
                    if index % 5 == 4
                    else Client(HTTP_AUTHORIZATION=f"Bearer {callers['bound' if index % 2 else 'free']}")
                )
                url = path + rng.choice(queries)
                response = caller.generic(
                    method,
                    url,
                    data=body,
                    content_type=rng.choice(
                        [
                            "application/json",
                            "text/plain",
                            "multipart/form-data; boundary=boundary",
                            "application/x-www-form-urlencoded",
                        ]
                    ),
                )
                _check(response, _rest_shape, f"{method} {url} {body[:60]!r}")
                checked += 1
    assert checked > 1000


@pytest.mark.django_db(transaction=True)  # the gateway works from its own database thread
def test_no_gateway_endpoint_answers_500_to_hostile_input(callers):
    rng = random.Random(SEED + 1)
    token = callers["bound"]
    ollama = {
        "/api/chat": ["model", "messages", "stream", "options", "format", "keep_alive", "tools"],
        "/api/generate": ["model", "prompt", "system", "stream", "suffix", "raw", "images", "options"],
        "/api/show": ["model", "name"],
        "/api/tags": [],
        "/api/ps": [],
        "/api/version": [],
        "/api/embed": ["model", "input"],
        "/api/nothing": [],
        f"/t/{token}/api/chat": ["model", "messages"],
        f"/t/{token}/elsewhere": [],
        "/t/bws_not-a-token/api/chat": ["model", "messages"],
    }
    openai = {
        "/v1/chat/completions": [
            "model",
            "messages",
            "stream",
            "stream_options",
            "n",
            "max_tokens",
            "temperature",
            "tools",
            "stop",
            "seed",
        ],
        "/v1/models": [],
        "/v1/models/": [],
        "/v1/models/ollama:llama3.2": [],
        "/v1/embeddings": ["model", "input"],
        "/v1/unknown": [],
        f"/t/{token}/v1/chat/completions": ["model", "messages"],
    }
    messages_values = [
        '[{"role": ["user"], "content": "x"}]',
        '[{"role": {"a": 1}, "content": "x"}]',
        '[{"role": "user", "content": {"a": 1}}]',
        '[{"role": "user", "content": [{"type": "text", "text": 7}]}]',
        '[{"role": "user", "content": [1, 2]}]',
        '[{"role": "user", "content": "\\ud800"}]',
        '[{"role": "user", "content": "ok"}]',
        '[{"role": "system", "content": "s"}, {"role": "user", "content": "ok"}]',
        "[1, 2, 3]",
    ]
    client = Client(HTTP_AUTHORIZATION=f"Bearer {token}")
    checked = 0
    for routes, shape in ((ollama, _ollama_shape), (openai, _openai_shape)):
        for path, fields in routes.items():
            for method in METHODS:
                bodies = [*RAW_BODIES]
                for _ in range(ROUNDS):
                    body = _body(rng, fields).decode()
                    if "messages" in fields and rng.random() < 0.7:
                        model = rng.choice(['"llama3.2"', '"ollama:llama3.2"', '"nope:model"', _value(rng)])
                        body = f'{{"model": {model}, "messages": {rng.choice(messages_values)}, "stream": false}}'
                    bodies.append(body.encode())
                for body in bodies:
                    response = client.generic(method, path, data=body, content_type="application/json")
                    _check(response, shape, f"{method} {path} {body[:60]!r}")
                    checked += 1
    assert checked > 800


@pytest.mark.django_db(transaction=True)
async def test_no_frame_closes_the_chat_socket_or_goes_unanswered(callers, owner, settings):
    rng = random.Random(SEED + 2)
    communicator = WebsocketCommunicator(URLRouter(websocket_urlpatterns), f"/ws/sessions/{callers['session']}/")
    communicator.scope["user"] = owner
    connected, _ = await communicator.connect(timeout=10)
    assert connected
    assert json.loads(await communicator.receive_from(timeout=10))["type"] == "ready"
    frames = [body.decode("utf-8", "replace") or '""' for body in RAW_BODIES]
    for kind in ("chat", "stop", "switch", "end", "ping", "unknown", "ch\\u0000at", "\\ud800"):
        for _ in range(ROUNDS):
            fields = ", ".join(
                f'"{name}": {_value(rng)}'
                for name in ("message", "turn", "client", "model", "reason")
                if rng.random() < 0.6
            )
            frames.append(f'{{"type": "{kind}"{", " if fields else ""}{fields}}}')
    frames = [frame for frame in frames if '"type": "end"' not in frame]  # ending is a legitimate last word
    # Sound frames among them, so a turn, a switch and a stop also happen between hostile ones.
    frames[10:10] = ['{"type": "chat", "message": "hello"}']
    sound_switch = '{"type": "switch", "model": "ollama:mistral"}'
    frames[20:20] = [sound_switch]
    answers: list[dict] = []
    try:
        for frame in frames:
            while frame == sound_switch and not {"stopped", "message.done"} & {a["type"] for a in answers}:
                # The stopped answer is stored by its own task: a switch waits for it, as a page would.
                answers.append(json.loads(await communicator.receive_from(timeout=15)))
            await communicator.send_to(text_data=frame)
            await communicator.send_to(text_data='{"type": "stop"}')
            await communicator.send_to(text_data='{"type": "ping"}')
            # Every frame is answered; the socket is still open afterwards (a pong comes back).
            while True:
                answer = json.loads(await communicator.receive_from(timeout=15))
                answers.append(answer)
                assert not check_outbound(answer), (frame[:80], check_outbound(answer))
                assert answer.get("code") != "internal_error", (frame[:80], answer)
                if answer["type"] == "pong":
                    break
        await communicator.send_to(bytes_data=b"\x00\xff")
        assert json.loads(await communicator.receive_from(timeout=5))["type"] == "error"
    finally:
        await communicator.disconnect()
        await asyncio.sleep(0)
    assert isinstance(channel_layers["default"], InMemoryChannelLayer)
    assert sum(a["type"] == "error" for a in answers) >= len(frames) // 2
    assert {"turn.started", "switched", "pong"} <= {a["type"] for a in answers}
