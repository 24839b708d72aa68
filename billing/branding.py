"""Which brand a request wears: the page's own, else the Host's client, else the house style."""

from __future__ import annotations

from dataclasses import dataclass

from django.core.cache import cache

from billing.models import Brand, ClientDomain

HOST_CACHE_SECONDS = 60


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


def brand_for_host(host: str) -> BrandStyle | None:
    host = (host or "").split(":")[0].lower()
    if not host:
        return None
    key = f"brand-host:{host}"
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
