"""Domain errors of the session services, each with the API code and HTTP status it maps to.

Messages are module constants so tests can assert on them.
"""

from __future__ import annotations

SESSION_NOT_FOUND = "No such session."
SESSION_ENDED = "This session has ended."
SESSION_BUSY = "An answer is already streaming in this session; wait for it or stop it."
SESSION_LOCKED = "This session is on an issued invoice; its billed fields can no longer change."
MESSAGE_EMPTY = "The message is empty."
MESSAGE_TOO_LARGE = "The message is {size} characters; the limit is {limit}."
UNKNOWN_CLIENT = "Unknown client {slug!r}."
CLIENT_NOT_ALLOWED = "You may not bill client {slug!r}."
UNKNOWN_MODEL = "Unknown model {model!r}."
NOT_OWNER = "Only the consultant who started this session can do that."


class SessionError(Exception):
    code = "error"
    status = 400

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        if status:
            self.status = status

    def __str__(self) -> str:
        return self.message

    def as_dict(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}


class BadInput(SessionError):
    code, status = "bad_request", 400


class NotFound(SessionError):
    code, status = "not_found", 404


class NotOwner(SessionError):
    """An invited consultant asked for what only the session's owner may do."""

    code, status = "not_owner", 403


class SessionEnded(SessionError):
    code, status = "session_ended", 409


class SessionBusy(SessionError):
    code, status = "session_busy", 409


class SessionLocked(SessionError):
    code, status = "session_locked", 409


class MessageTooLarge(SessionError):
    code, status = "message_too_large", 413


class Unavailable(SessionError):
    """Try again shortly: answered 503 with `Retry-After` (`retry_after` seconds)."""

    code, status = "unavailable", 503
    retry_after = 1


class ServerStopping(Unavailable):
    """The process is shutting down and takes no new turn; another process (or its restart) will."""

    code = "server_stopping"
    retry_after = 5


class StoreFailed(Unavailable):
    """The answer streamed but could not be stored: its text is logged and the guardian restores it."""

    code = "store_failed"


class ProviderFailed(SessionError):
    """The provider failed; the user message and any partial answer are stored."""

    code, status = "provider_error", 502

    def __init__(self, message: str, *, kind: str = "server", message_id=None, **kwargs) -> None:
        super().__init__(message, **kwargs)
        self.kind = kind
        self.message_id = message_id


class ProviderTimeout(ProviderFailed):
    code, status = "provider_timeout", 504
