"""Aliases and prices cached per process: a staff edit reaches every process's very next call."""

from __future__ import annotations

from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from billing.catalogue import CatalogueCache, catalogue_cache, catalogue_pinned
from billing.models import CATALOGUE_KEY, CatalogueVersion, LLMUsage, ModelAlias, ModelPrice
from billing.pricing import load_price_list, price_for
from providers import router
from providers.naming import ModelRef
from sessions_app import services
from sessions_app.tests.conftest import run_chat

pytestmark = pytest.mark.usefixtures("sound_sessions")


def version() -> object:
    return CatalogueVersion.objects.filter(key=CATALOGUE_KEY).values_list("version", flat=True).get()


def catalogue_queries(queries) -> list[str]:
    return [q["sql"] for q in queries if "model_prices" in q["sql"] or "model_aliases" in q["sql"]]


def gpt_4o() -> ModelPrice:
    return ModelPrice.objects.filter(provider="openai", model="gpt-4o").latest("effective_from")


def test_two_processes_caches_both_see_a_price_edit_in_the_admin_at_once(staff_client, use_simulator):
    here, there = CatalogueCache(), CatalogueCache()
    old = gpt_4o()
    assert here.current().prices["openai"] == there.current().prices["openai"]
    assert (here.loads, there.loads) == (1, 1)
    here.current(), there.current()
    assert (here.loads, there.loads) == (1, 1)  # unchanged version: no reload

    form = {
        "provider": "openai",
        "model": "gpt-4o",
        "effective_from_0": old.effective_from.strftime("%Y-%m-%d"),
        "effective_from_1": old.effective_from.strftime("%H:%M:%S"),
        "input_per_mtok": "7.00",
        "output_per_mtok": "21.00",
        "context_window": "128000",
        "source": "renegotiated",
    }
    response = staff_client.post(reverse("admin:billing_modelprice_change", args=[old.pk]), form)
    assert response.status_code == 302, response.content[:500]

    for cache in (here, there):
        row = next(r for r in cache.current().prices["openai"] if r[1] == "gpt-4o")
        assert (row[2], row[3]) == (Decimal("7.00"), Decimal("21.00"))
    assert (here.loads, there.loads) == (2, 2)


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda: ModelPrice.objects.filter(model="gpt-4o").update(source="bulk"), id="queryset-update"),
        pytest.param(lambda: ModelAlias.objects.filter(alias="claude-sonnet-4").delete(), id="delete"),
        pytest.param(
            lambda: ModelAlias.objects.bulk_create([ModelAlias(provider="openai", alias="house", target="gpt-4o")]),
            id="bulk-create",
        ),
        pytest.param(
            lambda: load_price_list(
                {"prices": [], "aliases": [{"provider": "openai", "alias": "house", "target": "gpt-4o"}]}
            ),
            id="load-prices",
        ),
    ],
)
def test_every_kind_of_catalogue_write_gives_it_a_new_version(use_simulator, edit):
    before = version()
    edit()
    assert version() != before


def test_a_price_edit_bills_the_very_next_call(owner, client_acme, use_simulator):
    session = services.session_start(user=owner, client="acme", model="openai:gpt-4o")
    _texts, first = run_chat(session, owner, "Price this")
    first_usage = LLMUsage.objects.get(message=first.message.pk)

    # Another process (the admin's) doubles the price; this process's cache is warm.
    price = gpt_4o()
    price.input_per_mtok *= 2
    price.output_per_mtok *= 2
    price.save()

    _texts, second = run_chat(session, owner, "Price this")
    second_usage = LLMUsage.objects.get(message=second.message.pk)
    expected = (
        Decimal(second_usage.prompt_tokens) * price.input_per_mtok
        + Decimal(second_usage.completion_tokens) * price.output_per_mtok
    ) / Decimal(1_000_000)
    assert second_usage.cost == expected.quantize(Decimal("0.000001"))
    assert second_usage.cost is not None and first_usage.cost is not None
    assert second_usage.cost > first_usage.cost


def test_a_turn_reads_no_price_or_alias_rows_when_the_catalogue_is_unchanged(owner, client_acme, use_simulator):
    session = services.session_start(user=owner, client="acme", model="anthropic:claude-sonnet-4")
    run_chat(session, owner, "Warm the cache")
    with CaptureQueriesContext(connection) as queries:
        _texts, done = run_chat(session, owner, "Again")
    assert done.message.cost_usd > 0
    assert catalogue_queries(queries.captured_queries) == []
    reads = [q["sql"] for q in queries.captured_queries if f"'{CATALOGUE_KEY}'" in q["sql"]]
    assert len(reads) == 2  # once as the turn is claimed, once as its answer is priced:
    assert "FOR UPDATE" in reads[1] or connection.vendor == "sqlite"  # with the locked session row
    assert '"ollama_streaming_sessions"' in reads[1]


def test_a_price_edited_while_the_answer_streams_bills_that_answer(owner, client_acme, use_simulator):
    """The answer is priced at its store, with the version read under the session's lock."""
    session = services.session_start(user=owner, client="acme", model="openai:gpt-4o")
    run_chat(session, owner, "Warm the cache")
    price = gpt_4o()

    async def double_the_price(tokens: int) -> None:
        if tokens == 1:  # another process's edit, while the answer streams
            price.input_per_mtok *= 2
            price.output_per_mtok *= 2
            await sync_to_async(price.save)()

    _texts, done = run_chat(session, owner, "Price this", on_token=double_the_price)
    usage = LLMUsage.objects.get(message=done.message.pk)
    expected = (
        Decimal(usage.prompt_tokens) * price.input_per_mtok + Decimal(usage.completion_tokens) * price.output_per_mtok
    ) / Decimal(1_000_000)
    assert usage.cost == expected.quantize(Decimal("0.000001"))


def test_inside_a_pinned_block_lookups_cost_no_query(use_simulator):
    now = timezone.now()
    with catalogue_pinned(), CaptureQueriesContext(connection) as queries:
        assert router.resolve_alias(ModelRef("anthropic", "claude-sonnet-4")).model == "claude-sonnet-4-20250514"
        price = price_for("anthropic", "claude-sonnet-4", now)
        assert price is not None and price.model == "claude-sonnet-4-20250514"
        assert router.context_window(ModelRef("openai", "gpt-4o")) == 128000
    assert queries.captured_queries[1:] == []  # the version, read once as the block began


def test_a_catalogue_whose_version_row_is_gone_is_read_fresh_and_recreated_by_the_next_edit(use_simulator):
    cache = catalogue_cache()
    CatalogueVersion.objects.filter(key=CATALOGUE_KEY).delete()
    loads = cache.loads
    assert price_for("openai", "gpt-4o") is not None
    assert price_for("openai", "gpt-4o") is not None
    assert cache.loads == loads + 2  # no version to trust: every lookup reads the rows
    ModelPrice.objects.filter(model="gpt-4o").update(source="edited")
    assert CatalogueVersion.objects.filter(key=CATALOGUE_KEY).count() == 1
