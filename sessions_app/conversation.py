"""Conversation tools over the caller's own sessions: full-text search, stats, short ids.

Search uses PostgreSQL full-text search (the GIN index on `to_tsvector('english', content)`
from migration 0002) and falls back to a case-insensitive substring match, ranked by the
number of matches, elsewhere. Snippets come back as segments so every caller escapes the
text itself: `snippet_html()` escapes first, then wraps matches in `<mark>`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal

from django.contrib.postgres.search import SearchHeadline, SearchQuery, SearchRank, SearchVectorField
from django.db import connection
from django.db.models import Avg, Count, F, Func, Min, Q, QuerySet, Sum
from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

from billing.models import ClientDomain
from billing.money import api_amount
from sessions_app.errors import BadInput, NotFound
from sessions_app.models import ChatSession, SessionMessage

SEARCH_EMPTY = "Type something to search for."
SEARCH_TOO_LONG = "The search is {size} characters; the limit is {limit}."
SEARCH_MAX_CHARS = 500
SEARCH_DEFAULT_LIMIT = 20
SEARCH_MAX_LIMIT = 100

SESSION_ID_TOO_SHORT = "A session id prefix needs at least 8 characters, got {prefix!r}."
SESSION_ID_MALFORMED = "{prefix!r} is not a session id (hex digits and dashes)."
SESSION_ID_AMBIGUOUS = "{prefix!r} matches {count} sessions; give more characters."

# Private-use characters mark matches inside ts_headline's output; they never reach a page.
_START, _STOP = "\ue000", "\ue001"
_SNIPPET_BEFORE, _SNIPPET_AFTER = 60, 140


money = api_amount  # six decimals, as every API shape


# --- Short ids ------------------------------------------------------------------------------


def session_resolve(*, ident: str, user=None, queryset: QuerySet | None = None) -> ChatSession:
    """Find a session by its UUID or a unique prefix of at least 8 characters.

    With `user`, only sessions that user may see are considered (staff see all); an unknown
    or foreign id raises NotFound either way, so ids cannot be probed.
    """
    raw = (ident or "").strip().lower()
    digits = raw.replace("-", "")
    if not re.fullmatch(r"[0-9a-f]*", digits) or not digits:
        raise BadInput(SESSION_ID_MALFORMED.format(prefix=ident))
    if len(digits) < 8:
        raise BadInput(SESSION_ID_TOO_SHORT.format(prefix=ident))
    qs = queryset if queryset is not None else ChatSession.objects.all()
    if user is not None:
        qs = qs.for_user(user)
    if len(digits) == 32:
        matches = list(qs.filter(session_id=digits)[:2])
    else:
        # The canonical dashed form: PostgreSQL compares uuid::text, others strip the dashes.
        prefix = "-".join(digits[a:b] for a, b in ((0, 8), (8, 12), (12, 16), (16, 20), (20, 32)) if digits[a:b])
        matches = list(qs.filter(session_id__startswith=prefix)[:2])
    if not matches:
        raise NotFound(f"No session matches {ident!r}.")
    if len(matches) > 1:
        raise BadInput(
            SESSION_ID_AMBIGUOUS.format(prefix=ident, count=qs.filter(session_id__startswith=prefix).count())
        )
    return matches[0]


# --- Search ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchHit:
    session_id: str
    session_name: str
    client: str
    message_id: str
    seq: int
    role: str
    timestamp: object  # aware datetime
    rank: float
    matches: int
    segments: list[tuple[str, bool]] = field(default_factory=list)  # (text, is_match)

    @property
    def snippet(self) -> str:
        return "".join(text for text, _ in self.segments)

    def snippet_html(self) -> SafeString:
        """The snippet, escaped first, then matches wrapped in <mark>."""
        return mark_safe(  # noqa: S308  (every piece of text is escaped above)
            "".join(f"<mark>{escape(text)}</mark>" if hit else str(escape(text)) for text, hit in self.segments)
        )

    def snippet_marked(self, start: str = "[", stop: str = "]") -> str:
        """The snippet for a terminal, matches set off by `start` and `stop`."""
        return "".join(f"{start}{text}{stop}" if hit else text for text, hit in self.segments)

    def as_dict(self) -> dict:
        return {
            "session_id": self.session_id,
            "session_name": self.session_name,
            "client": self.client,
            "message_id": self.message_id,
            "seq": self.seq,
            "role": self.role,
            "timestamp": self.timestamp.isoformat(),
            "rank": round(self.rank, 6),
            "snippet": self.snippet,
            "snippet_html": str(self.snippet_html()),
        }


class _EnglishVector(Func):
    """`to_tsvector('english', content)`, written exactly as the GIN index is, so it is used."""

    template = "to_tsvector('english'::regconfig, %(expressions)s)"
    output_field = SearchVectorField()


def _clean_query(query: str) -> str:
    query = (query or "").strip()
    if not query:
        raise BadInput(SEARCH_EMPTY)
    if len(query) > SEARCH_MAX_CHARS:
        raise BadInput(SEARCH_TOO_LONG.format(size=len(query), limit=SEARCH_MAX_CHARS))
    return query


def _clamp_limit(limit) -> int:
    try:
        limit = int(limit)
    except (TypeError, ValueError):
        raise BadInput("limit must be a whole number.") from None
    if limit < 1:
        raise BadInput("limit must be at least 1.")
    return min(limit, SEARCH_MAX_LIMIT)


def _visible_messages(user, client=None) -> QuerySet:
    sessions = ChatSession.objects.for_user(user)
    messages = SessionMessage.objects.filter(session__in=sessions)
    if client is not None:
        messages = messages.filter(Q(domain__slug=client) | Q(session__domain__slug=client))
    return messages.select_related("session", "domain")


def messages_search(
    *, user, query: str, limit: int = SEARCH_DEFAULT_LIMIT, client: str | None = None
) -> list[SearchHit]:
    """Messages in the user's own sessions (staff: all) matching `query`, best first."""
    query = _clean_query(query)
    limit = _clamp_limit(limit)
    messages = _visible_messages(user, client)
    if connection.vendor == "postgresql":
        return _search_postgres(messages, query, limit)
    return _search_fallback(messages, query, limit)


def _hit(message: SessionMessage, rank: float, matches: int, segments: list[tuple[str, bool]]) -> SearchHit:
    return SearchHit(
        session_id=str(message.session_id),
        session_name=str(message.session),
        client=message.domain.slug,
        message_id=str(message.message_id),
        seq=message.seq,
        role=message.role,
        timestamp=message.timestamp,
        rank=float(rank),
        matches=matches,
        segments=segments,
    )


def _search_postgres(messages: QuerySet, query: str, limit: int) -> list[SearchHit]:
    search = SearchQuery(query, config="english", search_type="websearch")
    rows = (
        messages.annotate(vector=_EnglishVector(F("content")))
        .filter(vector=search)
        .annotate(
            rank=SearchRank(_EnglishVector(F("content")), search),
            headline=SearchHeadline(
                "content",
                search,
                config="english",
                start_sel=_START,
                stop_sel=_STOP,
                max_words=30,
                min_words=12,
                max_fragments=2,
            ),
        )
        .order_by("-rank", "-timestamp")[:limit]
    )
    hits = []
    for message in rows:
        # ts_headline knows which words matched (stems included) but drops anything that looks
        # like markup; so take its matched words and cut the snippet from the raw text.
        marked = _split_marked(message.headline)
        words = {text.lower() for text, hit in marked if hit} or set(_terms(query))
        pattern = re.compile(
            "|".join(rf"\b{re.escape(w)}\b" for w in sorted(words, key=len, reverse=True)), re.IGNORECASE
        )
        found = list(pattern.finditer(message.content))
        segments = _snippet(message.content, found) if found else marked
        hits.append(_hit(message, message.rank, len(found), segments))
    return hits


def _split_marked(text: str) -> list[tuple[str, bool]]:
    """Turn ts_headline's output (matches between sentinels) into (text, is_match) segments."""
    segments: list[tuple[str, bool]] = []
    inside = False
    for piece in re.split(f"([{_START}{_STOP}])", text or ""):
        if piece == _START:
            inside = True
        elif piece == _STOP:
            inside = False
        elif piece:
            segments.append((piece, inside))
    return segments


def _terms(query: str) -> list[str]:
    words = [w.lower() for w in re.findall(r"\w+", query)]
    return list(dict.fromkeys(w for w in words if w)) or [query.lower()]


def _search_fallback(messages: QuerySet, query: str, limit: int) -> list[SearchHit]:
    terms = _terms(query)
    condition = Q()
    for term in terms:
        condition &= Q(content__icontains=term)
    pattern = re.compile("|".join(re.escape(t) for t in sorted(terms, key=len, reverse=True)), re.IGNORECASE)
    scored = []
    # Newest first, so ties in the count keep the most recent message on top.
    for message in messages.filter(condition).order_by("-timestamp").iterator(chunk_size=500):
        found = list(pattern.finditer(message.content))
        if found:
            scored.append((len(found), message, found))
    scored.sort(key=lambda item: item[0], reverse=True)
    return [_hit(message, count, count, _snippet(message.content, found)) for count, message, found in scored[:limit]]


def _snippet(content: str, found: list[re.Match]) -> list[tuple[str, bool]]:
    """A window of the content around the first match, every match inside it marked."""
    first = found[0].start()
    start = max(0, first - _SNIPPET_BEFORE)
    end = min(len(content), first + _SNIPPET_AFTER)
    # Do not cut words in half at the window's edges.
    if start > 0:
        space = content.find(" ", start, first)
        start = space + 1 if space != -1 else start
    if end < len(content):
        space = content.rfind(" ", found[0].end(), end)
        end = space if space != -1 else end
    segments: list[tuple[str, bool]] = [("…", False)] if start > 0 else []
    cursor = start
    for match in found:
        if match.start() < start or match.end() > end:
            continue
        if match.start() > cursor:
            segments.append((content[cursor : match.start()], False))
        segments.append((match.group(0), True))
        cursor = match.end()
    if cursor < end:
        segments.append((content[cursor:end], False))
    if end < len(content):
        segments.append(("…", False))
    return [(re.sub(r"\s+", " ", text) if not hit else text, hit) for text, hit in segments if text]


# --- Stats ----------------------------------------------------------------------------------


def _session_brief(session: ChatSession | None) -> dict | None:
    if session is None:
        return None
    return {
        "session_id": str(session.session_id),
        "name": str(session),
        "client": session.domain.slug,
        "model": session.current_model,
        "status": session.status,
        "started_at": session.started_at.isoformat(),
        "total_messages": session.total_messages,
        "total_tokens": session.total_tokens,
        "total_cost_usd": money(session.estimated_cost_usd),
    }


def sessions_stats(*, user, client: str | None = None) -> dict:
    """Sessions, messages, averages, oldest and most active session, and a per-client table.

    Counted over the user's own sessions (staff: all): a session shared with them is its
    owner's work, counted once. Tokens and cost are the billable totals (branch copies and
    imports are not billed again); per-client rows group sessions by the client they are
    billed to now.
    """
    sessions = ChatSession.objects.owned_by(user).select_related("domain")
    if client is not None:
        if not sessions.filter(domain__slug=client).exists() and not _client_exists(client):
            raise NotFound(f"Unknown client {client!r}.")
        sessions = sessions.filter(domain__slug=client)
    totals = sessions.aggregate(
        sessions=Count("session_id"),
        active=Count("session_id", filter=Q(status="active")),
        archived=Count("session_id", filter=Q(archived_at__isnull=False)),
        messages=Sum("total_messages"),
        tokens=Sum("total_tokens"),
        cost=Sum("estimated_cost_usd"),
        average=Avg("total_messages"),
    )
    count = totals["sessions"] or 0
    # Calls with no known price are left out of the cost: counted, so a total never reads as complete.
    unpriced = dict(
        SessionMessage.objects.billable()
        .filter(session__in=sessions.values("pk"), cost_usd__isnull=True)
        .exclude(role="user")
        .values("session__domain__slug")
        .annotate(n=Count("pk"))
        .values_list("session__domain__slug", "n")
        .order_by()
    )
    per_client = (
        sessions.values("domain__slug", "domain__name")
        .annotate(
            sessions=Count("session_id"),
            messages=Sum("total_messages"),
            tokens=Sum("total_tokens"),
            cost=Sum("estimated_cost_usd"),
            first=Min("started_at"),
        )
        .order_by("domain__name")
    )
    return {
        "sessions": count,
        "active_sessions": totals["active"] or 0,
        "archived_sessions": totals["archived"] or 0,
        "messages": totals["messages"] or 0,
        "average_messages_per_session": round(float(totals["average"] or 0), 2),
        "tokens": totals["tokens"] or 0,
        "cost_usd": money(totals["cost"] or Decimal(0)),
        "unpriced_calls": sum(unpriced.values()),
        "oldest_session": _session_brief(sessions.order_by("started_at").first()),
        "most_active_session": _session_brief(
            sessions.filter(total_messages__gt=0).order_by("-total_messages", "-last_activity_at").first()
        ),
        "by_client": [
            {
                "client": row["domain__slug"],
                "name": row["domain__name"],
                "sessions": row["sessions"],
                "messages": row["messages"] or 0,
                "average_messages_per_session": round((row["messages"] or 0) / row["sessions"], 2),
                "tokens": row["tokens"] or 0,
                "cost_usd": money(row["cost"] or Decimal(0)),
                "unpriced_calls": unpriced.get(row["domain__slug"], 0),
                "first_session_at": row["first"].isoformat(),
            }
            for row in per_client
        ],
    }


def _client_exists(slug: str) -> bool:

    return ClientDomain.objects.filter(slug=slug).exists()
