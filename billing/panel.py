"""The chat page's billing panel: each client's increment, this session's time for it so far
and how it rounds, and the current client's budget (read by `static/js/billing.js`)."""

from __future__ import annotations

import datetime as dt

from django.utils import timezone

from billing import budgets
from billing.reports import billable_minutes
from billing.selectors import price_books, segment_seconds
from sessions_app.models import ChatSession


def chat_billing(*, session: ChatSession, clients, now: dt.datetime | None = None) -> dict:
    """What the chat page shows about billing: each client's increment and this session's time
    for it so far with how it rounds, and the current client's budget (for `billing.js`).

    Seconds are cut as the reports cut them; the page advances the current client's seconds
    with its own clock between refreshes.
    """
    now = now or timezone.now()
    info = {session.pk: {"started_at": session.started_at, "ended_at": session.ended_at}}
    rows = session.segments.order_by("session_id", "started_at", "id").values_list(
        "session_id", "domain_id", "model", "started_at", "ended_at"
    )
    seconds: dict = {}
    for _sid, client_id, _model, part in segment_seconds(rows, info, now):
        seconds[client_id] = seconds.get(client_id, 0) + part
    known = {c.pk: c for c in clients} | {session.domain_id: session.domain}
    _clients, terms, _rates = price_books(known)
    out = {}
    for client_id, client in known.items():
        t = terms.at(client_id, now)
        spent = seconds.get(client_id, 0)
        out[client.slug] = {
            "name": client.name,
            "currency": client.currency,
            "increment": t.billing_increment_minutes,
            "seconds": spent,
            "billed_minutes": billable_minutes(spent, t.billing_increment_minutes),
        }
    state = budgets.budget_state(client_id=session.domain_id, now=now, with_hours=True)
    return {
        "client": session.domain.slug,
        "clients": out,
        "budget": state.as_dict() if state is not None else None,
        "server_now": now.isoformat(),
        "url": f"/sessions/{session.pk}/billing.json",
    }
