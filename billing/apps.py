from django.apps import AppConfig


class BillingConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "billing"
    verbose_name = "Billing"

    def ready(self) -> None:
        # Connect the receivers: invoice locks, and the brand cache.
        from billing import locks, signals  # noqa: F401
        from billing.catalogue import BillingCatalogue
        from providers import router

        # The provider router is a leaf: it learns aliases, prices and windows from billing.
        router.set_catalogue(BillingCatalogue())
