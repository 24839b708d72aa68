"""Keep the per-Host brand cache honest, and record a client's new terms with their date.

A saved or deleted price or alias gives the model catalogue a new version in the same
transaction, so every process drops its cached catalogue (`billing.catalogue`).

A saved or deleted client or brand forgets the per-Host brand cache. A client whose rate,
markup or increment changed gets a dated `ClientTerms` row (`billing.rates`), so past work
keeps the terms it was done at; its currency is fixed once an invoice was issued in it.
"""

from __future__ import annotations

from django.db.models.signals import post_delete, post_save, pre_save
from django.dispatch import receiver

from billing.branding import forget_hosts
from billing.budgets import budgets_changed
from billing.models import (
    Brand,
    ClientBudget,
    ClientDomain,
    ClientTerms,
    ExchangeRate,
    Invoice,
    InvoiceStatus,
    ModelAlias,
    ModelPrice,
    catalogue_changed,
)
from billing.rates import TERMS_FIELDS, RecordLocked, client_terms_record

ERR_CURRENCY_FIXED = (
    "{client} has issued invoices in {currency}; its currency can no longer change "
    "(create a new client for work billed in {new})."
)


@receiver(pre_save, sender=ClientDomain, dispatch_uid="billing.client_remember_old_host")
def client_remember_old_host(sender, instance: ClientDomain, raw=False, **kwargs) -> None:
    # A renamed hostname must drop the old name's cache entry too, not only the new one's.
    if raw or instance._state.adding:
        instance._previous_hostname = None
        instance._previous_terms = None
        return
    old = ClientDomain.objects.filter(pk=instance.pk).values("hostname", "currency", *TERMS_FIELDS).first() or {}
    instance._previous_hostname = old.get("hostname")
    instance._previous_terms = {name: old[name] for name in TERMS_FIELDS} if old else None
    if old and old["currency"] != instance.currency:
        issued = Invoice.objects.filter(client_id=instance.pk, status__in=(InvoiceStatus.ISSUED, InvoiceStatus.VOID))
        if issued.exists():
            raise RecordLocked(
                ERR_CURRENCY_FIXED.format(client=instance.name, currency=old["currency"], new=instance.currency)
            )


@receiver(post_save, sender=ClientDomain, dispatch_uid="billing.client_saved_forget_host")
@receiver(post_delete, sender=ClientDomain, dispatch_uid="billing.client_deleted_forget_host")
def client_changed(sender, instance: ClientDomain, **kwargs) -> None:
    forget_hosts(instance.hostname, getattr(instance, "_previous_hostname", None))


@receiver(post_save, sender=ClientDomain, dispatch_uid="billing.client_saved_record_terms")
def client_terms_changed(sender, instance: ClientDomain, created=False, raw=False, **kwargs) -> None:
    previous = getattr(instance, "_previous_terms", None)
    if raw or created or previous is None:
        return
    client_terms_record(client=instance, previous=previous)


@receiver(pre_save, sender=Brand, dispatch_uid="billing.brand_remember_old_client")
def brand_remember_old_client(sender, instance: Brand, raw=False, **kwargs) -> None:
    if raw or instance._state.adding:
        instance._previous_client_id = None
        return
    instance._previous_client_id = Brand.objects.filter(pk=instance.pk).values_list("client_id", flat=True).first()


@receiver(post_save, sender=Brand, dispatch_uid="billing.brand_saved_forget_host")
@receiver(post_delete, sender=Brand, dispatch_uid="billing.brand_deleted_forget_host")
def brand_changed(sender, instance: Brand, **kwargs) -> None:
    client_ids = {instance.client_id, getattr(instance, "_previous_client_id", None)} - {None}
    hosts = ClientDomain.objects.filter(pk__in=client_ids).exclude(hostname=None).values_list("hostname", flat=True)
    forget_hosts(*hosts)


# The budget check caches budgets, clients, terms and rates per process: any change to them
# bumps the shared version, so every process reloads before its next check.
for _model in (ClientBudget, ClientDomain, ClientTerms, ExchangeRate):
    post_save.connect(budgets_changed, sender=_model, dispatch_uid=f"billing.budgets_changed_save_{_model.__name__}")
    post_delete.connect(budgets_changed, sender=_model, dispatch_uid=f"billing.budgets_changed_del_{_model.__name__}")


@receiver(post_save, sender=ModelPrice, dispatch_uid="billing.price_saved_new_catalogue")
@receiver(post_delete, sender=ModelPrice, dispatch_uid="billing.price_deleted_new_catalogue")
@receiver(post_save, sender=ModelAlias, dispatch_uid="billing.alias_saved_new_catalogue")
@receiver(post_delete, sender=ModelAlias, dispatch_uid="billing.alias_deleted_new_catalogue")
def catalogue_edited(sender, instance, **kwargs) -> None:
    # In the edit's own transaction: every process's cached prices and aliases go stale with it.
    catalogue_changed()
