"""Keep the per-Host brand cache honest: a saved or deleted client or brand forgets it."""

from __future__ import annotations

from django.db.models.signals import post_delete, post_save, pre_save
from django.dispatch import receiver

from billing.branding import forget_hosts
from billing.models import Brand, ClientDomain


@receiver(pre_save, sender=ClientDomain, dispatch_uid="billing.client_remember_old_host")
def client_remember_old_host(sender, instance: ClientDomain, raw=False, **kwargs) -> None:
    # A renamed hostname must drop the old name's cache entry too, not only the new one's.
    if raw or instance._state.adding:
        instance._previous_hostname = None
        return
    instance._previous_hostname = ClientDomain.objects.filter(pk=instance.pk).values_list("hostname", flat=True).first()


@receiver(post_save, sender=ClientDomain, dispatch_uid="billing.client_saved_forget_host")
@receiver(post_delete, sender=ClientDomain, dispatch_uid="billing.client_deleted_forget_host")
def client_changed(sender, instance: ClientDomain, **kwargs) -> None:
    forget_hosts(instance.hostname, getattr(instance, "_previous_hostname", None))


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
