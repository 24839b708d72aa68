"""The database itself refuses impossible billing data, whatever code path wrote it."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.db import DataError, IntegrityError, transaction

from billing.models import Brand, ClientDomain, LLMUsage, ModelPrice
from sessions_app.models import ChatSession, ContextStream, SessionMessage
from tests.factories import (
    BrandFactory,
    ClientFactory,
    MessageFactory,
    PriceFactory,
    SessionFactory,
    UsageFactory,
    UserFactory,
)

pytestmark = pytest.mark.django_db


def refused(build, errors=IntegrityError) -> None:
    with pytest.raises(errors), transaction.atomic():
        build()


def test_usage_with_negative_tokens_or_cost_is_refused():
    user = UserFactory()
    refused(lambda: UsageFactory(user=user, prompt_tokens=-1))
    refused(lambda: UsageFactory(user=user, completion_tokens=-5))
    refused(lambda: UsageFactory(user=user, cost=Decimal("-0.000001")))
    assert LLMUsage.objects.count() == 0


def test_usage_with_unknown_cost_is_allowed_and_flagged():
    usage = UsageFactory(user=UserFactory(), provider="openai", model="gpt-9", cost=None)
    assert usage.price_missing
    assert list(LLMUsage.objects.unpriced()) == [usage]


def test_message_with_negative_tokens_or_cost_is_refused():
    session = SessionFactory()
    refused(lambda: MessageFactory(session=session, seq=1, tokens=-1))
    refused(lambda: MessageFactory(session=session, seq=1, prompt_tokens=-1))
    refused(lambda: MessageFactory(session=session, seq=1, completion_tokens=-1))
    refused(lambda: MessageFactory(session=session, seq=1, cost_usd=Decimal("-1")))
    assert SessionMessage.objects.count() == 0


def test_session_with_negative_totals_is_refused():
    user, client = UserFactory(), ClientFactory()
    refused(lambda: SessionFactory(user=user, domain=client, total_tokens=-1))
    refused(lambda: SessionFactory(user=user, domain=client, estimated_cost_usd=Decimal("-0.5")))
    assert ChatSession.objects.count() == 0


def test_ended_session_needs_an_end_time_and_active_one_none():
    user, client = UserFactory(), ClientFactory()
    refused(lambda: SessionFactory(user=user, domain=client, status="ended", ended_at=None))


def test_context_stream_with_negative_tokens_is_refused():
    session = SessionFactory()
    refused(
        lambda: ContextStream.objects.create(
            session=session,
            source_model="ollama:llama3.2",
            target_model="openai:gpt-4o",
            source_domain=session.domain,
            target_domain=session.domain,
            reason="model_upgrade",
            total_tokens=-3,
        )
    )


def test_negative_prices_are_refused():
    refused(lambda: PriceFactory(input_per_mtok=Decimal("-1")))
    refused(lambda: PriceFactory(output_per_mtok=Decimal("-0.01")))
    assert ModelPrice.objects.count() == 0


def test_two_messages_cannot_share_a_sequence_number_in_one_session():
    session = SessionFactory()
    MessageFactory(session=session, seq=1)
    refused(lambda: MessageFactory(session=session, seq=1))
    MessageFactory(session=SessionFactory(), seq=1)  # another session may reuse it


def test_client_slugs_are_unique():
    ClientFactory(slug="acme")
    refused(lambda: ClientDomain.objects.create(name="Acme again", slug="acme"))


def test_client_hostnames_are_unique_but_many_clients_may_have_none():
    ClientDomain.objects.create(name="A", slug="a", hostname="acme.example.com")
    refused(lambda: ClientDomain.objects.create(name="B", slug="b", hostname="ACME.example.com"))
    ClientDomain.objects.create(name="C", slug="c", hostname="")
    ClientDomain.objects.create(name="D", slug="d", hostname=None)
    assert ClientDomain.objects.filter(hostname__isnull=True).count() == 2


def test_a_client_has_at_most_one_default_brand():
    client = ClientFactory()
    BrandFactory(client=client, is_default=True)
    BrandFactory(client=client, is_default=False)
    refused(lambda: BrandFactory(client=client, is_default=True))
    assert Brand.objects.filter(client=client, is_default=True).count() == 1


@pytest.mark.parametrize("color", ["red", "#12345", "#1234567", "#12345g", "1f6feb", '#fff"}', ""])
def test_brand_colours_must_be_hex_rrggbb_in_the_database(color):
    client = ClientFactory()
    # PostgreSQL refuses an over-long value as a DataError before the check constraint runs.
    errors = (IntegrityError, DataError)
    refused(lambda: BrandFactory(client=client, primary_color=color), errors)
    refused(lambda: BrandFactory(client=client, accent_color=color, is_default=False), errors)
    refused(lambda: BrandFactory(client=client, background_color=color, is_default=False), errors)


def test_negative_client_rates_are_refused():
    refused(lambda: ClientFactory(slug="neg", hourly_rate=Decimal("-1")))
    refused(lambda: ClientFactory(slug="neg2", llm_markup_percent=Decimal("-1")))
    refused(lambda: ClientFactory(slug="zero-inc", billing_increment_minutes=0))
