"""The gateway's own ASGI handler: Django without the browser's middleware, and no thread hops.

A gateway call's only trips to a thread are its own database work (`config.dbthread`).

Under ASGI, Django runs each `MiddlewareMixin` hook (`process_request`, `process_response`) in
a worker thread, one hop each way per middleware, so the site's seven middleware cost every
request fourteen thread hops before and after the view. Gateway calls are token-authenticated
API requests: sessions, CSRF, authentication and messages do nothing for them. Their handler
keeps only the middleware that shapes every response (security headers, `CommonMiddleware`,
`X-Frame-Options`), whose hooks do no I/O and so run inline on the event loop.

Django's handler also hops to a thread per request for things the gateway does not need: a
new thread per request (`ThreadSensitiveContext`), the `request_started` signal and
`response.close()`. Their receivers (`close_old_connections`, `reset_queries`, closing
caches) act on the calling thread's own connections, and the event loop's thread holds none:
the gateway's database work runs in `db_sync_to_async`, which closes its connections itself.
So this handler sends both signals inline and closes the response inline.

`config.asgi` sends a request here when its path is one of the gateway's routes
(`sessions_app.gateway_urls`); everything else goes through the full stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools

from django.core import signals
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.core.handlers.exception import convert_exception_to_response
from django.http import HttpResponseBase
from django.middleware.clickjacking import XFrameOptionsMiddleware
from django.middleware.common import CommonMiddleware
from django.middleware.security import SecurityMiddleware
from django.urls import Resolver404, get_resolver, set_script_prefix

GATEWAY_URLCONF = "sessions_app.gateway_urls"


def inline(middleware: type) -> type:
    """`middleware` (a `MiddlewareMixin` whose hooks do no I/O) with its hooks run inline.

    The same order as Django's own `MiddlewareMixin.__acall__`, minus `sync_to_async`.
    """

    class Inline(middleware):
        sync_capable = False
        async_capable = True

        async def __acall__(self, request):
            response = self.process_request(request) if hasattr(self, "process_request") else None
            response = response or await self.get_response(request)
            if hasattr(self, "process_response"):
                response = self.process_response(request, response)
            return response

    Inline.__name__ = Inline.__qualname__ = f"Inline{middleware.__name__}"
    return Inline


# Outermost first, as in settings.MIDDLEWARE.
GATEWAY_MIDDLEWARE = tuple(inline(m) for m in (SecurityMiddleware, CommonMiddleware, XFrameOptionsMiddleware))


class GatewayHandler(ASGIHandler):
    """Django's ASGI handler with `GATEWAY_MIDDLEWARE` instead of settings.MIDDLEWARE."""

    def load_middleware(self, is_async: bool = False) -> None:
        if not is_async:
            raise ValueError("the gateway handler serves ASGI only")
        self._view_middleware = []
        self._template_response_middleware = []
        self._exception_middleware = []
        handler = convert_exception_to_response(self._get_response_async)
        for middleware in reversed(GATEWAY_MIDDLEWARE):
            handler = convert_exception_to_response(middleware(handler))
        self._middleware_chain = handler

    async def __call__(self, scope, receive, send) -> None:
        # No ThreadSensitiveContext: it starts a thread per request, and nothing here needs one.
        if scope["type"] != "http":
            raise ValueError(f"the gateway serves HTTP only, not {scope['type']}")
        await self.handle(scope, receive, send)

    async def handle(self, scope, receive, send) -> None:
        """Django's `ASGIHandler.handle` with the signals and the response's close inline."""
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        try:
            set_script_prefix(get_script_prefix(scope))
            signals.request_started.send(sender=self.__class__, scope=scope)
            request, error_response = self.create_request(scope, body_file)
            if request is None:
                assert error_response is not None  # Django gives one or the other
                await self.send_response(error_response, send)
                error_response.close()
                return
            await self._respond(request, receive, send)
        finally:
            body_file.close()

    async def _respond(self, request, receive, send) -> None:
        """As Django does: a client that disconnects cancels the view (a turn stores its partial)."""

        async def process_request() -> HttpResponseBase:
            response = await self.run_get_response(request)
            with contextlib.suppress(asyncio.CancelledError):  # the client left while it was sent
                await self.send_response(response, send)
            return response

        listen = asyncio.create_task(self.listen_for_disconnect(receive))
        process = asyncio.create_task(process_request())
        await asyncio.wait((listen, process), return_when=asyncio.FIRST_COMPLETED)
        for task in (listen, process):
            if task.done():
                with contextlib.suppress(RequestAborted):
                    task.result()
            else:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if process.cancelled():
            signals.request_finished.send(sender=self.__class__)
        else:
            process.result().close()  # its closers, then request_finished


@functools.lru_cache(maxsize=4096)
def is_gateway_path(path: str) -> bool:
    """Whether `path` is one of the gateway's routes (with or without the `/t/<token>/` prefix).

    Remembered per path: clients call the same few paths over and over.
    """
    if not path.startswith(("/api/", "/v1/", "/t/")):
        return False
    try:
        get_resolver(GATEWAY_URLCONF).resolve(path)
    except Resolver404:
        return False
    return True
