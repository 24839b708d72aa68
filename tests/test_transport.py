"""Transport security (issue 18, item 10): settings from the environment, HSTS, the HTTPS
redirect behind a proxy, the Content-Security-Policy, and no-store on authenticated JSON."""

from __future__ import annotations

import base64
import re
import secrets

import pytest
from django.test import Client, override_settings

from sessions_app.models import ApiToken
from tests.test_settings import GOOD_KEY, import_settings, manage

pytestmark = pytest.mark.django_db

PRODUCTION = {
    "DEBUG": "0",
    "SECRET_KEY": secrets.token_urlsafe(50),
    "SESSION_SIGNING_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
    "ALLOWED_HOSTS": "billing.example.com",
    "CSRF_TRUSTED_ORIGINS": "https://billing.example.com",
    "SECURE_SSL_REDIRECT": "1",
    "SECURE_PROXY_SSL_HEADER": "HTTP_X_FORWARDED_PROTO",
    "SECURE_HSTS_INCLUDE_SUBDOMAINS": "1",
    "SECURE_HSTS_PRELOAD": "1",
}


def test_check_deploy_is_clean_with_production_settings(tmp_path):
    result = manage(tmp_path, "check", "--deploy", "--fail-level", "WARNING", **PRODUCTION)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout


def test_check_deploy_names_what_a_production_install_forgot(tmp_path):
    result = manage(tmp_path, "check", "--deploy", **{**PRODUCTION, "SECURE_SSL_REDIRECT": "0"})
    assert "security.W008" in result.stdout + result.stderr


def test_transport_settings_come_from_the_environment(tmp_path):
    script = (
        "import config.settings as s; print(s.SECURE_HSTS_SECONDS, s.SECURE_SSL_REDIRECT, s.SECURE_PROXY_SSL_HEADER)"
    )
    production = import_settings(tmp_path, script, DEBUG="0", SESSION_SIGNING_KEY=GOOD_KEY)
    assert production.stdout.split() == ["31536000", "False", "None"], production.stderr
    behind_proxy = import_settings(
        tmp_path,
        script,
        DEBUG="0",
        SESSION_SIGNING_KEY=GOOD_KEY,
        SECURE_HSTS_SECONDS="600",
        SECURE_SSL_REDIRECT="1",
        SECURE_PROXY_SSL_HEADER="HTTP_X_FORWARDED_PROTO,https",
    )
    assert behind_proxy.stdout.strip() == "600 True ('HTTP_X_FORWARDED_PROTO', 'https')", behind_proxy.stderr
    refused = import_settings(tmp_path, script, DEBUG="0", SESSION_SIGNING_KEY=GOOD_KEY, SECURE_PROXY_SSL_HEADER="X")
    assert refused.returncode != 0 and "SECURE_PROXY_SSL_HEADER" in refused.stderr.strip().splitlines()[-1]


@override_settings(
    SECURE_SSL_REDIRECT=True,
    SECURE_PROXY_SSL_HEADER=("HTTP_X_FORWARDED_PROTO", "https"),
    SECURE_HSTS_SECONDS=31_536_000,
    SECURE_HSTS_INCLUDE_SUBDOMAINS=True,
)
def test_behind_a_proxy_plain_http_is_redirected_and_https_gets_hsts(owner, client_acme):
    plain = Client().get("/accounts/login/")
    assert plain.status_code == 301 and plain["Location"] == "https://testserver/accounts/login/"
    secure = Client().get("/accounts/login/", HTTP_X_FORWARDED_PROTO="https")
    assert secure.status_code == 200
    assert secure["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains"
    _token, raw = ApiToken.issue(user=owner, client=client_acme)
    gateway = Client().get("/api/tags", HTTP_AUTHORIZATION=f"Bearer {raw}")  # the gateway is redirected too
    assert gateway.status_code == 301


def test_pages_carry_a_content_security_policy_whose_nonce_their_inline_style_uses(owner_client):
    for path in ("/", "/sessions/", "/sessions/new/", "/search/?q=x", "/reports/mine/", "/accounts/login/"):
        response = owner_client.get(path)
        assert response.status_code == 200, path
        policy = response["Content-Security-Policy"]
        script_src = re.search(r"script-src ([^;]*)", policy).group(1)
        assert "'unsafe-inline'" not in script_src and "'self'" in script_src
        nonce = re.search(r"'nonce-([^']+)'", script_src).group(1)
        html = response.content.decode()
        for tag in re.findall(r"<script\b[^>]*>", html):
            if 'type="application/json"' in tag:
                continue  # a data block (json_script): never run, so the policy does not apply
            assert "src=" in tag or f'nonce="{nonce}"' in tag, (path, tag)
        for tag in re.findall(r"<style\b[^>]*>", html):
            assert f'nonce="{nonce}"' in tag, (path, tag)
        assert not re.search(r"<[^>]+\son[a-z]+\s*=", html), path  # no inline event handlers


def test_authenticated_json_is_never_stored_by_a_cache(owner, client_acme, owner_client):
    _token, raw = ApiToken.issue(user=owner, client=client_acme)
    bearer = Client(HTTP_AUTHORIZATION=f"Bearer {raw}")
    for client, path in [
        (bearer, "/api/ollama/sessions"),
        (bearer, "/api/ollama/stats"),
        (bearer, "/api/ollama/session/not-a-session/summary"),
        (bearer, "/api/tags"),
        (bearer, "/v1/models"),
        (owner_client, "/api/ollama/sessions"),
        (owner_client, "/sessions/models.json"),
    ]:
        response = client.get(path)
        assert "no-store" in response.get("Cache-Control", ""), (path, response.status_code, response.headers)
    assert Client().get("/api/ollama/signing-key")["Cache-Control"] == "public, max-age=300"
