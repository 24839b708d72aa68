"""Gateway authentication: an ApiToken from `Authorization: Bearer` or the `/t/<token>/` prefix."""

from __future__ import annotations

from django.http import HttpRequest

from config.dbthread import db_sync_to_async
from sessions_app import throttle
from sessions_app.gateway.common import TOKEN_INVALID, TOKEN_MISSING, GatewayError
from sessions_app.models import ApiToken


def raw_token(request: HttpRequest, path_token: str | None) -> str:
    if path_token:
        return path_token
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    return ""


def authenticate_raw(raw: str, request: HttpRequest | None = None, also: dict | None = None) -> ApiToken:
    """The live token for `raw`, or a 401 GatewayError; 429 once the caller's address has sent
    too many unknown tokens (`request` says who is calling; without it nothing is throttled).
    `also` is read with the token (`ApiToken.authenticate`)."""
    if not raw:
        raise GatewayError(401, TOKEN_MISSING, code="invalid_api_key")
    if request is not None and (wait := throttle.token_wait(request)):
        raise GatewayError(429, throttle.token_message(wait), code="rate_limit_exceeded", retry_after=wait)
    token = ApiToken.authenticate(raw, with_client=False, also=also)  # the client: only for a new session
    if token is None:
        if request is not None and (wait := throttle.token_failed(request)):
            raise GatewayError(429, throttle.token_message(wait), code="rate_limit_exceeded", retry_after=wait)
        raise GatewayError(401, TOKEN_INVALID, code="invalid_api_key")
    token.touch()
    return token


async def authenticate(request: HttpRequest, path_token: str | None) -> ApiToken:
    """Return the live token, or raise a 401 GatewayError."""
    return await db_sync_to_async(authenticate_raw)(raw_token(request, path_token), request)
