"""Test settings: only speed and isolation knobs differ, and a non-UTC zone."""

import os

os.environ.setdefault("SECRET_KEY", "test-only-not-secret")
os.environ.setdefault("SESSION_SIGNING_KEY", "dGVzdC1zaWduaW5nLWtleS0zMi1ieXRlcy1sb25nISE=")
# Isolation: the suite signs in and sends bad tokens from one address all day; the throttling
# tests set their own small limits (a limit is part of its counters' cache key, so they start at 0).
os.environ.setdefault("SIGNIN_FAILURE_LIMIT", "10000/1m")
os.environ.setdefault("TOKEN_FAILURE_LIMIT", "10000/1m")

from config.settings import *  # noqa: F403

TIME_ZONE = "America/New_York"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.InMemoryStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}

# Each pytest-xdist worker keeps its cache in a Redis database of its own: a test's
# `cache.clear()` is FLUSHDB, which must not wipe another worker's keys in the middle of a test
# (a cached brand lookup, a stop request). Daphne processes started by tests keep REDIS_URL's.
_worker = os.environ.get("PYTEST_XDIST_WORKER", "")
if REDIS_URL and _worker.startswith("gw") and _worker[2:].isdigit():  # noqa: F405
    from urllib.parse import urlsplit, urlunsplit

    _redis = urlsplit(REDIS_URL)  # noqa: F405
    CACHES = {
        "default": {
            **CACHES["default"],  # noqa: F405
            "LOCATION": urlunsplit(_redis._replace(path=f"/{1 + int(_worker[2:]) % 15}")),
        }
    }
