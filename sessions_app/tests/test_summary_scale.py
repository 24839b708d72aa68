"""Summary, end and verification read only the session's own rows, by index, whatever the
size of its client's history (issue 18, item 1: the old clients query joined a client to all
its segments and messages)."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from billing.models import LLMUsage
from sessions_app import selectors, services
from sessions_app.invariants import session_verdict
from sessions_app.models import ChatSession, ContextStream, SessionMessage, SessionSegment

pytestmark = pytest.mark.django_db

# The tables a session owns rows in: reaching any of them other than by the session's index
# is a scan of every client's history.
SESSION_TABLES = (
    "ollama_session_messages",
    "session_segments",
    "ollama_context_streams",
    "user_llm_usage",
)
# messages, segments, context streams, the clients they name by key, the invoices that billed
# each client's part, the invitations, the people
SUMMARY_QUERIES = 7


def _client_history(user, client, *, sessions: int, segments_each: int, messages_each: int) -> None:
    """Thousands of ended sessions' segments and messages (a switch and a call each) on one client, in bulk."""
    start = timezone.now() - timedelta(days=30)
    rows, segs, msgs, streams, usage = [], [], [], [], []
    for index in range(sessions):
        began = start + timedelta(minutes=10 * index)
        session = ChatSession(
            user=user,
            domain=client,
            primary_model="ollama:llama3.2",
            current_model="ollama:llama3.2",
            started_at=began,
            ended_at=began + timedelta(minutes=segments_each),
            duration_seconds=60 * segments_each,
            status="ended",
            end_reason="user",
            last_activity_at=began,
            total_messages=messages_each,
        )
        rows.append(session)
        segs += [
            SessionSegment(
                session=session,
                domain=client,
                model="ollama:llama3.2",
                started_at=began + timedelta(minutes=k),
                ended_at=began + timedelta(minutes=k + 1),
            )
            for k in range(segments_each)
        ]
        streams.append(
            ContextStream(
                session=session,
                source_model="ollama:llama3.2",
                target_model="ollama:mistral",
                source_domain=client,
                target_domain=client,
                reason="model_switch",
                streamed_at=began,
            )
        )
        usage.append(
            LLMUsage(user=user, session=session, client=client, provider="ollama", model="llama3.2", created_at=began)
        )
        msgs += [
            SessionMessage(
                session=session, seq=k + 1, role="user" if k % 2 == 0 else "assistant", content="history", domain=client
            )
            for k in range(messages_each)
        ]
    ChatSession.objects.bulk_create(rows)
    SessionSegment.objects.bulk_create(segs, batch_size=500)
    SessionMessage.objects.bulk_create(msgs, batch_size=500)
    ContextStream.objects.bulk_create(streams)
    LLMUsage.objects.bulk_create(usage)


def _small_session(user, client) -> ChatSession:
    """A session of four stored turns and one switch, ended (sealed) by the real services."""
    session = services.session_start(user=user, client=client, model="ollama:llama3.2")
    services.session_append_history(
        session_id=session.pk,
        user=user,
        messages=[
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi"},
            {"role": "user", "content": "Prices?"},
            {"role": "assistant", "content": "Ten."},
        ],
    )
    services.session_switch(session_id=session.pk, user=user, model="ollama:mistral")
    return session


@pytest.fixture
def big_client(owner, client_acme):
    _client_history(owner, client_acme, sessions=300, segments_each=5, messages_each=10)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")  # planner statistics, as a production database has them
    return client_acme


class Recorder:
    """Every SQL statement run, with its parameters, to EXPLAIN them afterwards."""

    def __init__(self) -> None:
        self.statements: list[tuple[str, tuple]] = []

    def __call__(self, execute, sql, params, many, context):
        self.statements.append((sql, params))
        return execute(sql, params, many, context)


def _plans(statements) -> list[tuple[str, str]]:
    """(table, how it is read) for every session table that any SELECT reads."""
    reads = []
    for sql, params in statements:
        if not sql.lstrip().upper().startswith("SELECT"):
            continue
        with connection.cursor() as cursor:
            if connection.vendor == "postgresql":
                cursor.execute("EXPLAIN (FORMAT JSON) " + sql, params)
                plan = cursor.fetchone()[0]
                plan = json.loads(plan) if isinstance(plan, str) else plan
                stack = [plan[0]["Plan"]]
                while stack:
                    node = stack.pop()
                    stack += node.get("Plans", [])
                    if node.get("Relation Name") in SESSION_TABLES:
                        condition = node.get("Index Cond") or node.get("Recheck Cond") or ""
                        reads.append((node["Relation Name"], f"{node['Node Type']} on {condition}"))
            else:
                cursor.execute("EXPLAIN QUERY PLAN " + sql, params)
                for *_ids, detail in cursor.fetchall():
                    words = detail.split()
                    if len(words) > 1 and words[1] in SESSION_TABLES:
                        reads.append((words[1], detail))
    return reads


def _assert_index_only_reads(statements) -> None:
    reads = _plans(statements)
    assert reads, "the statements read none of the session's tables"
    for table, how in reads:
        # An index on the session's id: never a scan, nor an index on the client (its whole history).
        if connection.vendor == "postgresql":
            assert how.split(" on ")[0] in ("Index Scan", "Index Only Scan", "Bitmap Heap Scan"), (table, how)
            assert "session_id = " in how, (table, how)
        else:
            # SQLite: SEARCH uses an index; SCAN reads the whole table.
            assert how.startswith("SEARCH") and "(session_id=?" in how, (table, how)


def test_summary_reads_only_the_sessions_rows_by_index(owner, big_client, client_globex, django_assert_num_queries):
    session = _small_session(owner, big_client)
    services.session_end(session_id=session.pk, user=owner)
    session = ChatSession.objects.select_related("domain", "brand").get(pk=session.pk)

    with django_assert_num_queries(SUMMARY_QUERIES):
        summary = selectors.session_summary(session=session)
    assert summary["total_messages"] == 4 and summary["integrity"]["valid"] is True
    assert [row["client"] for row in summary["by_client"]] == ["acme"]
    assert sum(row["seconds"] for row in summary["by_client"]) == summary["duration_seconds"]

    recorder = Recorder()
    with connection.execute_wrapper(recorder):
        selectors.session_summary(session=session)
    _assert_index_only_reads(recorder.statements)


def test_end_and_verification_cost_the_same_on_a_client_with_history(owner, big_client, client_globex):
    """The same session on a client with thousands of rows and on one with none: same queries."""
    counts = {}
    for client in (client_globex, big_client):
        session = _small_session(owner, client)
        with CaptureQueriesContext(connection) as ended:
            summary = services.session_end(session_id=session.pk, user=owner)
        with CaptureQueriesContext(connection) as verified:
            detail, problems = session_verdict(session)
        assert problems == [] and "seal signature valid" in detail
        assert summary["integrity"]["valid"] is True
        counts[client.slug] = (len(ended), len(verified))
        recorder = Recorder()
        with connection.execute_wrapper(recorder):
            services.session_end(session_id=session.pk, user=owner)  # ending twice: the summary again
            session_verdict(session)
        _assert_index_only_reads(recorder.statements)
    assert counts["acme"] == counts["globex"]


def test_verification_names_an_open_segment_of_an_ended_session(owner, client_acme):
    session = _small_session(owner, client_acme)
    services.session_end(session_id=session.pk, user=owner)
    last = SessionSegment.objects.filter(session=session).order_by("-started_at").first()
    SessionSegment.objects.filter(pk=last.pk).update(ended_at=None)
    _detail, problems = session_verdict(session)
    assert any("segment 2 of 2 is still open on an ended session" in p for p in problems)


def test_verification_names_a_session_reopened_in_sql(owner, client_acme):
    session = _small_session(owner, client_acme)
    services.session_end(session_id=session.pk, user=owner)
    ChatSession.objects.filter(pk=session.pk).update(status="active", ended_at=None, soulfra_hash=None)
    _detail, problems = session_verdict(session)
    assert any("reopened outside the app" in p for p in problems)
