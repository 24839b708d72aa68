"""Sign-in and API-token throttling (issue 18, item 7), counted in the cache."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from django.conf import settings as django_settings
from django.core.cache import cache
from django.test import Client

from sessions_app import throttle
from sessions_app.gateway.views import ollama_tags
from sessions_app.models import ApiToken
from sessions_app.tests.processes import ROOT

pytestmark = pytest.mark.django_db
PASSWORD = "pw-for-tests-1"  # tests.factories.UserFactory's


@pytest.fixture(autouse=True)
def small_limits(settings):
    # A limit is part of its counters' cache key: these start from zero whatever ran before.
    settings.SIGNIN_FAILURE_LIMIT = (3, 600)
    settings.TOKEN_FAILURE_LIMIT = (4, 60)
    cache.clear()
    throttle.forget_blocked_addresses()
    yield
    cache.clear()
    throttle.forget_blocked_addresses()


@pytest.mark.parametrize("url", ["/accounts/login/", "/admin/login/"])
def test_sign_in_is_refused_after_too_many_failures_even_with_the_right_password(url, owner, staff):
    browser = Client()
    user = staff if url.startswith("/admin") else owner
    for _attempt in range(3):
        wrong = browser.post(url, {"username": user.username, "password": "wrong"})
        assert wrong.status_code == 200 and "correct username and password" in wrong.content.decode()
    refused = browser.post(url, {"username": user.username, "password": PASSWORD})
    assert refused.status_code == 429
    assert int(refused["Retry-After"]) > 0
    assert re.search(r"Too many failed sign-ins\. Try again in \d+ minutes?\.", refused.content.decode())
    assert "_auth_user_id" not in browser.session
    # Another account from the same address still signs in (the per-address limit is higher).
    other = Client().post("/accounts/login/", {"username": "colin", "password": PASSWORD})
    assert other.status_code in (200, 302)


def test_a_right_password_resets_nothing_and_is_never_counted(owner):
    browser = Client()
    for _attempt in range(5):
        assert browser.post("/accounts/login/", {"username": "olivia", "password": PASSWORD}).status_code == 302
        browser.logout()
    assert throttle.signin_wait(_request(), "olivia") == 0


def test_failures_on_many_usernames_from_one_address_are_throttled_too(owner):
    browser = Client()
    for index in range(3 * throttle.SIGNIN_ADDRESS_FACTOR):
        assert browser.post("/accounts/login/", {"username": f"guess{index}", "password": "x"}).status_code == 200
    assert browser.post("/accounts/login/", {"username": "olivia", "password": PASSWORD}).status_code == 429


def _request():
    from django.test import RequestFactory

    return RequestFactory().get("/")


def test_unknown_bearer_tokens_are_throttled_per_address_on_the_rest_api(owner):
    _token, good = ApiToken.issue(user=owner)
    for index in range(4):
        response = Client(HTTP_AUTHORIZATION=f"Bearer bws_guess{index}").get("/api/ollama/sessions")
        assert response.status_code == 401
    refused = Client(HTTP_AUTHORIZATION="Bearer bws_guess-5").get("/api/ollama/sessions")
    assert refused.status_code == 429 and int(refused["Retry-After"]) > 0
    assert refused.json()["error"]["code"] == "throttled"
    # Until the window ends, even a good token from that address is refused: guessing gains nothing.
    assert Client(HTTP_AUTHORIZATION=f"Bearer {good}").get("/api/ollama/sessions").status_code == 429
    other_address = Client(HTTP_AUTHORIZATION=f"Bearer {good}", REMOTE_ADDR="10.0.0.2")
    assert other_address.get("/api/ollama/sessions").status_code == 200


@pytest.mark.django_db(transaction=True)  # the gateway reads from its database thread
async def test_unknown_tokens_are_throttled_on_the_gateway_in_its_shape(owner):
    from django.test import AsyncRequestFactory

    factory = AsyncRequestFactory()
    statuses = []
    for index in range(5):
        response = await ollama_tags(factory.get("/api/tags", headers={"Authorization": f"Bearer bws_nope{index}"}))
        statuses.append(response.status_code)
    assert statuses == [401, 401, 401, 401, 429]
    import json

    assert "Too many requests with unknown API tokens" in json.loads(response.content)["error"]
    assert int(response["Retry-After"]) > 0
    # The path form too: /t/<token>/ is the same token check.
    response = await ollama_tags(factory.get("/t/bws_nope/api/tags"), token="bws_nope")
    assert response.status_code == 429


@pytest.mark.skipif(
    not os.environ.get("REDIS_URL"), reason="counters are shared between processes through Redis (set REDIS_URL)"
)
def test_failures_counted_by_another_process_throttle_this_one(owner):
    """Two processes, one Redis: sign-in failures in one refuse the next attempt in the other."""
    location = django_settings.CACHES["default"]["LOCATION"]  # this test worker's Redis database
    script = (
        "from django.test import RequestFactory\n"
        "from django.conf import settings\n"
        "settings.SIGNIN_FAILURE_LIMIT = (3, 600)\n"
        "from sessions_app import throttle\n"
        "request = RequestFactory().post('/accounts/login/')\n"
        "for _ in range(3): throttle.signin_failed(request, 'olivia')\n"
        "print(throttle.signin_wait(request, 'olivia') > 0)\n"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings_test", "REDIS_URL": location}
    done = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.strip().splitlines()[-1] == "True", done.stderr
    refused = Client().post("/accounts/login/", {"username": "olivia", "password": PASSWORD})
    assert refused.status_code == 429
