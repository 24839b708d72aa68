"""The model catalogue's version: one row, renewed with every price or alias write."""

import uuid

from django.db import migrations, models


def create_version(apps, schema_editor):
    apps.get_model("billing", "CatalogueVersion").objects.get_or_create(key="catalogue")


class Migration(migrations.Migration):
    dependencies = [
        ("billing", "0005_currencies_invoices_budgets"),
    ]

    operations = [
        migrations.CreateModel(
            name="CatalogueVersion",
            fields=[
                ("id", models.UUIDField(default=uuid.uuid4, editable=False, primary_key=True, serialize=False)),
                ("key", models.CharField(default="catalogue", max_length=20, unique=True)),
                ("version", models.UUIDField(default=uuid.uuid4)),
            ],
            options={
                "db_table": "model_catalogue_version",
            },
        ),
        migrations.RunPython(create_version, migrations.RunPython.noop),
    ]
