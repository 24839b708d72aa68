"""factory_boy factories shared by every app's tests."""

from __future__ import annotations

from decimal import Decimal

import factory
from django.contrib.auth import get_user_model
from django.utils import timezone

from billing.models import Brand, ClientDomain, LLMUsage, ModelPrice
from sessions_app.models import ChatSession, SessionMessage, SessionSegment


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda u: f"{u.username}@example.com")
    password = factory.django.Password("pw-for-tests-1")


class ClientFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = ClientDomain
        django_get_or_create = ("slug",)

    name = factory.Sequence(lambda n: f"Client {n}")
    slug = factory.Sequence(lambda n: f"client-{n}")
    hourly_rate = Decimal("150.00")
    billing_increment_minutes = 6


class BrandFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Brand

    client = factory.SubFactory(ClientFactory)
    name = factory.LazyAttribute(lambda b: f"{b.client.name} brand")
    primary_color = "#0b7285"
    accent_color = "#e67700"
    background_color = "#f8f9fa"
    is_default = True


class PriceFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = ModelPrice

    provider = "openai"
    model = "gpt-4o"
    input_per_mtok = Decimal("2.50")
    output_per_mtok = Decimal("10.00")
    effective_from = factory.LazyFunction(lambda: timezone.now() - timezone.timedelta(days=365))


class SessionFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = ChatSession

    user = factory.SubFactory(UserFactory)
    domain = factory.SubFactory(ClientFactory)
    primary_model = "ollama:llama3.2"
    current_model = factory.SelfAttribute("primary_model")
    name = factory.Sequence(lambda n: f"Session {n}")


class SegmentFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = SessionSegment

    session = factory.SubFactory(SessionFactory)
    domain = factory.SelfAttribute("session.domain")
    model = factory.SelfAttribute("session.current_model")
    started_at = factory.SelfAttribute("session.started_at")


class MessageFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = SessionMessage

    session = factory.SubFactory(SessionFactory)
    seq = factory.Sequence(lambda n: n + 1)
    role = "user"
    content = "Hello"
    domain = factory.SelfAttribute("session.domain")
    model = factory.SelfAttribute("session.current_model")


class UsageFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = LLMUsage

    user = factory.SubFactory(UserFactory)
    provider = "ollama"
    model = "llama3.2"
    cost = Decimal("0")
