"""A few ended demo sessions, built so every invariant of docs/DESIGN.md holds.

`seed_demo` uses this so the home page and the reports are not empty on a fresh install.
The sessions are written directly (the services only speak in "now"), with the same
hash chain, usage rows, context-stream settlement and Ed25519 seal the services produce;
the seed test runs `invariants.check_session` and `integrity.verify_session` on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from django.db import transaction
from django.utils import timezone

from billing import pricing
from billing.branding import default_brand
from billing.models import ClientDomain, LLMUsage, UsageStatus
from providers.naming import parse_model
from providers.tokens import estimate_tokens
from sessions_app import integrity
from sessions_app.models import (
    ChatSession,
    ContextStream,
    EndReason,
    MessageRole,
    MessageStatus,
    SessionMessage,
    SessionSegment,
    SessionStatus,
    StreamReason,
)
from sessions_app.services import quantize_money
from sessions_app.services.store import billable_totals, chain_link

ZERO = Decimal("0")
ANSWER_DELAY = timedelta(seconds=40)
PROVIDER_IDS = {"openai:gpt-4o": "gpt-4o-2024-08-06", "ollama:llama3.2": "llama3.2:latest"}


@dataclass(frozen=True)
class DemoSegment:
    client: str  # slug
    model: str  # provider:model
    minutes: int
    turns: tuple[tuple[str, str], ...]  # (question, answer)


@dataclass(frozen=True)
class DemoSession:
    name: str
    days_ago: int
    start_hour: int
    system_prompt: str
    segments: tuple[DemoSegment, ...]
    note: str = ""


# fmt: off
DEMO_SESSIONS: tuple[DemoSession, ...] = (
    DemoSession(
        name="Supplier risk memo, Q3",
        days_ago=3, start_hour=9,
        system_prompt="You are a careful supply-chain analyst. Answer in short, plain paragraphs.",
        segments=(
            DemoSegment("acme", "ollama:llama3.2", 38, (
                ("Summarise the main supplier risks for Acme's actuator line in three bullet points.",
                 "1. Single-source motor controllers from one plant.\n2. Rare-earth magnet prices tied to one region.\n"
                 "3. Long lead times on custom gearboxes (14+ weeks)."),
                ("Which of these should the memo lead with, and why?",
                 "Lead with the single-source controllers: a stoppage there halts the whole line within days, "
                 "while the other two raise cost or delay without stopping production."),
            )),
        ),
    ),
    DemoSession(
        name="Label claims review",
        days_ago=2, start_hour=14,
        system_prompt="You review consumer label wording for regulatory risk. Flag, do not rewrite, unless asked.",
        note="Needs the stronger model for the regulatory nuance.",
        segments=(
            DemoSegment("contoso", "ollama:llama3.2", 18, (
                ("Flag anything risky in: 'Clinically proven to boost immunity in 7 days.'",
                 "'Clinically proven' and 'boost immunity' are both high-risk health claims that need substantiation; "
                 "the 7-day promise makes it a specific efficacy claim."),
            )),
            DemoSegment("contoso", "openai:gpt-4o", 24, (
                ("Give a compliant alternative that keeps the marketing intent.",
                 "'Contains vitamin C, which contributes to the normal function of the immune system.' "
                 "It relies on an authorised nutrient function claim and drops the time promise."),
                ("And a shorter version for the front of pack?",
                 "'With vitamin C for normal immune function.'"),
            )),
        ),
    ),
    DemoSession(
        name="Shared routing heuristics",
        days_ago=1, start_hour=10,
        system_prompt="",
        note="The same heuristic applies to Fabrikam's depots.",
        segments=(
            DemoSegment("northwind", "ollama:llama3.2", 25, (
                ("What is a quick heuristic for ordering delivery stops when we have no routing software?",
                 "Cluster stops by area, then within each cluster visit in a sweep (angle around the depot); "
                 "it usually lands within 10-15% of an optimised route."),
            )),
            DemoSegment("fabrikam", "ollama:llama3.2", 20, (
                ("How would that change for depots with time-window deliveries?",
                 "Sort clusters by the earliest time window first, sweep inside each cluster, and move any stop "
                 "whose window would be missed to the front of the next cluster."),
            )),
        ),
    ),
)
# fmt: on


@dataclass
class _Chain:
    session: ChatSession
    previous: str = integrity.GENESIS
    seq: int = 0
    history_tokens: int = 0
    messages: list[SessionMessage] = field(default_factory=list)

    def add(self, message: SessionMessage) -> SessionMessage:
        self.previous = chain_link([message], after=(self.seq, self.previous))
        self.seq = message.seq
        message.save(force_insert=True)
        self.messages.append(message)
        return message


def demo_sessions_create(*, user) -> int:
    """Create the demo sessions the user does not have yet; return how many were created."""
    slugs = {seg.client for demo in DEMO_SESSIONS for seg in demo.segments}
    clients = {c.slug: c for c in ClientDomain.objects.filter(slug__in=slugs).prefetch_related("brands")}
    created = 0
    for demo in DEMO_SESSIONS:
        if ChatSession.objects.filter(user=user, name=demo.name).exists():
            continue
        if any(seg.client not in clients for seg in demo.segments):
            continue
        if not all(_priced(seg.model) for seg in demo.segments):
            continue  # never seed a paid call whose cost would be unknown
        with transaction.atomic():
            _build(demo, user=user, clients=clients)
        created += 1
    return created


def _priced(model: str) -> bool:
    ref = parse_model(model)
    return not ref.paid or pricing.price_for(ref.provider, PROVIDER_IDS.get(model, ref.model)) is not None


def _build(demo: DemoSession, *, user, clients: dict[str, ClientDomain]) -> ChatSession:
    day = timezone.now() - timedelta(days=demo.days_ago)
    start = day.replace(hour=demo.start_hour, minute=0, second=0, microsecond=0)
    first, last = demo.segments[0], demo.segments[-1]
    session = ChatSession.objects.create(
        user=user,
        domain=clients[first.client],
        brand=default_brand(clients[first.client]),
        name=demo.name,
        system_prompt=demo.system_prompt,
        started_at=start,
        last_activity_at=start,
        primary_model=first.model,
        current_model=first.model,
    )
    chain = _Chain(session)
    system_tokens = estimate_tokens(demo.system_prompt) if demo.system_prompt else 0
    at = start
    previous_segment: DemoSegment | None = None
    for segment in demo.segments:
        client = clients[segment.client]
        seg_end = at + timedelta(minutes=segment.minutes)
        SessionSegment.objects.create(
            session=session,
            domain=client,
            brand=default_brand(client),
            model=segment.model,
            started_at=at,
            ended_at=seg_end,
        )
        stream = None
        if previous_segment is not None:
            stream = _switch(chain, previous_segment, segment, clients, at, demo.note)
        step = timedelta(minutes=segment.minutes) / (len(segment.turns) + 1)
        for index, (question, answer) in enumerate(segment.turns, start=1):
            asked = at + step * index
            _turn(chain, client, segment.model, question, answer, asked, system_tokens, stream=stream)
            stream = None  # only the first call after a switch carries (and settles) it
        previous_segment = segment
        at = seg_end

    messages = chain.messages
    count, tokens, billable_cost = billable_totals(messages)
    session.domain = clients[last.client]
    session.brand = default_brand(clients[last.client])
    session.current_model = last.model
    session.total_messages = count
    session.total_tokens = tokens
    session.estimated_cost_usd = quantize_money(billable_cost)
    session.last_activity_at = messages[-1].timestamp
    session.status = SessionStatus.ENDED
    session.ended_at = at
    session.duration_seconds = int((at - start).total_seconds())
    session.end_reason = EndReason.USER
    session.save()
    session.soulfra_hash = integrity.build_seal(session)
    session.save(update_fields=["soulfra_hash"])
    return session


def _switch(
    chain: _Chain, source: DemoSegment, target: DemoSegment, clients: dict[str, ClientDomain], at: datetime, note: str
) -> ContextStream:
    """Record the context carried to the next segment, like `session_switch` does."""
    source_ref, target_ref = parse_model(source.model), parse_model(target.model)
    if source.client != target.client:
        reason = StreamReason.DOMAIN_SWITCH
    elif target_ref.paid and not source_ref.paid:
        reason = StreamReason.MODEL_UPGRADE
    else:
        reason = StreamReason.MODEL_SWITCH
    slug_of = {str(c.pk): c.slug for c in clients.values()}
    snapshot = []
    if chain.session.system_prompt:
        snapshot.append(
            {"seq": None, "role": "system", "content": chain.session.system_prompt, "model": "", "client": ""}
        )
    for message in chain.messages:
        snapshot.append(
            {
                "seq": message.seq,
                "role": message.role,
                "content": message.content,
                "model": message.model,
                "client": slug_of.get(str(message.domain_id), ""),
            }
        )
        if target.client != slug_of.get(str(message.domain_id)) and target.client not in message.shared_to_domains:
            message.shared_to_domains = [*message.shared_to_domains, target.client]
        if target.model != message.model and target.model not in message.shared_to_models:
            message.shared_to_models = [*message.shared_to_models, target.model]
    SessionMessage.objects.bulk_update(chain.messages, ["shared_to_domains", "shared_to_models"])
    return ContextStream.objects.create(
        session=chain.session,
        source_model=source.model,
        target_model=target.model,
        source_domain=clients[source.client],
        target_domain=clients[target.client],
        context_snapshot=snapshot,
        message_count=len(chain.messages),
        total_tokens=chain.history_tokens,
        reason=reason,
        note=note,
        streamed_at=at,
        cost_usd=None,
    )


def _turn(
    chain: _Chain,
    client: ClientDomain,
    model: str,
    question: str,
    answer: str,
    asked: datetime,
    system_tokens: int,
    *,
    stream: ContextStream | None,
) -> LLMUsage:
    ref = parse_model(model)
    provider_model = PROVIDER_IDS.get(model, ref.model)
    chain.add(
        SessionMessage(
            session=chain.session,
            role=MessageRole.USER,
            content=question,
            timestamp=asked,
            model=model,
            provider=ref.provider,
            domain=client,
            cost_usd=ZERO,
            status=MessageStatus.COMPLETE,
        )
    )
    answered = asked + ANSWER_DELAY
    carried = chain.history_tokens if stream is not None else 0
    prompt = system_tokens + chain.history_tokens + estimate_tokens(question)
    completion = estimate_tokens(answer)
    cost = quantize_money(
        pricing.cost_of(
            provider=ref.provider,
            model_id=provider_model,
            prompt_tokens=prompt,
            completion_tokens=completion,
            at=answered,
        )
    )
    message = chain.add(
        SessionMessage(
            session=chain.session,
            role=MessageRole.ASSISTANT,
            content=answer,
            timestamp=answered,
            model=model,
            provider=ref.provider,
            domain=client,
            prompt_tokens=prompt,
            completion_tokens=completion,
            tokens=prompt + completion,
            token_source="provider",
            cost_usd=cost,
            status=MessageStatus.COMPLETE,
        )
    )
    if stream is not None:
        stream_cost = quantize_money(
            pricing.input_cost(provider=ref.provider, model_id=provider_model, tokens=carried, at=answered)
        )
        if stream_cost is not None and cost is not None:
            stream_cost = min(stream_cost, cost)
        ContextStream.objects.filter(pk=stream.pk).update(
            total_tokens=carried, cost_usd=stream_cost, settled_at=answered
        )
    chain.history_tokens += estimate_tokens(question) + completion
    return LLMUsage.objects.create(
        user_id=chain.session.user_id,
        session=chain.session,
        message=message,
        client=client,
        provider=ref.provider,
        model=ref.model,
        provider_model=provider_model,
        prompt_tokens=prompt,
        completion_tokens=completion,
        token_source="provider",
        cost=cost,
        carried_tokens=carried,
        time_to_first_token_ms=420 if ref.paid else 900,
        duration_ms=int(ANSWER_DELAY.total_seconds() * 1000) // 4,
        status=UsageStatus.OK,
        created_at=answered,
    )
