"""Template context: the brand a page wears, and whether the provider simulator is in use."""

from __future__ import annotations

from django.conf import settings

from billing.branding import brand_for_request


def branding(request) -> dict:
    return {
        "brand": brand_for_request(request),
        "provider_simulator": settings.PROVIDER_SIMULATOR,
    }
