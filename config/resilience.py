"""Surviving a Redis outage: one warning per outage, and a cache that falls back to local memory.

With `REDIS_URL` set, Redis is the cache (brand lookups, stop requests, throttling) and the
channel layer (fan-out between processes). Neither may take a page down: while Redis does not
answer, the cache serves from this process's memory and the fan-out is skipped; both try Redis
again after a backoff and carry on by themselves once it answers. Each outage is logged once
when it starts and once when it ends, never once per request.
"""

from __future__ import annotations

import logging
import re
import threading
import time

from django.core.cache.backends.locmem import LocMemCache
from django.core.cache.backends.redis import RedisCache, RedisCacheClient
from django.utils.functional import cached_property
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

logger = logging.getLogger("config.resilience")

# What a Redis that is down, restarting or unreachable raises.
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)

FIRST_RETRY_SECONDS = 1.0
MAX_RETRY_SECONDS = 10.0


class Outage:
    """The state of one dependency: up, or down since when and when to try it again."""

    def __init__(
        self,
        name: str,
        *,
        down: str = "{name} is unreachable ({exc}); falling back until it answers again",
        max_retry: float = MAX_RETRY_SECONDS,
    ) -> None:
        self.name = name
        self._down_message = down
        self._max_retry = max_retry
        self._lock = threading.Lock()
        self.down_since: float | None = None
        self._retry_at = 0.0
        self._backoff = FIRST_RETRY_SECONDS

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def retry_in(self) -> float:
        """Seconds until the next try is due (0 when up, or due now)."""
        return max(0.0, self._retry_at - time.monotonic()) if self.down_since is not None else 0.0

    def should_skip(self) -> bool:
        """True while down and not yet due for another try (callers use their fallback)."""
        return self.down_since is not None and time.monotonic() < self._retry_at

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            now = time.monotonic()
            first = self.down_since is None
            if first:
                self.down_since = now
                self._backoff = FIRST_RETRY_SECONDS
                self._retry_at = now + self._backoff
            elif now >= self._retry_at:
                # A planned try failed: wait longer. (Failures of calls made meanwhile, while
                # others fall back, do not push the next try further out.)
                self._backoff = min(self._backoff * 2, self._max_retry)
                self._retry_at = now + self._backoff
        if first:
            logger.warning(self._down_message.format(name=self.name, exc=exc or type(exc).__name__))

    def recovered(self) -> None:
        if self.down_since is None:
            return
        with self._lock:
            since, self.down_since = self.down_since, None
        if since is not None:
            logger.warning("%s answers again after %.1f s", self.name, time.monotonic() - since)


# One per Redis the cache talks to (tests point caches at unreachable ports of their own).
_CACHE_OUTAGES: dict[str, Outage] = {}

# One client, so one connection pool, per Redis and options, shared by every cache instance
# of the process. Django makes a cache instance per thread and, under ASGI, per request; each
# would otherwise open its own pool, that is a new connection (HELLO, SELECT) per request.
_CACHE_CLIENTS: dict[tuple[str, str], RedisCacheClient] = {}
_CACHE_CLIENTS_LOCK = threading.Lock()


class ResilientRedisCache(RedisCache):
    """Django's Redis cache that serves from local memory while Redis is down.

    What was cached in Redis is out of reach meanwhile, and what is cached during the outage
    stays in this process: brand lookups are cached again from the database, and a stop asked
    from another process waits for Redis (a stop in this process never needs it).
    """

    def __init__(self, server, params) -> None:
        super().__init__(server, params)
        self._fallback = LocMemCache(f"redis-fallback:{server}", {"TIMEOUT": params.get("TIMEOUT", 300)})
        location = server if isinstance(server, str) else ",".join(server)
        self._client_options = params.get("OPTIONS", {})
        self._shared = (location, repr(sorted(self._client_options.items())))
        self._outage = _CACHE_OUTAGES.setdefault(location, Outage(f"The Redis cache at {location.split('@')[-1]}"))

    @cached_property
    def _cache(self):
        client = _CACHE_CLIENTS.get(self._shared)
        if client is None:
            with _CACHE_CLIENTS_LOCK:
                client = _CACHE_CLIENTS.setdefault(
                    self._shared, RedisCacheClient(re.split("[;,]", self._shared[0]), **self._client_options)
                )
        return client

    def _either(self, name: str, *args, **kwargs):
        if self._outage.should_skip():
            return getattr(self._fallback, name)(*args, **kwargs)
        try:
            result = getattr(RedisCache, name)(self, *args, **kwargs)
        except REDIS_DOWN as exc:
            self._outage.failed(exc)
            return getattr(self._fallback, name)(*args, **kwargs)
        self._outage.recovered()
        return result

    def add(self, *args, **kwargs):
        return self._either("add", *args, **kwargs)

    def get(self, *args, **kwargs):
        return self._either("get", *args, **kwargs)

    def set(self, *args, **kwargs):
        return self._either("set", *args, **kwargs)

    def touch(self, *args, **kwargs):
        return self._either("touch", *args, **kwargs)

    def delete(self, *args, **kwargs):
        return self._either("delete", *args, **kwargs)

    def get_many(self, *args, **kwargs):
        return self._either("get_many", *args, **kwargs)

    def has_key(self, *args, **kwargs):
        return self._either("has_key", *args, **kwargs)

    def incr(self, *args, **kwargs):
        return self._either("incr", *args, **kwargs)

    def set_many(self, *args, **kwargs):
        return self._either("set_many", *args, **kwargs)

    def delete_many(self, *args, **kwargs):
        return self._either("delete_many", *args, **kwargs)

    def clear(self):
        self._fallback.clear()
        return self._either("clear")
