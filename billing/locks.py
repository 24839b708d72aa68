"""Issued invoices never change, nor what they were computed from, enforced in the model layer.

An issued invoice and its lines are never edited (voiding issues a credit note), and exchange
rates and client terms that an issued invoice used are guarded (`billing.rates` says when a
change would alter an issued invoice and refuses it). The sessions an invoice covers are
locked by sessions_app/locks.py.
"""

from __future__ import annotations

from django.db.models.signals import pre_delete, pre_save
from django.dispatch import receiver

from billing.models import ClientTerms, ExchangeRate, Invoice, InvoiceLine, InvoiceStatus
from billing.rates import client_terms_guard, ensure_terms_start, exchange_rate_guard
from sessions_app.errors import SessionLocked  # the one "this is billed, it cannot change" error


@receiver(pre_save, sender=Invoice, dispatch_uid="billing.lock_invoice")
def refuse_issued_invoice_change(sender, instance: Invoice, raw=False, update_fields=None, **kwargs) -> None:
    """An issued invoice is final: its client, period and totals never change."""
    if raw or instance._state.adding:
        return
    old = (
        Invoice.objects.filter(pk=instance.pk)
        .values("status", "number", "client_id", "period_start", "period_end", "total")
        .first()
    )
    if old is None or old["status"] != InvoiceStatus.ISSUED:
        return
    # Voiding (issued → void) is the one change of state an issued invoice has; its figures stay.
    fields = ("number", "client_id", "period_start", "period_end", "total")
    if instance.status not in (InvoiceStatus.ISSUED, InvoiceStatus.VOID):
        fields = ("status", *fields)
    for name in fields:
        if old[name] != getattr(instance, name):
            raise SessionLocked(f"Invoice {old['number']} is issued; it can no longer change.")


@receiver(pre_save, sender=InvoiceLine, dispatch_uid="billing.lock_invoice_line")
@receiver(pre_delete, sender=InvoiceLine, dispatch_uid="billing.lock_invoice_line_delete")
def refuse_issued_line_change(sender, instance: InvoiceLine, raw=False, **kwargs) -> None:
    if raw or instance.invoice_id is None:
        return
    number = (
        Invoice.objects.filter(pk=instance.invoice_id, status__in=(InvoiceStatus.ISSUED, InvoiceStatus.VOID))
        .values_list("number", flat=True)
        .first()
    )
    if number:
        raise SessionLocked(f"Invoice {number} is issued; its lines can no longer change.")


@receiver(pre_save, sender=ExchangeRate, dispatch_uid="billing.lock_rate")
def refuse_rate_change(sender, instance: ExchangeRate, raw=False, **kwargs) -> None:
    """A rate an issued invoice used, or one that would take over its calls, is refused (RecordLocked)."""
    if not raw:
        exchange_rate_guard(instance)


@receiver(pre_delete, sender=ExchangeRate, dispatch_uid="billing.lock_rate_delete")
def refuse_rate_delete(sender, instance: ExchangeRate, **kwargs) -> None:
    exchange_rate_guard(instance, deleting=True)


@receiver(pre_save, sender=ClientTerms, dispatch_uid="billing.lock_terms")
def refuse_terms_change(sender, instance: ClientTerms, raw=False, **kwargs) -> None:
    """Terms that would re-price a part an issued invoice billed are refused (RecordLocked)."""
    if not raw:
        ensure_terms_start(instance)
        client_terms_guard(instance)


@receiver(pre_delete, sender=ClientTerms, dispatch_uid="billing.lock_terms_delete")
def refuse_terms_delete(sender, instance: ClientTerms, **kwargs) -> None:
    client_terms_guard(instance, deleting=True)
