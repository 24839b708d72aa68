from django.apps import AppConfig


class SessionsAppConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "sessions_app"
    verbose_name = "Work sessions"

    def ready(self) -> None:
        # Connect the receivers and register CONTEXT_OVERFLOW=summarize.
        # The invoice lock on sessions is a set of model-signal receivers (sessions_app/locks.py).
        from sessions_app import locks, signals, summarize  # noqa: F401
