"""ASGI entry point: HTTP through Django, WebSockets through Channels."""

import os

from django.core.asgi import get_asgi_application

from config.logmask import install_access_log_mask

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
# daphne's access log prints each request's path: mask /t/<token>/ before it writes a line.
install_access_log_mask()
# Build Django first so the app registry is ready before consumers import models.
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

from sessions_app import serving  # noqa: E402
from sessions_app.gateway.asgi import GatewayHandler, is_gateway_path  # noqa: E402
from sessions_app.routing import websocket_urlpatterns  # noqa: E402

# daphne does not serve /static/ by itself; in development (or with SERVE_STATIC on) the
# app does, so `make run` shows styled pages without a proxy or collectstatic.
site_app = ASGIStaticFilesHandler(django_asgi_app) if settings.SERVE_STATIC else django_asgi_app
gateway_app = GatewayHandler()


async def http_app(scope, receive, send):
    """Gateway routes through the gateway's lean handler; every other page through the full stack."""
    app = gateway_app if is_gateway_path(scope["path"]) else site_app
    await app(scope, receive, send)


application = ProtocolTypeRouter(
    {
        "http": http_app,
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)

# Under daphne: settle answers a dead process left at start-up; drain answers on SIGTERM.
serving.install()
