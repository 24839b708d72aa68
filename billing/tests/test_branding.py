"""Pages wear a brand only through validated values, and the Host cache never goes stale."""

from __future__ import annotations

import pytest
from django.core.cache import cache
from django.template import Context, Template

from billing.branding import HOUSE_STYLE, BrandStyle, brand_for_host
from billing.models import Brand
from billing.templatetags.brand_tags import brand_css_vars, readable_on
from tests.factories import BrandFactory, ClientFactory


@pytest.fixture(autouse=True)
def clean_cache():
    cache.clear()
    yield
    cache.clear()


def test_brand_style_replaces_anything_but_hex_colours_with_defaults():
    style = BrandStyle(
        name="Evil",
        primary_color="red;} body{display:none",
        accent_color="#ABCDEF",
        background_color="</style><script>",
        font_stack="Comic Sans; } * { color: red",
        logo="javascript:alert(1)",
    )
    assert style.primary_color == HOUSE_STYLE.primary_color
    assert style.accent_color == "#abcdef"
    assert style.background_color == HOUSE_STYLE.background_color
    assert style.font_stack == Brand.FONT_STACKS["system"]
    assert style.logo == ""


def test_brand_css_vars_emit_only_validated_values():
    style = BrandStyle(name="x", primary_color="#0B7285", background_color="</style>")
    css = str(brand_css_vars(style))
    assert "--brand-primary: #0b7285;" in css
    assert "--brand-bg: #ffffff;" in css
    assert "--brand-accent: #8250df;" in css
    assert "--brand-font: system-ui" in css
    assert "<" not in css and "&" not in css


def test_brand_css_vars_fall_back_to_the_house_style_for_anything_else():
    css = str(brand_css_vars("not a brand"))
    assert f"--brand-primary: {HOUSE_STYLE.primary_color};" in css


def test_css_color_filter_refuses_non_hex_values():
    html = Template("{% load brand_tags %}{{ good|css_color }} {{ bad|css_color:'#000000' }}").render(
        Context({"good": "#A1B2C3", "bad": "url(javascript:x)"})
    )
    assert html == "#a1b2c3 #000000"


def test_text_on_brand_colours_is_readable():
    assert readable_on("#ffffff") == "#16181d"
    assert readable_on("#fab005") == "#16181d"
    assert readable_on("#1864ab") == "#ffffff"


@pytest.mark.django_db
def test_host_brand_is_cached_and_forgotten_when_the_brand_changes():
    client = ClientFactory(slug="acme", hostname="acme.localhost")
    brand = BrandFactory(client=client, primary_color="#111111")
    assert brand_for_host("acme.localhost:8000").primary_color == "#111111"

    brand.primary_color = "#222222"
    brand.save()
    assert brand_for_host("acme.localhost").primary_color == "#222222"

    brand.delete()
    assert brand_for_host("acme.localhost") is None


@pytest.mark.django_db
def test_host_brand_cache_follows_a_client_renaming_its_hostname():
    client = ClientFactory(slug="acme", hostname="old.localhost")
    BrandFactory(client=client, primary_color="#333333")
    assert brand_for_host("old.localhost").primary_color == "#333333"

    client.hostname = "new.localhost"
    client.save()
    assert brand_for_host("old.localhost") is None
    assert brand_for_host("new.localhost").primary_color == "#333333"

    client.is_active = False
    client.save()
    assert brand_for_host("new.localhost") is None


@pytest.mark.django_db
def test_unknown_hosts_get_no_brand():
    assert brand_for_host("nobody.localhost") is None
    assert brand_for_host("") is None
