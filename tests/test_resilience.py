"""A Redis outage never breaks a page: the cache falls back to local memory, the outage is logged once."""

from __future__ import annotations

import logging
import os
import threading

import pytest
from django.core.cache import cache

from config import resilience

UNREACHABLE = "redis://127.0.0.1:9/3"  # the discard port: nothing answers


@pytest.fixture
def redis_down(settings):
    resilience._CACHE_OUTAGES.pop(UNREACHABLE, None)
    settings.CACHES = {
        "default": {
            "BACKEND": "config.resilience.ResilientRedisCache",
            "LOCATION": UNREACHABLE,
            "OPTIONS": {"socket_connect_timeout": 1, "socket_timeout": 1},
        }
    }
    yield
    resilience._CACHE_OUTAGES.pop(UNREACHABLE, None)


def test_pages_answer_200_with_the_redis_cache_down_and_the_outage_is_logged_once(redis_down, owner_client, caplog):
    with caplog.at_level(logging.WARNING, logger="config.resilience"):
        statuses = [owner_client.get(path).status_code for path in ("/", "/sessions/", "/sessions/new/") * 3]
    assert statuses == [200] * 9
    assert caplog.text.count("is unreachable") == 1  # one warning for the outage, not one per request


def test_the_cache_keeps_working_from_local_memory_while_redis_is_down(redis_down):
    cache.set("stop-key", "user", 30)
    assert cache.get("stop-key") == "user"
    assert cache.get_many(["stop-key", "missing"]) == {"stop-key": "user"}
    cache.delete("stop-key")
    assert cache.get("stop-key") is None


def test_an_outage_tries_again_after_a_backoff_and_says_when_it_is_over(caplog):
    outage = resilience.Outage("The test dependency")
    with caplog.at_level(logging.WARNING, logger="config.resilience"):
        outage.failed(ConnectionError("refused"))
        assert outage.down and outage.should_skip()
        for _ in range(5):
            outage.failed(ConnectionError("refused"))  # calls made meanwhile do not push the retry out
        assert 0 < outage.retry_in() <= resilience.FIRST_RETRY_SECONDS
        outage.recovered()
    assert not outage.down and not outage.should_skip()
    assert caplog.text.count("is unreachable") == 1 and caplog.text.count("answers again after") == 1


def test_every_cache_instance_of_the_process_shares_one_redis_client_and_pool():
    """Django makes a cache instance per thread and per ASGI request; none may open its own pool."""
    params = {"OPTIONS": {"socket_connect_timeout": 1, "socket_timeout": 1}}
    first = resilience.ResilientRedisCache(UNREACHABLE, params)
    second = resilience.ResilientRedisCache(UNREACHABLE, params)
    other_options = resilience.ResilientRedisCache(UNREACHABLE, {"OPTIONS": {"socket_timeout": 2}})
    assert first._cache is second._cache
    assert first._cache._get_connection_pool(True) is second._cache._get_connection_pool(False)
    assert other_options._cache is not first._cache


@pytest.mark.skipif(not os.environ.get("REDIS_URL"), reason="needs a Redis: REDIS_URL is not set")
def test_requests_in_their_own_contexts_reuse_one_redis_connection():
    location = os.environ["REDIS_URL"]
    params = {"OPTIONS": {"socket_connect_timeout": 1, "socket_timeout": 1}}

    def one_request(index: int) -> None:  # a thread of its own, as a request without one gets
        resilience.ResilientRedisCache(location, params).get(f"resilience-test-{index}")

    for index in range(5):
        worker = threading.Thread(target=one_request, args=(index,))
        worker.start()
        worker.join()
    pool = resilience.ResilientRedisCache(location, params)._cache._get_connection_pool(False)
    assert pool._created_connections == 1
