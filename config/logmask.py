"""No secret in any log: API tokens are masked wherever a line could carry one.

A token reaches a log line in two ways: inside a path (`/t/<token>/api/chat`, for clients that
cannot send a header), and, in principle, anywhere a raw `bws_…` value is echoed (a traceback,
a repr). Three places write lines:

- daphne's access log (`AccessLogGenerator`, one NCSA line per request to stdout or a file),
  which prints the path as the client sent it: `install_access_log_mask()` makes it mask;
- Python logging (Django's "Not Found: /t/…", the gateway's own lines, tracebacks): the
  `MaskSecrets` filter on every handler in settings.LOGGING;
- the gateway's own messages, which call `mask` directly.

The mask keeps the first six characters (`/t/bws_ab…/`), enough to tell tokens apart in an
incident without being usable.
"""

from __future__ import annotations

import logging
import re

# A path segment after /t/ (the whole token, whatever it looks like) and a raw token anywhere.
_TOKEN_IN_PATH = re.compile(r"/t/([^/\s\"?]{0,6})[^/\s\"?]*")
_RAW_TOKEN = re.compile(r"\b(bws_[A-Za-z0-9_-]{2})[A-Za-z0-9_-]{6,}")


def mask(text: str) -> str:
    """`text` with every API token cut to its first characters."""
    if "/t/" in text:
        text = _TOKEN_IN_PATH.sub(r"/t/\1…", text)
    if "bws_" in text:
        text = _RAW_TOKEN.sub(r"\1…", text)
    return text


class MaskSecrets(logging.Filter):
    """A logging filter that masks tokens in the formatted message and any traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            # Format the traceback now, masked, so handlers print this text instead.
            record.exc_text = mask(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = mask(record.exc_text)
        return True


def install_access_log_mask() -> None:
    """Make daphne's access log mask tokens in the request line it writes.

    daphne's command line builds its `AccessLogGenerator` itself and offers no hook to replace
    it, so the class's writer is wrapped, once, before the server writes its first line (the
    ASGI application is imported before the server starts).
    """
    try:
        from daphne.access import AccessLogGenerator
    except ImportError:  # not served by daphne
        return
    if getattr(AccessLogGenerator.write_entry, "masks_tokens", False):
        return
    original = AccessLogGenerator.write_entry

    def write_entry(self, host, date, request, status=None, length=None, ident=None, user=None):
        return original(self, host, date, mask(request), status, length, ident, user)

    write_entry.masks_tokens = True
    AccessLogGenerator.write_entry = write_entry
