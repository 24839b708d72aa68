"""The work session app. `from sessions_app import OllamaSessionManager` works in a plain script:
it sets Django up first (see `sessions_app.terminal.setup_django`)."""


def __getattr__(name: str):
    if name == "OllamaSessionManager":
        from sessions_app.terminal import setup_django

        setup_django()
        from sessions_app.toolkit import OllamaSessionManager

        return OllamaSessionManager
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
