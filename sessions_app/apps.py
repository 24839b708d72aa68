from django.apps import AppConfig


class SessionsAppConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "sessions_app"
    verbose_name = "Work sessions"

    def ready(self) -> None:
        # Connect the receivers and register CONTEXT_OVERFLOW=summarize.
        from sessions_app import signals, summarize  # noqa: F401
