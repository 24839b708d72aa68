"""Settings, driven by the environment (12-factor, django-environ).

Every variable is listed in `.env.example` and docs/CONFIGURATION.md. Bad values raise
`ImproperlyConfigured` naming the variable; secrets have no default outside development.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import zoneinfo
from pathlib import Path
from urllib.parse import urlparse

import environ
from csp.constants import NONCE, NONE, SELF, UNSAFE_INLINE
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
if (BASE_DIR / ".env").is_file():
    environ.Env.read_env(BASE_DIR / ".env")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def env_bool(name: str, default: bool) -> bool:
    """Read a boolean strictly: `DEBUG=maybe` is an error, not False."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default  # empty (as in .env.example) means "not set"
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (1/0, true/false, yes/no, on/off), got {raw!r}")


def env_int(name: str, default: int, *, minimum: int = 0) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, got {value}")
    return value


def env_float(name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number, got {raw!r}") from None
    if value < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, got {value}")
    return value


def env_url(name: str, default: str, *, schemes: tuple[str, ...] = ("http", "https")) -> str:
    raw = os.environ.get(name, "").strip() or default
    parsed = urlparse(raw)
    if parsed.scheme not in schemes or not parsed.netloc:
        raise ImproperlyConfigured(f"{name} must be a URL starting with {' or '.join(schemes)}://, got {raw!r}")
    return raw.rstrip("/")


def _ollama_host() -> str:
    # Ollama's own variable accepts "host:port" without a scheme; so do we.
    raw = os.environ.get("OLLAMA_HOST", "").strip() or "http://localhost:11434"
    if "://" not in raw:
        raw = f"http://{raw}"
    os.environ["OLLAMA_HOST"] = raw
    return env_url("OLLAMA_HOST", raw)


DEBUG = env_bool("DEBUG", False)

SECRET_KEY = os.environ.get("SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("SECRET_KEY must be set when DEBUG is off")
    # Development only: a random key kept on disk so sign-ins survive a restart.
    _key_file = BASE_DIR / ".dev-secret-key"
    if not _key_file.exists():
        _key_file.write_text(secrets.token_urlsafe(50))
    SECRET_KEY = _key_file.read_text().strip()

# ".localhost" lets the demo clients' hostnames (acme.localhost, ...) pick their branding locally.
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", ".localhost", "127.0.0.1", "[::1]"])
if not ALLOWED_HOSTS:
    raise ImproperlyConfigured("ALLOWED_HOSTS must list at least one host (comma-separated)")
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])
for _origin in CSRF_TRUSTED_ORIGINS:
    if urlparse(_origin).scheme not in ("http", "https") or not urlparse(_origin).netloc:
        raise ImproperlyConfigured(f"CSRF_TRUSTED_ORIGINS entries must look like https://host, got {_origin!r}")

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "channels",
    "billing",
    "sessions_app",
    "providers",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "csp.middleware.CSPMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "billing.context_processors.branding",
            ],
        },
    },
]

WSGI_APPLICATION = "config.wsgi.application"
ASGI_APPLICATION = "config.asgi.application"


def _redacted(url: str) -> str:
    """The URL with any password hidden, for error messages."""
    parsed = urlparse(url)
    if parsed.password:
        return url.replace(f":{parsed.password}@", ":***@", 1)
    return url


# Database: SQLite file by default, anything dj-database-url understands otherwise.
_default_db = f"sqlite:///{BASE_DIR / 'db.sqlite3'}"
_db_url = os.environ.get("DATABASE_URL", "").strip() or _default_db
try:
    _db = environ.Env.db_url_config(_db_url)
except Exception as exc:  # django-environ raises several kinds for a malformed URL
    raise ImproperlyConfigured(f"DATABASE_URL is malformed: {exc}") from None
_SUPPORTED_ENGINES = ("django.db.backends.sqlite3", "django.db.backends.postgresql")
if _db.get("ENGINE") not in _SUPPORTED_ENGINES:
    raise ImproperlyConfigured(
        f"DATABASE_URL must start with sqlite:// or postgres:// (PostgreSQL or SQLite only), got {_redacted(_db_url)!r}"
    )
if not _db.get("NAME"):
    raise ImproperlyConfigured(f"DATABASE_URL names no database, got {_redacted(_db_url)!r}")
_prepared_statements = env_bool("DB_PREPARED_STATEMENTS", True)  # read on SQLite too, so a typo is caught
if _db["ENGINE"].endswith("sqlite3"):
    # IMMEDIATE: a transaction takes the write lock when it begins, so concurrent writers wait
    # (up to `timeout`) instead of failing with "database is locked" when a read turns into a write.
    _db.setdefault("OPTIONS", {}).update({"timeout": 20, "transaction_mode": "IMMEDIATE"})
    # The covering index on messages (migration sessions_app 0004) INCLUDEs columns for
    # PostgreSQL's index-only scans; SQLite builds the same index without them, which is all a
    # development database needs, so its warning on every command says nothing to act on.
    SILENCED_SYSTEM_CHECKS = ["models.W040"]
else:
    # Under ASGI, Django closes its connection after each request and each thread hop; a
    # fresh PostgreSQL connection costs milliseconds every time. psycopg's pool (Django 5.1+)
    # hands back an open one instead. Persistent connections (CONN_MAX_AGE) must stay 0 with it.
    _db["CONN_MAX_AGE"] = 0
    if env_bool("DB_POOL", True):
        _db.setdefault("OPTIONS", {})["pool"] = {
            "min_size": env_int("DB_POOL_MIN_SIZE", 2),
            "max_size": env_int("DB_POOL_MAX_SIZE", 20, minimum=1),
            "timeout": env_float("DB_POOL_TIMEOUT", 10.0, minimum=0.1),
        }
    if _prepared_statements:
        # Bind parameters on the server, and let psycopg prepare a statement once a connection
        # has run it five times: PostgreSQL then skips parsing and planning the same few queries
        # that every chat turn and gateway call makes. Off (0) behind a pooler that cannot keep
        # prepared statements (PgBouncer in transaction mode before 1.21).
        _db.setdefault("OPTIONS", {}).update(server_side_binding=True, prepare_threshold=5)
DATABASES = {"default": _db}
# Threads that run the async code's database calls under a server (config/dbthread.py). The
# calls are short and mostly Python (they hold the GIL): a few threads overlap the waits for
# the database, more only contend for the GIL (bench/peers.py: 4 threads cost 12-18 % less
# CPU per gateway call than 20 at 50 concurrent calls).
DB_THREADS = env_int("DB_THREADS", 4, minimum=1)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = os.environ.get("REDIS_URL", "").strip()
if REDIS_URL:
    if urlparse(REDIS_URL).scheme not in ("redis", "rediss", "unix"):
        raise ImproperlyConfigured(f"REDIS_URL must start with redis:// or rediss://, got {_redacted(REDIS_URL)!r}")
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            # redis-py 8 reads with a 5 s socket timeout, the same as channels_redis's 5 s
            # blocking pop: an idle socket's receive then fails every 5 s. Read longer.
            "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_timeout": 30}], "capacity": 1500, "expiry": 30},
        }
    }
    # Pages never wait long on Redis, nor fail with it: while it is down the cache serves from
    # local memory (config/resilience.py), logging the outage once.
    CACHES = {
        "default": {
            "BACKEND": "config.resilience.ResilientRedisCache",
            "LOCATION": REDIS_URL,
            "OPTIONS": {"socket_connect_timeout": 1, "socket_timeout": 1},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = os.environ.get("TIME_ZONE", "").strip() or "UTC"
try:
    zoneinfo.ZoneInfo(TIME_ZONE)
except (zoneinfo.ZoneInfoNotFoundError, ValueError):
    raise ImproperlyConfigured(f"TIME_ZONE must be an IANA zone name such as UTC or Europe/Paris, got {TIME_ZONE!r}")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = BASE_DIR / "staticfiles"

LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = False  # the chat page's JS reads it for fetch() calls
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
if not DEBUG:
    SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", True)
    CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", True)

# Transport security for production behind HTTPS (docs/OPERATIONS.md). HSTS is sent on HTTPS
# requests only, so its default (a year, with DEBUG off) is safe on a plain-HTTP test install.
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0 if DEBUG else 31_536_000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)
# Off by default: behind a TLS-terminating proxy it needs SECURE_PROXY_SSL_HEADER, or every
# request would be redirected again and again.
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", False)


def _proxy_ssl_header() -> tuple[str, str] | None:
    """`HTTP_X_FORWARDED_PROTO` (the value `https` is implied) or `HTTP_X_FORWARDED_PROTO,https`."""
    raw = os.environ.get("SECURE_PROXY_SSL_HEADER", "").strip()
    if not raw:
        return None
    header, _, value = (part.strip() for part in raw.partition(","))
    if not re.fullmatch(r"HTTP_[A-Z0-9_]+", header):
        raise ImproperlyConfigured(
            f"SECURE_PROXY_SSL_HEADER must be a request META key such as HTTP_X_FORWARDED_PROTO, got {raw!r}"
        )
    return header, value or "https"


# Trust the proxy's word that a request came over HTTPS (set only behind a proxy that sets it).
SECURE_PROXY_SSL_HEADER = _proxy_ssl_header()

# Content-Security-Policy (django-csp): scripts and <style> blocks only from this site or with
# the response's nonce, so an injected <script> never runs. Style attributes stay allowed
# (the admin's colour swatches, the summary's share bars): they cannot run code.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF, NONCE],
        "style-src": [SELF, NONCE],
        "style-src-attr": [UNSAFE_INLINE],
        "img-src": [SELF, "data:", "https:"],  # brand logos may live on the client's own site
        "connect-src": [SELF],  # fetch() and the chat WebSocket, same origin
        "font-src": [SELF],
        "object-src": [NONE],
        "base-uri": [SELF],
        "form-action": [SELF],
        "frame-ancestors": [NONE],
    }
}


def env_rate(name: str, default: str) -> tuple[int, int]:
    """A limit such as `10/10m`: (count, seconds); the period is s, m, h or d, optionally with a number."""
    raw = os.environ.get(name, "").strip() or default
    match = re.fullmatch(r"(\d+)/(\d*)([smhd])", raw)
    if not match or int(match.group(1)) < 1 or match.group(2) == "0":
        raise ImproperlyConfigured(f"{name} must look like 10/10m (count per period: s, m, h or d), got {raw!r}")
    count, multiple, unit = match.groups()
    return int(count), int(multiple or 1) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


# Throttling (sessions_app/throttle.py), counted in the cache: shared by every process with Redis.
SIGNIN_FAILURE_LIMIT = env_rate("SIGNIN_FAILURE_LIMIT", "10/15m")  # per username; 5x that per address
TOKEN_FAILURE_LIMIT = env_rate("TOKEN_FAILURE_LIMIT", "30/1m")  # unknown API tokens per address
# Behind a proxy every request comes from the proxy: name the header it puts the client's address
# in (its last hop is used), e.g. HTTP_X_FORWARDED_FOR. Unset: REMOTE_ADDR.
CLIENT_IP_HEADER = os.environ.get("CLIENT_IP_HEADER", "").strip()
if CLIENT_IP_HEADER and not re.fullmatch(r"HTTP_[A-Z0-9_]+|REMOTE_ADDR", CLIENT_IP_HEADER):
    raise ImproperlyConfigured(
        f"CLIENT_IP_HEADER must be a request META key such as HTTP_X_FORWARDED_FOR, got {CLIENT_IP_HEADER!r}"
    )
RATELIMIT_HASH_ALGORITHM = "hashlib.sha256"

LOG_LEVEL = os.environ.get("LOG_LEVEL", "").strip().upper() or "INFO"
if LOG_LEVEL not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
    raise ImproperlyConfigured(f"LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got {LOG_LEVEL!r}")

# Static files: collected to STATIC_ROOT for a proxy in production; served by the ASGI app
# itself in development, or anywhere SERVE_STATIC is on (a single-box install).
SERVE_STATIC = env_bool("SERVE_STATIC", DEBUG)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    # No secret in any log: API tokens (in /t/<token>/ paths, or raw) are masked on every line.
    "filters": {"mask_secrets": {"()": "config.logmask.MaskSecrets"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "filters": ["mask_secrets"]}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        # Django's own handlers (its DEBUG console, runserver's) would print every line twice
        # beside the root's, and unmasked: everything goes through ours.
        "django": {"handlers": [], "level": LOG_LEVEL, "propagate": True},
        "django.server": {"handlers": [], "propagate": True},
        # A 4xx is an expected answer, already one line in the access log; a 5xx keeps its traceback.
        "django.request": {"level": "ERROR"},
        # httpx2 is the HTTP client inside the openai/anthropic SDKs: no INFO line per provider call.
        "httpx": {"level": "WARNING"},
        "httpx2": {"level": "WARNING"},
        "daphne": {"level": "WARNING"},
    },
}

# --- Providers --------------------------------------------------------------------------
OLLAMA_HOST = _ollama_host()
OPENAI_API_KEY = os.environ.get("OPENAI_API_KEY", "")
OPENAI_BASE_URL = env_url("OPENAI_BASE_URL", "https://api.openai.com/v1")
ANTHROPIC_API_KEY = os.environ.get("ANTHROPIC_API_KEY", "")
ANTHROPIC_BASE_URL = env_url("ANTHROPIC_BASE_URL", "https://api.anthropic.com")

PROVIDER_CONNECT_TIMEOUT = env_float("PROVIDER_CONNECT_TIMEOUT", 5.0, minimum=0.01)
PROVIDER_FIRST_TOKEN_TIMEOUT = env_float("PROVIDER_FIRST_TOKEN_TIMEOUT", 120.0, minimum=0.01)
PROVIDER_IDLE_TIMEOUT = env_float("PROVIDER_IDLE_TIMEOUT", 60.0, minimum=0.01)
PROVIDER_MAX_RETRIES = env_int("PROVIDER_MAX_RETRIES", 2)
PROVIDER_RETRY_BACKOFF = env_float("PROVIDER_RETRY_BACKOFF", 0.5)  # seconds, doubled per retry
OLLAMA_KEEP_ALIVE = os.environ.get("OLLAMA_KEEP_ALIVE", "").strip() or "10m"
if not re.fullmatch(r"-?\d+(\.\d+)?(ms|s|m|h)?", OLLAMA_KEEP_ALIVE):
    raise ImproperlyConfigured(
        f"OLLAMA_KEEP_ALIVE must be a duration such as 10m, 1h, 300 or -1, got {OLLAMA_KEEP_ALIVE!r}"
    )
OLLAMA_NUM_CTX = env_int("OLLAMA_NUM_CTX", 8192, minimum=256)
ANTHROPIC_MAX_TOKENS = env_int("ANTHROPIC_MAX_TOKENS", 4096, minimum=1)
# Set by `make run` when it started the bundled simulator because no Ollama answered.
PROVIDER_SIMULATOR = env_bool("PROVIDER_SIMULATOR", False)

# --- Email and budgets ------------------------------------------------------------------
# Django's email backend from one URL (django-environ): smtp://user:password@host:587 (or
# smtp+tls://, smtp+ssl://), consolemail:// (print to the terminal), dummymail:// (drop).
EMAIL_URL = os.environ.get("EMAIL_URL", "").strip() or ("consolemail://" if DEBUG else "smtp://localhost:25")
try:
    vars().update(environ.Env.email_url_config(EMAIL_URL))
except (KeyError, ValueError):
    raise ImproperlyConfigured(
        f"EMAIL_URL must look like smtp://host:port or consolemail://, got {_redacted(EMAIL_URL)!r}"
    ) from None
DEFAULT_FROM_EMAIL = os.environ.get("DEFAULT_FROM_EMAIL", "").strip() or "billing@localhost"
# The firm that sends invoices, printed at their head: lines separated by ";".
INVOICE_ISSUER = os.environ.get("INVOICE_ISSUER", "").strip() or "Billable Sessions"
# Who gets the budget warnings (80 % and 100 % of a client's monthly budget); empty: every
# active staff member with an email address.
BUDGET_ALERT_EMAILS = env.list("BUDGET_ALERT_EMAILS", default=[])
for _address in BUDGET_ALERT_EMAILS:
    if "@" not in _address:
        raise ImproperlyConfigured(f"BUDGET_ALERT_EMAILS must list email addresses, got {_address!r}")

# --- Sessions ---------------------------------------------------------------------------
SESSION_IDLE_TIMEOUT = env_int("SESSION_IDLE_TIMEOUT", 1800, minimum=1)  # seconds
CHAT_MAX_MESSAGE_CHARS = env_int("CHAT_MAX_MESSAGE_CHARS", 32_000, minimum=1)
# A turn (an answer being streamed) counts as stale, its claim abandoned, when nothing has been
# heard of it this long: not since it was claimed, nor since its last checkpoint. The one
# definition of "stale turn" and "stuck session": the guardian settles such turns, the monitoring
# page lists them, and the next chat takes the claim over. The default outlasts the longest
# silence the provider timeouts allow (every attempt waiting for its first token, then one
# idle gap) plus half a minute, so a slow but live answer is never taken for a dead one.
_longest_silence = (PROVIDER_CONNECT_TIMEOUT + PROVIDER_FIRST_TOKEN_TIMEOUT) * (
    PROVIDER_MAX_RETRIES + 1
) + PROVIDER_IDLE_TIMEOUT
TURN_STALE_SECONDS = env_int("TURN_STALE_SECONDS", int(_longest_silence) + 30, minimum=1)
# On SIGTERM, daphne stops taking new turns and lets running ones finish for this many seconds;
# then it stores what they have as partial answers and exits.
SHUTDOWN_GRACE_SECONDS = env_float("SHUTDOWN_GRACE_SECONDS", 20.0)
CONTEXT_OVERFLOW = os.environ.get("CONTEXT_OVERFLOW", "truncate")
if CONTEXT_OVERFLOW not in ("truncate", "summarize"):
    raise ImproperlyConfigured(f"CONTEXT_OVERFLOW must be 'truncate' or 'summarize', got {CONTEXT_OVERFLOW!r}")
# The model a new session starts on unless one is picked (the new-session form, manage.py chat,
# ollama-chat), and the client terminal sessions bill unless --client names one.
CHAT_MODEL = os.environ.get("CHAT_MODEL", "").strip() or "ollama:llama3.2"
if not re.fullmatch(r"[^\s\x00-\x1f]{1,200}", CHAT_MODEL):
    raise ImproperlyConfigured(f"CHAT_MODEL must be a model name such as ollama:llama3.2, got {CHAT_MODEL!r}")
CHAT_CLIENT = os.environ.get("CHAT_CLIENT", "").strip()
if not re.fullmatch(r"[-a-zA-Z0-9_]{0,100}", CHAT_CLIENT):
    raise ImproperlyConfigured(f"CHAT_CLIENT must be a client slug such as acme, got {CHAT_CLIENT!r}")


def _signing_key() -> str:
    raw = os.environ.get("SESSION_SIGNING_KEY", "").strip()
    if raw:
        try:
            seed = base64.b64decode(raw, validate=True)
        except ValueError:
            raise ImproperlyConfigured("SESSION_SIGNING_KEY must be base64") from None
        if len(seed) != 32:
            raise ImproperlyConfigured(f"SESSION_SIGNING_KEY must decode to 32 bytes, got {len(seed)}")
        return raw
    if not DEBUG:
        raise ImproperlyConfigured("SESSION_SIGNING_KEY must be set when DEBUG is off")
    # Development: generate one and keep it beside the SQLite database.
    db_name = DATABASES["default"].get("NAME")
    folder = Path(db_name).parent if _db["ENGINE"].endswith("sqlite3") and db_name else BASE_DIR
    key_file = folder / ".signing-key"
    if not key_file.exists():
        key_file.write_text(base64.b64encode(secrets.token_bytes(32)).decode())
    return key_file.read_text().strip()


SESSION_SIGNING_KEY = _signing_key()


def _trusted_keys() -> list[str]:
    """Other servers' public keys (base64, raw Ed25519) whose sealed exports import as valid."""
    keys = [raw.strip() for raw in os.environ.get("SESSION_TRUSTED_KEYS", "").split(",") if raw.strip()]
    for raw in keys:
        try:
            public = base64.b64decode(raw, validate=True)
        except ValueError:
            raise ImproperlyConfigured(f"SESSION_TRUSTED_KEYS entries must be base64, got {raw[:60]!r}") from None
        if len(public) != 32:
            raise ImproperlyConfigured(
                f"SESSION_TRUSTED_KEYS entries must be raw Ed25519 public keys (32 bytes), got {len(public)} bytes"
            )
    return keys


SESSION_TRUSTED_KEYS = _trusted_keys()
