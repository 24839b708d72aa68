"""The gateway's own ASGI handler: Django without the browser's middleware, and no thread hops.

Under ASGI, Django runs each `MiddlewareMixin` hook (`process_request`, `process_response`) in
a worker thread, one hop each way per middleware, so the site's seven middleware cost every
request fourteen thread hops before and after the view. Gateway calls are token-authenticated
API requests: sessions, CSRF, authentication and messages do nothing for them. Their handler
keeps only the middleware that shapes every response (security headers, `CommonMiddleware`,
`X-Frame-Options`), whose hooks do no I/O and so run inline on the event loop.

`config.asgi` sends a request here when its path is one of the gateway's routes
(`sessions_app.gateway_urls`); everything else goes through the full stack.
"""

from __future__ import annotations

from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.exception import convert_exception_to_response
from django.middleware.clickjacking import XFrameOptionsMiddleware
from django.middleware.common import CommonMiddleware
from django.middleware.security import SecurityMiddleware
from django.urls import Resolver404, get_resolver

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


def is_gateway_path(path: str) -> bool:
    """Whether `path` is one of the gateway's routes (with or without the `/t/<token>/` prefix)."""
    try:
        get_resolver(GATEWAY_URLCONF).resolve(path)
    except Resolver404:
        return False
    return True
