"""Check what callers hand the services: text fields, clients, models, brands, stream options.

Every check raises `BadInput` (400) or `MessageTooLarge` (413) with a module-constant message,
before anything is written.
"""

from __future__ import annotations

import dataclasses
import uuid

from billing.models import Brand, ClientDomain
from billing.money import quantize_micro as quantize_money
from providers import router
from providers.base import StreamOptions
from providers.naming import ModelRef, parse_model
from sessions_app.errors import (
    CLIENT_NOT_ALLOWED,
    UNKNOWN_CLIENT,
    UNKNOWN_MODEL,
    BadInput,
)
from sessions_app.refs import Person

CLIENT_REQUIRED = "A client is required (its slug, for example 'acme')."


MODEL_REQUIRED = "A model is required, for example 'ollama:llama3.2' or 'openai:gpt-4o'."


NAME_TOO_LONG = "The name is {size} characters; the limit is {limit}."


SYSTEM_PROMPT_TOO_LARGE = "The system prompt is {size} characters; the limit is {limit}."


NOT_TEXT = "{field} must be a string."


UNKNOWN_BRAND = "Unknown brand {brand!r} for client {slug!r}."


TOKEN_CLIENT = "This API token may only bill client {slug!r}."


UNKNOWN_SOURCE = "Unknown session source {source!r}."


NAME_LIMIT = 200


# Costs are stored to six decimals, half up (`billing.money`); the hash chain sees the stored value.
__all__ = ["quantize_money"]


def _require_text(value: object, field_name: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadInput(NOT_TEXT.format(field=field_name))
    # PostgreSQL text cannot hold NUL; it is never meaningful in a chat.
    return value.replace("\x00", "")


def _has_control_characters(text: str) -> bool:
    return any(ord(ch) < 32 or ord(ch) == 127 for ch in text)


def _resolve_client(client: object, user: Person) -> ClientDomain:
    if isinstance(client, ClientDomain):
        domain = client
        slug = client.slug
    else:
        if client is not None and not isinstance(client, str):
            raise BadInput(NOT_TEXT.format(field="client"))
        slug = (client or "").strip()
        if not slug:
            raise BadInput(CLIENT_REQUIRED)
        if _has_control_characters(slug) or len(slug) > 100:
            raise BadInput(UNKNOWN_CLIENT.format(slug=slug[:100]))
        domain = ClientDomain.objects.filter(slug=slug).first()
    if domain is None or not domain.is_active:
        raise BadInput(UNKNOWN_CLIENT.format(slug=slug))
    if not ClientDomain.objects.open_to(user).filter(pk=domain.pk).exists():
        raise BadInput(CLIENT_NOT_ALLOWED.format(slug=domain.slug))
    return domain


def _resolve_model(model: object) -> str:
    """Validate a model name; return the name the session stores (`provider:model`)."""
    if isinstance(model, ModelRef):
        model = model.name
    if model is not None and not isinstance(model, str):
        raise BadInput(NOT_TEXT.format(field="model"))
    name = (model or "").strip()
    if not name:
        raise BadInput(MODEL_REQUIRED)
    if len(name) > 200:
        raise BadInput(UNKNOWN_MODEL.format(model=name[:60] + "…") + " The name is too long.")
    if _has_control_characters(name):
        raise BadInput(UNKNOWN_MODEL.format(model=name) + " Model names cannot contain control characters.")
    try:
        router.validate_model(name)
        ref = parse_model(name)
    except ValueError as exc:
        raise BadInput(f"{UNKNOWN_MODEL.format(model=name)} {exc}".strip()) from None
    return ref.name


def _resolve_brand(brand: object, domain: ClientDomain) -> Brand | None:
    if brand is None or brand == "":
        return Brand.objects.filter(client=domain, is_default=True).first()
    if isinstance(brand, Brand):
        if brand.client_id != domain.pk:
            raise BadInput(UNKNOWN_BRAND.format(brand=str(brand.pk), slug=domain.slug))
        return brand
    try:
        pk = uuid.UUID(str(brand))
    except (TypeError, ValueError):
        raise BadInput(UNKNOWN_BRAND.format(brand=str(brand)[:60], slug=domain.slug)) from None
    found = Brand.objects.filter(pk=pk, client=domain).first()
    if found is None:
        raise BadInput(UNKNOWN_BRAND.format(brand=str(brand), slug=domain.slug))
    return found


def _stream_options(options: object) -> StreamOptions:
    if options is None:
        opts = StreamOptions()
    elif isinstance(options, StreamOptions):
        opts = dataclasses.replace(options)  # the caller's object is not changed
    elif isinstance(options, dict):
        known = {"temperature", "max_tokens", "num_ctx", "keep_alive", "seed"}
        opts = StreamOptions(
            **{k: v for k, v in options.items() if k in known},
            extra={k: v for k, v in options.items() if k not in known},
        )
    else:
        raise BadInput("options must be an object.")
    return opts
