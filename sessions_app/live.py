"""What the live chat hands to pages: the brand a session wears and the page's start-up data."""

from __future__ import annotations

import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.urls import reverse
from django.utils import timezone

from billing.branding import HOUSE_STYLE, BrandStyle, default_brand
from sessions_app import selectors
from sessions_app.models import ChatSession

logger = logging.getLogger(__name__)

# The channel layer event that tells a session's sockets whose invitations were revoked.
REVOKED_EVENT = "session.revoked"


def display_name(user) -> str:
    """How pages name a consultant: their full name, else their username."""
    return user.get_full_name() or user.get_username()


def announce_revoked(*, session_id, user_ids: list[int]) -> None:
    """Tell the session's sockets, in every process, that these guests' invitations are revoked.

    Called from synchronous code once the revocation is committed; a channel layer that does
    not answer only delays the close to the guest's next frame, which re-checks the invitation.
    """
    layer = get_channel_layer()
    if layer is None or not user_ids:
        return
    event = {"type": REVOKED_EVENT, "users": [int(pk) for pk in user_ids]}
    try:
        async_to_sync(layer.group_send)(f"session.{session_id}", event)
    except Exception as exc:
        logger.warning(
            "Could not announce a revocation in session %s (%s); it applies on the guest's next frame", session_id, exc
        )


def session_brand_style(session: ChatSession) -> BrandStyle:
    """The brand a session's pages wear: its own, else its client's default, else the house style."""
    brand = session.brand or default_brand(session.domain)
    return BrandStyle.from_brand(brand) if brand else HOUSE_STYLE


def brand_payload(style: BrandStyle) -> dict[str, str]:
    """Brand values a page may apply as CSS custom properties (BrandStyle validated them all)."""
    return {
        "name": style.name,
        "primary_color": style.primary_color,
        "accent_color": style.accent_color,
        "background_color": style.background_color,
        "font_stack": style.font_stack,
        "logo": style.logo,
        "welcome_text": style.welcome_text,
        "client": style.client_slug,
    }


def chat_page_config(session: ChatSession, *, can_chat: bool) -> dict:
    """The chat page's start-up data, embedded with `json_script` (never as markup)."""
    sid = session.session_id
    return {
        "session": selectors.session_as_dict(session),
        "client_name": session.domain.name,
        "brand": brand_payload(session_brand_style(session)),
        "can_chat": can_chat,
        "streaming": session.turn_started_at is not None,
        # The answer streaming now, as of its last checkpoint: shown until the socket catches up.
        "live": {"text": session.turn_partial} if session.turn_started_at is not None else None,
        "server_now": timezone.now().isoformat(),
        "max_chars": settings.CHAT_MAX_MESSAGE_CHARS,
        "ws_path": f"/ws/sessions/{sid}/",
        "messages_url": reverse("session-messages", kwargs={"session_id": sid}),
        "models_url": reverse("session-models"),
        "summary_url": reverse("session-summary", kwargs={"session_id": sid}),
        "branch_url": f"/api/ollama/session/{sid}/branch",
        "versions_url": f"/api/ollama/session/{sid}/versions",
    }
