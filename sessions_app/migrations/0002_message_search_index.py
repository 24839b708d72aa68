"""Full-text search over message content: a GIN index on PostgreSQL, nothing elsewhere."""

from django.db import migrations

INDEX = "ollama_session_messages_fts_idx"


def create_index(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(
            f"CREATE INDEX IF NOT EXISTS {INDEX} ON ollama_session_messages "
            "USING GIN (to_tsvector('english', content))"
        )


def drop_index(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f"DROP INDEX IF EXISTS {INDEX}")


class Migration(migrations.Migration):
    dependencies = [("sessions_app", "0001_initial")]

    operations = [migrations.RunPython(create_index, drop_index)]
