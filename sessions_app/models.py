"""The work session: sessions, their messages, segments, context streams and API tokens."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from datetime import timedelta

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from billing.models import MONEY, Brand, ClientDomain, TokenSource
from config import statements


class SessionStatus(models.TextChoices):
    ACTIVE = "active", "Active"
    ENDED = "ended", "Ended"


class EndReason(models.TextChoices):
    USER = "user", "Ended by consultant"
    IDLE_TIMEOUT = "idle_timeout", "Idle timeout"
    STAFF = "staff", "Ended by staff"


class SessionSource(models.TextChoices):
    WEB = "web", "Web"
    API = "api", "REST API"
    CLI = "cli", "Terminal"
    GATEWAY = "gateway", "Gateway"
    IMPORT = "import", "Import"
    BRANCH = "branch", "Branch"
    CONTINUE = "continue", "Continuation"
    EDIT = "edit", "Edited message"
    REGENERATE = "regenerate", "Regenerated answer"


# `turn_owner` of a turn its process gave up on (its final store failed): settled at once.
ORPHANED_TURN = "-"


def turn_stale_after() -> timedelta:
    """How long a turn may go unheard of (no claim, no checkpoint) before it counts as abandoned.

    The one definition of a stale turn and a stuck session (`TURN_STALE_SECONDS`): the guardian,
    the monitoring page and the claim takeover all read it here.
    """
    return timedelta(seconds=settings.TURN_STALE_SECONDS)


def stale_turn_q(now) -> Q:
    """Sessions holding an answer claim nothing has been heard of since `turn_stale_after()`, or orphaned."""
    cutoff = now - turn_stale_after()
    unheard = Q(turn_started_at__lt=cutoff) & (Q(turn_checkpoint_at__isnull=True) | Q(turn_checkpoint_at__lt=cutoff))
    return Q(turn_started_at__isnull=False) & (unheard | Q(turn_owner=ORPHANED_TURN))


class ChatSessionQuerySet(models.QuerySet):
    def for_user(self, user) -> ChatSessionQuerySet:
        """Sessions the user may see: their own and those they are invited to; staff see all.

        The one access rule of every front end (pages, REST, CLI, WebSocket, gateway).
        """
        if user.is_staff:
            return self
        return self.participating(user)

    def participating(self, user) -> ChatSessionQuerySet:
        """Sessions the user takes part in: their own and those with a live invitation for them.

        Staff get no blanket access here: they review others' sessions, they do not join them.
        """
        invited = SessionInvitation.objects.live().filter(session=models.OuterRef("pk"), user=user)
        return self.filter(Q(user=user) | Q(models.Exists(invited)))

    def owned_by(self, user) -> ChatSessionQuerySet:
        """Sessions the user started (staff: all). A cheaper query than `for_user` (no subquery to
        build), for hot paths that try the common case first and fall back to `for_user`."""
        if user.is_staff:
            return self
        return self.filter(user=user)

    def listed(self) -> ChatSessionQuerySet:
        """Sessions shown in lists: not hidden (hidden ones stay billed and reachable by id)."""
        return self.filter(hidden_at__isnull=True)

    def active(self) -> ChatSessionQuerySet:
        return self.filter(status=SessionStatus.ACTIVE)

    def idle_since(self, cutoff) -> ChatSessionQuerySet:
        return self.active().filter(last_activity_at__lt=cutoff)

    def with_stale_turn(self, now) -> ChatSessionQuerySet:
        """Active sessions whose answer claim is stale (`stale_turn_q`): stuck until settled."""
        return self.active().filter(stale_turn_q(now))


class ChatSession(models.Model):
    session_id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="chat_sessions")
    domain = models.ForeignKey(ClientDomain, on_delete=models.PROTECT, related_name="sessions")
    brand = models.ForeignKey(Brand, on_delete=models.SET_NULL, null=True, blank=True, related_name="sessions")
    name = models.CharField(max_length=200, blank=True)
    system_prompt = models.TextField(blank=True)
    started_at = models.DateTimeField(default=timezone.now)
    ended_at = models.DateTimeField(null=True, blank=True)
    duration_seconds = models.PositiveIntegerField(null=True, blank=True)
    status = models.CharField(max_length=10, choices=SessionStatus.choices, default=SessionStatus.ACTIVE)
    end_reason = models.CharField(max_length=20, choices=EndReason.choices, blank=True)
    primary_model = models.CharField(max_length=200)
    current_model = models.CharField(max_length=200)
    last_activity_at = models.DateTimeField(default=timezone.now)
    total_messages = models.PositiveIntegerField(default=0)
    total_tokens = models.PositiveBigIntegerField(default=0)
    estimated_cost_usd = models.DecimalField(**MONEY, default=0)
    soulfra_hash = models.JSONField(null=True, blank=True, help_text="The integrity seal, set when the session ends.")
    parent = models.ForeignKey("self", on_delete=models.SET_NULL, null=True, blank=True, related_name="branches")
    branched_at_seq = models.PositiveIntegerField(null=True, blank=True)
    invoice = models.ForeignKey(
        "billing.Invoice", on_delete=models.PROTECT, null=True, blank=True, related_name="sessions"
    )
    source = models.CharField(max_length=10, choices=SessionSource.choices, default=SessionSource.WEB)
    api_token = models.ForeignKey(
        "ApiToken",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="sessions",
        help_text="The gateway token whose automatic session this is.",
    )
    imported_seal = models.JSONField(null=True, blank=True, help_text="The seal an imported file carried.")
    continued_from = models.ForeignKey(
        "self",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="continuations",
        help_text="The ended session whose history this one carries on.",
    )
    template = models.ForeignKey(
        "billing.SessionTemplate",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="sessions",
        help_text="The conversation template it started from.",
    )
    hidden_at = models.DateTimeField(
        null=True, blank=True, help_text="Hidden from the consultant's lists; still billed and reported."
    )
    turn_started_at = models.DateTimeField(null=True, blank=True, help_text="Set while an answer is streaming.")
    # The streaming answer's process and its checkpoint (at most one UPDATE every 2 seconds):
    # what a turn whose process died is settled with (services/recovery.py).
    turn_owner = models.CharField(
        max_length=120, blank=True, help_text="The process streaming the answer: host:pid:start."
    )
    turn_checkpoint_at = models.DateTimeField(null=True, blank=True, help_text="When the partial answer was saved.")
    turn_partial = models.TextField(blank=True, help_text="The answer so far, as of the last checkpoint.")
    turn_prompt_tokens = models.PositiveIntegerField(default=0, help_text="The streaming call's estimated prompt.")
    archived_at = models.DateTimeField(null=True, blank=True)
    archive_blob = models.BinaryField(null=True, blank=True, editable=False)

    objects = ChatSessionQuerySet.as_manager()

    class Meta:
        db_table = "ollama_streaming_sessions"
        ordering = ["-started_at"]
        verbose_name = "work session"
        constraints = [
            models.CheckConstraint(condition=Q(total_tokens__gte=0), name="session_tokens_non_negative"),
            models.CheckConstraint(condition=Q(estimated_cost_usd__gte=0), name="session_cost_non_negative"),
            models.CheckConstraint(
                condition=Q(ended_at__isnull=True) | Q(ended_at__gte=models.F("started_at")),
                name="session_ends_after_start",
            ),
            models.CheckConstraint(
                condition=Q(status="active", ended_at__isnull=True) | Q(status="ended", ended_at__isnull=False),
                name="session_status_matches_end",
            ),
        ]
        indexes = [
            models.Index(fields=["user", "started_at"], name="session_user_start_idx"),
            models.Index(fields=["status", "last_activity_at"], name="session_status_activity_idx"),
            models.Index(fields=["domain", "started_at"], name="session_client_start_idx"),
            # Reports bill a session in the period where it ended.
            models.Index(fields=["ended_at"], name="session_ended_idx"),
            # A gateway call looks for its token's most recent sessions (`gateway/joining.py`).
            models.Index(fields=["api_token", "-last_activity_at"], name="session_token_activity_idx"),
        ]

    def __str__(self) -> str:
        return self.name or f"Session {str(self.session_id)[:8]}"

    @property
    def is_active(self) -> bool:
        return self.status == SessionStatus.ACTIVE

    @property
    def is_locked(self) -> bool:
        """Billed on an issued invoice: billed fields can no longer change."""
        return self.invoice_id is not None and self.invoice.status == "issued"


class MessageRole(models.TextChoices):
    SYSTEM = "system", "System"
    USER = "user", "User"
    ASSISTANT = "assistant", "Assistant"


class MessageStatus(models.TextChoices):
    COMPLETE = "complete", "Complete"
    PARTIAL = "partial", "Partial"
    ERROR = "error", "Error"


class SessionMessageQuerySet(models.QuerySet):
    def for_period(self, start, end) -> SessionMessageQuerySet:
        return self.filter(timestamp__gte=start, timestamp__lt=end)

    def billed_to(self, client) -> SessionMessageQuerySet:
        return self.filter(domain=client)

    def billable(self) -> SessionMessageQuerySet:
        """Messages whose cost counts: copies made by a branch or an import are not billed again."""
        return self.filter(copied_from__isnull=True, is_imported=False)


class SessionMessage(models.Model):
    message_id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    session = models.ForeignKey(ChatSession, on_delete=models.CASCADE, related_name="messages")
    seq = models.PositiveIntegerField()
    role = models.CharField(max_length=10, choices=MessageRole.choices)
    content = models.TextField(blank=True)
    timestamp = models.DateTimeField(default=timezone.now)
    model = models.CharField(max_length=200, blank=True)
    provider = models.CharField(max_length=20, blank=True)
    domain = models.ForeignKey(ClientDomain, on_delete=models.PROTECT, related_name="messages")
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    tokens = models.PositiveIntegerField(default=0)
    token_source = models.CharField(max_length=10, choices=TokenSource.choices, blank=True)
    cost_usd = models.DecimalField(**MONEY, null=True, blank=True, help_text="Empty: no price known.")
    status = models.CharField(max_length=10, choices=MessageStatus.choices, default=MessageStatus.COMPLETE)
    error_text = models.TextField(blank=True)
    shared_to_domains = models.JSONField(default=list, blank=True)
    shared_to_models = models.JSONField(default=list, blank=True)
    hash = models.CharField(max_length=64, blank=True)
    copied_from = models.ForeignKey(
        "self",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="copies",
        help_text="The message this one copies (branch): not billed again.",
    )
    is_imported = models.BooleanField(default=False)
    context_omitted = models.PositiveIntegerField(
        default=0, help_text="Older messages left out of this call's context to fit the model's window."
    )
    author = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="authored_messages",
        help_text="Who typed it (a user message in a shared session may be an invited consultant's).",
    )

    objects = SessionMessageQuerySet.as_manager()

    class Meta:
        db_table = "ollama_session_messages"
        ordering = ["session", "seq"]
        constraints = [
            models.UniqueConstraint(fields=["session", "seq"], name="unique_message_seq"),
            models.CheckConstraint(condition=Q(prompt_tokens__gte=0), name="message_prompt_non_negative"),
            models.CheckConstraint(condition=Q(completion_tokens__gte=0), name="message_completion_non_negative"),
            models.CheckConstraint(condition=Q(tokens__gte=0), name="message_tokens_non_negative"),
            models.CheckConstraint(
                condition=Q(cost_usd__gte=0) | Q(cost_usd__isnull=True), name="message_cost_non_negative"
            ),
        ]
        indexes = [
            models.Index(fields=["domain", "timestamp"], name="message_client_time_idx"),
            models.Index(fields=["timestamp"], name="message_time_idx"),
            # The reports' path: billable messages by time, answered from the index alone on PostgreSQL.
            models.Index(
                fields=["timestamp"],
                include=["session", "domain", "tokens", "cost_usd", "role"],
                condition=Q(copied_from__isnull=True, is_imported=False),
                name="message_billable_time_idx",
            ),
        ]

    def __str__(self) -> str:
        return f"#{self.seq} {self.role}: {self.content[:60]}"


class SessionSegment(models.Model):
    """A stretch of a session billed to one client on one model; a switch closes it."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    session = models.ForeignKey(ChatSession, on_delete=models.CASCADE, related_name="segments")
    domain = models.ForeignKey(ClientDomain, on_delete=models.PROTECT, related_name="segments")
    brand = models.ForeignKey(Brand, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    model = models.CharField(max_length=200)
    started_at = models.DateTimeField(default=timezone.now)
    ended_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "session_segments"
        ordering = ["session", "started_at"]
        constraints = [
            models.CheckConstraint(
                condition=Q(ended_at__isnull=True) | Q(ended_at__gte=models.F("started_at")),
                name="segment_ends_after_start",
            ),
            models.UniqueConstraint(
                fields=["session"], condition=Q(ended_at__isnull=True), name="one_open_segment_per_session"
            ),
        ]
        indexes = [models.Index(fields=["domain", "started_at"], name="segment_client_start_idx")]

    def __str__(self) -> str:
        return f"{self.domain} on {self.model} from {self.started_at:%H:%M:%S}"


class StreamReason(models.TextChoices):
    DOMAIN_SWITCH = "domain_switch", "Client switch"
    MODEL_UPGRADE = "model_upgrade", "Upgrade to a paid model"
    MODEL_SWITCH = "model_switch", "Model switch"


class ContextStream(models.Model):
    """The conversation's context carried to another client or model at a switch."""

    stream_id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    session = models.ForeignKey(ChatSession, on_delete=models.CASCADE, related_name="context_streams")
    source_model = models.CharField(max_length=200)
    target_model = models.CharField(max_length=200)
    source_domain = models.ForeignKey(ClientDomain, on_delete=models.PROTECT, related_name="+")
    target_domain = models.ForeignKey(ClientDomain, on_delete=models.PROTECT, related_name="+")
    context_snapshot = models.JSONField(default=list, blank=True)
    message_count = models.PositiveIntegerField(default=0)
    omitted_count = models.PositiveIntegerField(default=0, help_text="Messages left out to fit the target's window.")
    total_tokens = models.PositiveIntegerField(default=0)
    reason = models.CharField(max_length=20, choices=StreamReason.choices)
    note = models.CharField(max_length=500, blank=True, help_text="The reason the consultant gave, if any.")
    streamed_at = models.DateTimeField(default=timezone.now)
    cost_usd = models.DecimalField(**MONEY, null=True, blank=True)
    settled_at = models.DateTimeField(null=True, blank=True, help_text="When the target's first call reported usage.")

    class Meta:
        db_table = "ollama_context_streams"
        ordering = ["session", "streamed_at"]
        constraints = [
            models.CheckConstraint(condition=Q(total_tokens__gte=0), name="stream_tokens_non_negative"),
            models.CheckConstraint(
                condition=Q(cost_usd__gte=0) | Q(cost_usd__isnull=True), name="stream_cost_non_negative"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.source_model} → {self.target_model} ({self.get_reason_display()})"


class SessionInvitationQuerySet(models.QuerySet):
    def live(self) -> SessionInvitationQuerySet:
        return self.filter(revoked_at__isnull=True)


class SessionInvitation(models.Model):
    """The owner shares a session with another consultant; revoking ends their access at once."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    session = models.ForeignKey(ChatSession, on_delete=models.CASCADE, related_name="invitations")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="session_invitations")
    invited_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    revoked_at = models.DateTimeField(null=True, blank=True)

    objects = SessionInvitationQuerySet.as_manager()

    class Meta:
        db_table = "session_invitations"
        ordering = ["session", "created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["session", "user"], condition=Q(revoked_at__isnull=True), name="one_live_invitation_per_user"
            ),
            models.CheckConstraint(
                condition=Q(revoked_at__isnull=True) | Q(revoked_at__gte=models.F("created_at")),
                name="invitation_revoked_after_created",
            ),
        ]
        indexes = [models.Index(fields=["user", "session"], name="invitation_user_session_idx")]

    def __str__(self) -> str:
        return f"{self.user} in {self.session}"

    @property
    def is_live(self) -> bool:
        return self.revoked_at is None


# last_used_at is for people ("used 3 minutes ago"), not an audit log: one write a minute is plenty.
TOKEN_TOUCH_EVERY = timedelta(minutes=1)


class ApiTokenQuerySet(models.QuerySet):
    def live(self) -> ApiTokenQuerySet:
        return self.filter(revoked_at__isnull=True)


class ApiToken(models.Model):
    """A bearer token for the REST API and the gateway. Only its SHA-256 is stored."""

    PREFIX = "bws_"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    client = models.ForeignKey(ClientDomain, on_delete=models.CASCADE, null=True, blank=True, related_name="api_tokens")
    name = models.CharField(max_length=200, blank=True)
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    hint = models.CharField(max_length=12, editable=False, help_text="The first characters, to tell tokens apart.")
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    objects = ApiTokenQuerySet.as_manager()

    class Meta:
        db_table = "api_tokens"
        ordering = ["-created_at"]
        verbose_name = "API token"

    def __str__(self) -> str:
        return f"{self.hint}… ({self.user})"

    @staticmethod
    def hash_token(raw: str) -> str:
        return hashlib.sha256(raw.encode()).hexdigest()

    @classmethod
    def issue(cls, *, user, client=None, name: str = "") -> tuple[ApiToken, str]:
        """Create a token; return it with the raw secret, which is never stored."""
        raw = cls.PREFIX + secrets.token_urlsafe(32)
        token = cls.objects.create(user=user, client=client, name=name, token_hash=cls.hash_token(raw), hint=raw[:10])
        return token, raw

    def touch(self, now=None) -> None:
        """Record a use in `last_used_at`: at most one write a minute (`TOKEN_TOUCH_EVERY`).

        The one place a token's use is recorded, for the REST API and the gateway alike.
        """
        now = now or timezone.now()
        if self.last_used_at is None or now - self.last_used_at >= TOKEN_TOUCH_EVERY:
            ApiToken.objects.filter(pk=self.pk).update(last_used_at=now)
            self.last_used_at = now

    @classmethod
    def authenticate(cls, raw: str, *, with_client: bool = True, also: dict | None = None) -> ApiToken | None:
        """The live token for `raw` with its (active) user and, unless `with_client` is off, its client.

        Every gateway call and API request asks: one prepared statement (the token joined to
        its user), not a query the ORM builds each time. The gateway reads the client only for a new session (in the
        database thread), so it leaves it out; API views use it from async code. `also`
        (`statements.Scalar`s) are read in the same statement, into `token.read_with`.
        """
        if not raw or len(raw) > 200:
            return None
        token = statements.select_instance(
            cls, {"token_hash": cls.hash_token(raw), "revoked_at": None}, related="user", also=also
        )
        if token is None or not token.user.is_active:
            return None
        if with_client and token.client_id is not None:
            token.client = statements.select_instance(ClientDomain, {"id": token.client_id})
        return token
