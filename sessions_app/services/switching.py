"""Switch a session's client and/or model, recording the context carried (docs/DESIGN.md "Switch").

A switch during an answer: `session_switch` raises `SessionBusy` with `SWITCH_BUSY`;
`asession_switch` (used by the REST API) waits for the answer to finish, then switches,
which is what a consultant expects when they pick another model mid-answer.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.db import transaction
from django.utils import timezone

from billing import budgets
from billing.models import ClientDomain
from config.dbthread import db_sync_to_async
from providers.naming import parse_model
from sessions_app.context import ContextPlan, build_context
from sessions_app.errors import (
    BadInput,
    SessionBusy,
)
from sessions_app.models import (
    ChatSession,
    ContextStream,
    SessionMessage,
    SessionSegment,
    StreamReason,
)
from sessions_app.refs import Person, SessionRef
from sessions_app.selectors import session_get_for_user
from sessions_app.services.claims import (
    _check_writable,
    _claim_or_explain,
    wait_for_turn,
)
from sessions_app.services.inputs import (
    _require_text,
    _resolve_brand,
    _resolve_client,
    _resolve_model,
)
from sessions_app.services.sharing import invitations_revoke_unbillable, session_check_client_switch
from sessions_app.services.store import _load

SWITCH_NOTHING = "Name a client and/or a model to switch to."


SWITCH_SAME = "The session is already on client {slug!r} with model {model!r}."


SWITCH_BUSY = "An answer is streaming in this session; the switch applies once it finishes (or stop it first)."


REASON_TOO_LONG = "The reason is {size} characters; the limit is {limit}."


REASON_LIMIT = 500


def _snapshot(plan: ContextPlan, clients: dict) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if plan.system_prompt:
        out.append({"seq": None, "role": "system", "content": plan.system_prompt, "model": "", "client": ""})
    for entry in plan.entries:
        out.append(
            {
                "seq": entry.seq,
                "role": entry.role,
                "content": entry.content,
                "model": entry.model,
                "client": clients.get(entry.client_id, ""),
            }
        )
    return out


@budgets.alerts_on_refusal
def session_switch(
    *, session_id: SessionRef, user: Person, client: object = None, model: object = None, reason: str = ""
) -> ContextStream:
    """Move the session to another client and/or model and record what context is carried."""
    session = session_get_for_user(session_id=session_id, user=user)
    reason = _require_text(reason, "reason").strip()
    if len(reason) > REASON_LIMIT:
        raise BadInput(REASON_TOO_LONG.format(size=len(reason), limit=REASON_LIMIT))
    if client in (None, "") and model in (None, ""):
        raise BadInput(SWITCH_NOTHING)
    _check_writable(session)
    domain = _resolve_client(client, user) if client not in (None, "") else session.domain
    if domain.pk != session.domain_id:
        session_check_client_switch(session=session, user=user)
    model_name = _resolve_model(model) if model not in (None, "") else session.current_model
    if domain.pk == session.domain_id and model_name == session.current_model:
        raise BadInput(SWITCH_SAME.format(slug=domain.slug, model=model_name))
    budgets.budget_check(client_id=domain.pk, model=model_name)  # to a paid model for a client over budget
    source_ref, target_ref = parse_model(session.current_model), parse_model(model_name)
    if domain.pk != session.domain_id:
        stream_reason = StreamReason.DOMAIN_SWITCH
        brand = _resolve_brand(None, domain)
    else:
        stream_reason = (
            StreamReason.MODEL_UPGRADE if target_ref.paid and not source_ref.paid else StreamReason.MODEL_SWITCH
        )
        brand = session.brand

    now = timezone.now()
    with transaction.atomic():
        _claim_or_explain(session.pk, now, busy_message=SWITCH_BUSY, last_activity_at=now)
        session = _load(session.pk)
        open_segment = session.segments.filter(ended_at__isnull=True).first()
        if open_segment is not None:
            now = max(now, open_segment.started_at)
        plan = build_context(session=session, target=target_ref)
        clients = {str(c.pk): c.slug for c in ClientDomain.objects.filter(messages__session=session).distinct()}
        SessionSegment.objects.filter(session=session, ended_at__isnull=True).update(ended_at=now)
        SessionSegment.objects.create(session=session, domain=domain, brand=brand, model=model_name, started_at=now)
        # A switch that was never followed by a call carried nothing: settle it at zero.
        ContextStream.objects.filter(session=session, settled_at__isnull=True).update(
            settled_at=now, total_tokens=0, cost_usd=Decimal("0")
        )
        stream = ContextStream.objects.create(
            session=session,
            source_model=session.current_model,
            target_model=model_name,
            source_domain=session.domain,
            target_domain=domain,
            context_snapshot=_snapshot(plan, clients),
            message_count=len(plan.entries),
            omitted_count=plan.omitted_count,
            total_tokens=plan.history_tokens,
            reason=stream_reason,
            note=reason,
            streamed_at=now,
            cost_usd=None,
        )
        carried = list(session.messages.filter(seq__in=plan.seqs))
        for message in carried:
            if domain.pk != message.domain_id and domain.slug not in message.shared_to_domains:
                message.shared_to_domains = [*message.shared_to_domains, domain.slug]
            if model_name != message.model and model_name not in message.shared_to_models:
                message.shared_to_models = [*message.shared_to_models, model_name]
        SessionMessage.objects.bulk_update(carried, ["shared_to_domains", "shared_to_models"])
        ChatSession.objects.filter(pk=session.pk).update(
            domain=domain, brand=brand, current_model=model_name, last_activity_at=now
        )
        if domain.pk != session.domain_id:
            invitations_revoke_unbillable(session=session, client=domain)
    stream.source_domain = session.domain
    stream.target_domain = domain
    return stream


async def asession_switch(
    *, session_id: SessionRef, user: Person, client: object = None, model: object = None, reason: str = ""
) -> ContextStream:
    """`session_switch` that applies after a streaming answer finishes instead of raising busy."""
    for attempt in range(3):
        try:
            return await db_sync_to_async(session_switch)(
                session_id=session_id, user=user, client=client, model=model, reason=reason
            )
        except SessionBusy:
            if attempt == 2:
                raise
            await wait_for_turn(session_id)
    raise SessionBusy(SWITCH_BUSY)
