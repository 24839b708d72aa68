"""The invoice lock on work sessions, enforced in the model layer: a billed session never changes.

Issuing an invoice sets `ChatSession.invoice`; from then on saving a changed billed field
of the session, of one of its messages or segments, adding a message or segment to it, or
deleting one raises `SessionLocked`, whoever tries (a service, the admin, a shell). Bulk
`QuerySet.update()` bypasses model signals by Django's design; the session services never use
it on locked rows, and `manage.py verify_sessions` catches anything that slips past.
(What an issued invoice was computed from in billing, its rates and terms, is guarded by
billing/locks.py.)
"""

from __future__ import annotations

from django.db.models.signals import pre_delete, pre_save
from django.dispatch import receiver

from billing.models import InvoiceStatus
from sessions_app.errors import SESSION_LOCKED, SessionLocked
from sessions_app.models import ChatSession, SessionMessage, SessionSegment

# Fields of a session that figure in a bill or its integrity seal.
SESSION_BILLED_FIELDS = (
    "user_id",
    "domain_id",
    "started_at",
    "ended_at",
    "duration_seconds",
    "status",
    "primary_model",
    "current_model",
    "total_messages",
    "total_tokens",
    "estimated_cost_usd",
    "soulfra_hash",
    "invoice_id",
)
# Everything about a message or segment of a locked session is billed (content is sealed too).
MESSAGE_FREE_FIELDS = ("shared_to_domains", "shared_to_models")


def locked_message(what: str) -> str:
    return f"{SESSION_LOCKED} ({what})"


def _session_locked(session_id) -> bool:
    if session_id is None:
        return False
    return ChatSession.objects.filter(pk=session_id, invoice__status=InvoiceStatus.ISSUED).exists()


def _cached_session_locked(instance) -> bool:
    """Lock state of the instance's session, from the cached session when there is one."""
    session = instance._state.fields_cache.get("session")
    if session is not None and session.pk == instance.session_id:
        if session.invoice_id is None:
            return False
        invoice = session._state.fields_cache.get("invoice")
        if invoice is not None and invoice.pk == session.invoice_id:
            return invoice.status == InvoiceStatus.ISSUED
    return _session_locked(instance.session_id)


def _changed(instance, fields, update_fields) -> list[str]:
    names = [f for f in fields if update_fields is None or f.removesuffix("_id") in update_fields or f in update_fields]
    if not names:
        return []
    old = type(instance).objects.filter(pk=instance.pk).values(*names).first()
    if old is None:
        return []
    return [name for name in names if old[name] != getattr(instance, name)]


@receiver(pre_save, sender=ChatSession, dispatch_uid="sessions_app.lock_session")
def refuse_session_change(sender, instance: ChatSession, raw=False, update_fields=None, **kwargs) -> None:
    if raw or instance._state.adding:
        return
    fields = SESSION_BILLED_FIELDS
    names = [f for f in fields if update_fields is None or f.removesuffix("_id") in update_fields or f in update_fields]
    if not names:
        return
    old = ChatSession.objects.filter(pk=instance.pk).values("invoice__status", *names).first()
    if old is None or old["invoice__status"] != InvoiceStatus.ISSUED:
        return
    changed = [name.removesuffix("_id") for name in names if old[name] != getattr(instance, name)]
    if changed:
        raise SessionLocked(locked_message(f"session {instance}: {', '.join(changed)}"))


@receiver(pre_save, sender=SessionMessage, dispatch_uid="sessions_app.lock_message")
def refuse_message_change(sender, instance: SessionMessage, raw=False, update_fields=None, **kwargs) -> None:
    if raw or not _cached_session_locked(instance):
        return
    if instance._state.adding:
        raise SessionLocked(locked_message("no message can be added"))
    fields = [f.attname for f in SessionMessage._meta.concrete_fields if f.name not in MESSAGE_FREE_FIELDS]
    changed = _changed(instance, fields, update_fields)
    if changed:
        names = ", ".join(c.removesuffix("_id") for c in changed)
        raise SessionLocked(locked_message(f"message #{instance.seq}: {names}"))


@receiver(pre_save, sender=SessionSegment, dispatch_uid="sessions_app.lock_segment")
def refuse_segment_change(sender, instance: SessionSegment, raw=False, update_fields=None, **kwargs) -> None:
    if raw or not _cached_session_locked(instance):
        return
    if instance._state.adding:
        raise SessionLocked(locked_message("no segment can be added"))
    fields = [f.attname for f in SessionSegment._meta.concrete_fields]
    if _changed(instance, fields, update_fields):
        raise SessionLocked(locked_message("segment times and client"))


@receiver(pre_delete, sender=SessionMessage, dispatch_uid="sessions_app.lock_message_delete")
@receiver(pre_delete, sender=SessionSegment, dispatch_uid="sessions_app.lock_segment_delete")
def refuse_delete(sender, instance, **kwargs) -> None:
    if _session_locked(instance.session_id):
        raise SessionLocked(locked_message(f"a {sender._meta.verbose_name} cannot be deleted"))
