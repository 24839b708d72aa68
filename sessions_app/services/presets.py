"""Start a session from a conversation template (`billing.SessionTemplate`), staff's per-client presets.

The template gives what the consultant leaves out: the name, the system prompt and the model
(its default), and the session remembers it (`ChatSession.template`) so its chat page can offer
the template's first message, ready to send or edit.
"""

from __future__ import annotations

import uuid

from django.db import transaction
from django.db.models import Q

from billing.models import ClientDomain, SessionTemplate
from sessions_app.errors import BadInput
from sessions_app.models import ApiToken, ChatSession, SessionSource
from sessions_app.refs import Person
from sessions_app.services.inputs import CLIENT_REQUIRED, NOT_TEXT
from sessions_app.services.lifecycle import session_start

TEMPLATE_UNKNOWN = "Unknown template {template!r}; name one of your clients' templates (its name or id)."


TEMPLATE_AMBIGUOUS = "Several templates are called {template!r}; name the client too, or use the template's id."


TEMPLATE_OTHER_CLIENT = "Template {template!r} is for client {slug!r}, not {other!r}."


def template_resolve(*, template: object, user: Person, client: object = None) -> SessionTemplate:
    """An active template the user may use, by object, id or name (a client's own first)."""
    if isinstance(template, SessionTemplate):
        found = template if template.is_active else None
        label = template.name
    else:
        if not isinstance(template, str):
            raise BadInput(NOT_TEXT.format(field="template"))
        label = template.strip()[:200]
        open_clients = ClientDomain.objects.open_to(user).active()
        usable = SessionTemplate.objects.filter(is_active=True).filter(
            Q(client__isnull=True) | Q(client__in=open_clients)
        )
        try:
            found = usable.filter(pk=uuid.UUID(label)).first()
        except ValueError:
            named = list(usable.filter(name=label).select_related("client"))
            if client not in (None, "") and len(named) > 1:
                slug = client.slug if isinstance(client, ClientDomain) else str(client)
                named = [t for t in named if t.client_id and t.client.slug == slug] or [
                    t for t in named if not t.client_id
                ]
            if len(named) > 1:
                raise BadInput(TEMPLATE_AMBIGUOUS.format(template=label)) from None
            found = named[0] if named else None
    if found is None:
        raise BadInput(TEMPLATE_UNKNOWN.format(template=label))
    return found


def session_start_from_template(
    *,
    user: Person,
    template: object,
    client: object = None,
    model: object = None,
    brand: object = None,
    name: str = "",
    system_prompt: str = "",
    source: str = SessionSource.WEB,
    api_token: ApiToken | None = None,
) -> ChatSession:
    """`session_start` with the template's client, model, name and system prompt where none are given."""
    preset = template_resolve(template=template, user=user, client=client)
    if preset.client_id:
        slug = client.slug if isinstance(client, ClientDomain) else str(client or "").strip()
        if slug and slug != preset.client.slug:
            raise BadInput(TEMPLATE_OTHER_CLIENT.format(template=preset.name, slug=preset.client.slug, other=slug))
        client = preset.client
    if client in (None, ""):
        raise BadInput(CLIENT_REQUIRED)
    with transaction.atomic():
        session = session_start(
            user=user,
            client=client,
            model=model or preset.default_model or None,
            brand=brand,
            name=name or preset.name,
            system_prompt=system_prompt or preset.system_prompt,
            source=source,
            api_token=api_token,
        )
        ChatSession.objects.filter(pk=session.pk).update(template=preset)
    session.template = preset
    return session
