"""Which brand a request wears: the page's own, else the Host's client, else the house style."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

from django.core.cache import cache

from billing.models import Brand, ClientDomain

HOST_CACHE_SECONDS = 60
HOST_CACHE_PREFIX = "brand-host:"

_HEX_COLOR = re.compile(r"^#[0-9a-fA-F]{6}$")
_LOGO = re.compile(r"^(https?://[^\s\"'<>()\\]+|/[^\s\"'<>()\\]*)$")


def safe_color(value: object, fallback: str) -> str:
    """`value` if it is exactly #rrggbb (lower-cased), else `fallback`: never raw text into CSS."""
    if isinstance(value, str) and _HEX_COLOR.fullmatch(value):
        return value.lower()
    return fallback


def safe_font_stack(value: object) -> str:
    """Only the fixed font stacks of `Brand.FONT_STACKS` ever reach a page."""
    if isinstance(value, str) and value in Brand.FONT_STACKS.values():
        return value
    return Brand.FONT_STACKS["system"]


def safe_logo(value: object) -> str:
    if isinstance(value, str) and _LOGO.fullmatch(value):
        return value
    return ""


@dataclass(frozen=True)
class BrandStyle:
    """Validated brand values, safe to place in CSS custom properties."""

    name: str
    primary_color: str = "#1f6feb"
    accent_color: str = "#8250df"
    background_color: str = "#ffffff"
    font_stack: str = Brand.FONT_STACKS["system"]
    logo: str = ""
    welcome_text: str = ""
    client_slug: str = ""

    def __post_init__(self) -> None:
        # Re-validate whatever we were given (a form, a cache, an old row): only #rrggbb
        # colours, known font stacks and http(s)/path logos survive.
        defaults = {f.name: f.default for f in fields(self)}
        for name in ("primary_color", "accent_color", "background_color"):
            object.__setattr__(self, name, safe_color(getattr(self, name), defaults[name]))
        object.__setattr__(self, "font_stack", safe_font_stack(self.font_stack))
        object.__setattr__(self, "logo", safe_logo(self.logo))

    @classmethod
    def from_brand(cls, brand: Brand) -> BrandStyle:
        return cls(
            name=brand.name,
            primary_color=brand.primary_color,
            accent_color=brand.accent_color,
            background_color=brand.background_color,
            font_stack=brand.font_stack,
            logo=brand.logo,
            welcome_text=brand.welcome_text,
            client_slug=brand.client.slug if brand.client_id else "",
        )


HOUSE_STYLE = BrandStyle(name="Billable Sessions")


def default_brand(client: ClientDomain) -> Brand | None:
    brands = list(client.brands.all())
    return next((b for b in brands if b.is_default), brands[0] if brands else None)


def host_cache_key(host: str) -> str:
    return f"{HOST_CACHE_PREFIX}{host.strip().lower()}"


def forget_hosts(*hosts: str | None) -> None:
    """Drop the cached brand of these hostnames (a client or brand changed)."""
    keys = [host_cache_key(h) for h in hosts if h]
    if keys:
        cache.delete_many(keys)


def brand_for_host(host: str) -> BrandStyle | None:
    host = (host or "").split(":")[0].lower()
    if not host:
        return None
    key = host_cache_key(host)
    cached = cache.get(key)
    if cached is None:
        client = ClientDomain.objects.filter(hostname=host, is_active=True).first()
        brand = default_brand(client) if client else None
        cached = BrandStyle.from_brand(brand) if brand else ""
        cache.set(key, cached, HOST_CACHE_SECONDS)
    return cached or None


def brand_for_request(request) -> BrandStyle:
    explicit = getattr(request, "brand_style", None)
    if explicit is not None:
        return explicit
    try:
        host = request.get_host()
    except Exception:  # DisallowedHost is handled by Django elsewhere; the page still needs a style
        host = ""
    return brand_for_host(host) or HOUSE_STYLE
