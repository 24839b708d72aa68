"""The budgets' version: a second row of `model_catalogue_version`, renewed with every change to
budgets, clients, terms or exchange rates (`billing.budgets`)."""

from django.db import migrations


def create_version(apps, schema_editor):
    apps.get_model("billing", "CatalogueVersion").objects.get_or_create(key="budgets")


def remove_version(apps, schema_editor):
    apps.get_model("billing", "CatalogueVersion").objects.filter(key="budgets").delete()


class Migration(migrations.Migration):
    dependencies = [
        ("billing", "0006_catalogue_version"),
    ]

    operations = [
        migrations.RunPython(create_version, remove_version),
    ]
