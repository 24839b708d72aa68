"""Template tags that put a brand on a page without trusting its stored values."""

from __future__ import annotations

from django import template
from django.utils.safestring import SafeString, mark_safe

from billing.branding import HOUSE_STYLE, BrandStyle, safe_color, safe_font_stack

register = template.Library()


def _luminance(hex_color: str) -> float:
    """Relative luminance of a #rrggbb colour (WCAG 2.x)."""
    channels = []
    for i in (1, 3, 5):
        c = int(hex_color[i : i + 2], 16) / 255
        channels.append(c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4)
    r, g, b = channels
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def readable_on(hex_color: str) -> str:
    """Near-black or white, whichever contrasts more with `hex_color`."""
    lum = _luminance(hex_color)
    dark, light = "#16181d", "#ffffff"
    contrast_dark = (lum + 0.05) / (_luminance(dark) + 0.05)
    contrast_light = (1.05) / (lum + 0.05)
    return dark if contrast_dark >= contrast_light else light


@register.filter
def css_color(value: object, fallback: str = "#1f6feb") -> str:
    """`#rrggbb` or the fallback: use for any colour that goes into a style."""
    return safe_color(value, safe_color(fallback, "#1f6feb"))


@register.simple_tag
def brand_css_vars(brand: BrandStyle | None) -> SafeString:
    """The `:root { --brand-… }` block for a `<style>` element, from validated values only.

    Autoescaping would turn the font stack's quotes into entities, which CSS inside
    `<style>` does not decode; so each value is re-validated here against a strict
    pattern (colours) or a fixed list (fonts) and the result is marked safe.
    """
    style = brand if isinstance(brand, BrandStyle) else HOUSE_STYLE
    primary = safe_color(style.primary_color, HOUSE_STYLE.primary_color)
    accent = safe_color(style.accent_color, HOUSE_STYLE.accent_color)
    background = safe_color(style.background_color, HOUSE_STYLE.background_color)
    font = safe_font_stack(style.font_stack)
    declarations = {
        "--brand-primary": primary,
        "--brand-accent": accent,
        "--brand-bg": background,
        "--brand-font": font,
        "--brand-on-primary": readable_on(primary),
        "--brand-on-accent": readable_on(accent),
        "--brand-text": readable_on(background),
    }
    body = " ".join(f"{name}: {value};" for name, value in declarations.items())
    return mark_safe(f":root {{ {body} }}")  # noqa: S308 - every value validated above
