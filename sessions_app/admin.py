"""Staff admin for work sessions, their messages, segments, context streams and API tokens.

Billed numbers (totals, tokens, costs, times, the seal) are read-only here: they are
written by the session services only, so the invariants of docs/DESIGN.md hold. Changelists
select their related rows up front, so their query count does not grow with the rows.
"""

from __future__ import annotations

import json
import secrets

from django.contrib import admin, messages
from django.db.models import Exists, OuterRef, Q
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

from billing.admin import ChoiceFilter, ReadOnlyAdminMixin, cost_with_flag, money, session_billing
from billing.models import ClientDomain, Provider
from config.admin_layout import WideChangelist
from sessions_app.admin_actions import end_sessions, export_sessions_csv, verify_integrity
from sessions_app.models import (
    ApiToken,
    ChatSession,
    ContextStream,
    SessionInvitation,
    SessionMessage,
    SessionSegment,
)
from sessions_app.templatetags.session_tags import format_duration, session_duration


def preformatted(text: str, max_height: str = "16em") -> str:
    return format_html(
        '<div style="white-space:pre-wrap;max-width:48em;max-height:{};overflow:auto">{}</div>', max_height, text
    )


# --- List filters -------------------------------------------------------------------------


class BilledClientFilter(admin.SimpleListFilter):
    """Sessions that billed a client: their current client or any of their segments'."""

    title = "client"
    parameter_name = "client"

    def lookups(self, request, model_admin):
        return [(str(pk), name) for pk, name in ClientDomain.objects.order_by("name").values_list("pk", "name")]

    def queryset(self, request, queryset):
        value = self.value()
        if not value:
            return queryset
        segments = SessionSegment.objects.filter(session=OuterRef("pk"), domain_id=value)
        return queryset.filter(Q(domain_id=value) | Exists(segments))


class MessageProviderFilter(admin.SimpleListFilter):
    """Sessions with at least one message answered by this provider."""

    title = "provider"
    parameter_name = "provider"

    def lookups(self, request, model_admin):
        return Provider.choices

    def queryset(self, request, queryset):
        value = self.value()
        if not value:
            return queryset
        return queryset.filter(Exists(SessionMessage.objects.filter(session=OuterRef("pk"), provider=value)))


# --- Inlines ------------------------------------------------------------------------------


class ReadOnlyInline(admin.TabularInline):
    extra = 0
    can_delete = False
    show_change_link = False

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


class MessageInline(ReadOnlyInline):
    model = SessionMessage
    fields = (
        "seq",
        "role",
        "author",
        "text",
        "model",
        "domain",
        "tokens",
        "token_source",
        "cost",
        "status",
        "timestamp",
    )
    readonly_fields = fields
    ordering = ("seq",)
    verbose_name_plural = "messages"

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("domain", "author")

    @admin.display(description="Content")
    def text(self, obj: SessionMessage) -> str:
        return preformatted(obj.content + (f"\n\n[{obj.error_text}]" if obj.error_text else ""))

    @admin.display(description="Cost (USD)")
    def cost(self, obj: SessionMessage) -> str:
        if obj.cost_usd is None and obj.role == "assistant":
            return format_html('<strong style="color:#b42318">{}</strong>', "price unknown")
        return money(obj.cost_usd)


class InvitationInline(ReadOnlyInline):
    """Who the owner shared the session with (consultants revoke and invite from the session's pages)."""

    model = SessionInvitation
    fields = ("user", "invited_by", "created_at", "revoked_at")
    readonly_fields = fields
    ordering = ("created_at",)
    verbose_name_plural = "shared with"

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("user", "invited_by")


class SegmentInline(ReadOnlyInline):
    model = SessionSegment
    fields = ("domain", "model", "started_at", "ended_at", "length")
    readonly_fields = fields
    ordering = ("started_at",)

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("domain")

    @admin.display(description="Duration")
    def length(self, obj: SessionSegment) -> str:
        if obj.ended_at is None:
            return "open"
        return format_duration((obj.ended_at - obj.started_at).total_seconds())


class ContextStreamInline(ReadOnlyInline):
    model = ContextStream
    fields = (
        "streamed_at",
        "reason",
        "source_model",
        "target_model",
        "source_domain",
        "target_domain",
        "message_count",
        "omitted_count",
        "total_tokens",
        "cost",
        "note",
    )
    readonly_fields = fields
    ordering = ("streamed_at",)
    verbose_name_plural = "context streams"

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("source_domain", "target_domain")

    @admin.display(description="Cost (USD)")
    def cost(self, obj: ContextStream) -> str:
        return money(obj.cost_usd) if obj.settled_at or obj.cost_usd is not None else "not settled yet"


# --- Sessions -----------------------------------------------------------------------------


class LineageFilter(ChoiceFilter):
    """Branches (with their parent) and the sessions that were branched."""

    title = "lineage"
    parameter_name = "lineage"
    options = {
        "branch": ("Branches", Q(parent__isnull=False)),
        "branched": ("Has branches", Q(Exists(ChatSession.objects.filter(parent=OuterRef("pk"))))),
        "original": ("Not a branch", Q(parent__isnull=True)),
    }


@admin.register(ChatSession)
class ChatSessionAdmin(WideChangelist, admin.ModelAdmin):
    list_display = (
        "title",
        "consultant",
        "client",
        "model_name",
        "started",
        "duration",
        "messages_count",
        "cost",
        "status",
        "billing",
        "lineage",
    )
    list_display_links = ("title",)
    list_filter = (
        "status",
        BilledClientFilter,
        MessageProviderFilter,
        "source",
        LineageFilter,
        "end_reason",
        "started_at",
    )
    search_fields = (
        "name",
        "user__username",
        "user__first_name",
        "user__last_name",
        "domain__name",
        "domain__slug",
        "messages__content",
    )
    list_select_related = ("user", "domain", "invoice", "parent")
    actions = [export_sessions_csv, verify_integrity, end_sessions]
    date_hierarchy = "started_at"
    list_per_page = 50
    show_full_result_count = False
    inlines = [SegmentInline, ContextStreamInline, InvitationInline, MessageInline]
    readonly_fields = (
        "session_id",
        "user",
        "domain",
        "brand",
        "status",
        "end_reason",
        "source",
        "primary_model",
        "current_model",
        "started_at",
        "ended_at",
        "duration",
        "last_activity_at",
        "total_messages",
        "total_tokens",
        "cost",
        "parent",
        "branched_at_seq",
        "branches",
        "invoice",
        "api_token",
        "seal",
        "archived_at",
        "continued_from",
        "template",
        "hidden_at",
    )
    fieldsets = (
        (None, {"fields": ("name", "user", "domain", "brand", "status", "end_reason", "source")}),
        ("Models", {"fields": ("primary_model", "current_model")}),
        ("Time", {"fields": ("started_at", "ended_at", "duration", "last_activity_at")}),
        ("Totals (billable messages)", {"fields": ("total_messages", "total_tokens", "cost")}),
        ("Prompt", {"fields": ("system_prompt",)}),
        (
            "Lineage and billing",
            {
                "fields": (
                    "session_id",
                    "parent",
                    "branched_at_seq",
                    "branches",
                    "continued_from",
                    "template",
                    "hidden_at",
                    "invoice",
                    "api_token",
                    "archived_at",
                )
            },
        ),
        ("Integrity seal", {"fields": ("seal",), "classes": ("collapse",)}),
    )

    def has_add_permission(self, request) -> bool:
        # A session is started by a consultant (web, API, terminal, gateway), never typed in.
        return False

    def get_queryset(self, request):
        return session_billing.annotate(super().get_queryset(request))

    def get_readonly_fields(self, request, obj=None):
        fields = list(self.readonly_fields)
        if obj is not None and obj.is_locked:
            fields += ["name", "system_prompt"]
        return fields

    def has_delete_permission(self, request, obj=None) -> bool:
        if obj is not None and obj.is_locked:
            return False
        return super().has_delete_permission(request, obj)

    @admin.display(description="Billing")
    def billing(self, obj: ChatSession) -> str:
        return session_billing.column(obj)  # each client's part with the invoice that billed it

    @admin.display(description="Branch of", ordering="parent__name")
    def lineage(self, obj: ChatSession) -> str:
        if obj.parent_id is None:
            return "—"
        url = reverse("admin:sessions_app_chatsession_change", args=[obj.parent_id])
        return format_html('<a href="{}">{}</a> at #{}', url, obj.parent, obj.branched_at_seq)

    @admin.display(description="Branches")
    def branches(self, obj: ChatSession) -> str:
        children = list(obj.branches.order_by("started_at").values_list("session_id", "name", "branched_at_seq"))
        if not children:
            return "none"
        return format_html_join(
            mark_safe("<br>"),
            '<a href="{}">{}</a> (from message #{})',
            (
                (reverse("admin:sessions_app_chatsession_change", args=[pk]), name or f"Session {str(pk)[:8]}", at)
                for pk, name, at in children
            ),
        )

    @admin.display(description="Session", ordering="name")
    def title(self, obj: ChatSession) -> str:
        return str(obj)

    @admin.display(description="Consultant", ordering="user__username")
    def consultant(self, obj: ChatSession) -> str:
        return obj.user.get_full_name() or obj.user.get_username()

    @admin.display(description="Client", ordering="domain__name")
    def client(self, obj: ChatSession) -> str:
        return obj.domain.name

    @admin.display(description="Model", ordering="current_model")
    def model_name(self, obj: ChatSession) -> str:
        if obj.primary_model and obj.primary_model != obj.current_model:
            return f"{obj.current_model} (from {obj.primary_model})"
        return obj.current_model

    @admin.display(description="Started", ordering="started_at")
    def started(self, obj: ChatSession) -> str:
        # Short, in the admin's time zone: the list is wide enough without "p.m." and the year.
        when = timezone.localtime(obj.started_at)
        year = "" if when.year == timezone.localtime().year else f" {when.year}"
        return f"{when:%b} {when.day}{year}, {when:%H:%M}"

    @admin.display(description="Messages", ordering="total_messages")
    def messages_count(self, obj: ChatSession) -> int:
        return obj.total_messages

    @admin.display(description="Duration", ordering="duration_seconds")
    def duration(self, obj: ChatSession) -> str:
        return session_duration(obj)

    @admin.display(description="Cost (USD)", ordering="estimated_cost_usd")
    def cost(self, obj: ChatSession) -> str:
        return cost_with_flag(obj.estimated_cost_usd, session_billing.has_unpriced(obj))

    @admin.display(description="Seal")
    def seal(self, obj: ChatSession) -> str:
        if not obj.soulfra_hash:
            return "not sealed (the session is still open)" if obj.is_active else "not sealed"
        return preformatted(json.dumps(obj.soulfra_hash, indent=2, sort_keys=True), max_height="24em")


@admin.register(SessionMessage)
class SessionMessageAdmin(WideChangelist, ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ("session", "seq", "role", "snippet", "model", "domain", "tokens", "cost", "status", "timestamp")
    list_filter = ("role", "status", "provider", "token_source", "domain", "is_imported", "timestamp")
    search_fields = ("content", "session__name", "model")
    list_select_related = ("session", "domain")
    date_hierarchy = "timestamp"
    show_full_result_count = False
    readonly_fields = (
        "message_id",
        "session",
        "seq",
        "role",
        "text",
        "timestamp",
        "model",
        "provider",
        "domain",
        "prompt_tokens",
        "completion_tokens",
        "tokens",
        "token_source",
        "cost",
        "status",
        "error_text",
        "shared_to_domains",
        "shared_to_models",
        "hash",
        "copied_from",
        "is_imported",
    )
    fields = readonly_fields

    @admin.display(description="Content")
    def snippet(self, obj: SessionMessage) -> str:
        text = obj.content.replace("\n", " ")
        return text if len(text) <= 80 else text[:79] + "…"

    @admin.display(description="Content")
    def text(self, obj: SessionMessage) -> str:
        return preformatted(obj.content, max_height="40em")

    @admin.display(description="Cost (USD)", ordering="cost_usd")
    def cost(self, obj: SessionMessage) -> str:
        if obj.cost_usd is None and obj.role == "assistant":
            return format_html('<strong style="color:#b42318">{}</strong>', "price unknown")
        return money(obj.cost_usd)


@admin.register(SessionSegment)
class SessionSegmentAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ("session", "domain", "model", "started_at", "ended_at", "length")
    list_filter = ("domain", "started_at")
    search_fields = ("session__name", "model", "domain__name")
    list_select_related = ("session", "domain")
    date_hierarchy = "started_at"

    @admin.display(description="Duration")
    def length(self, obj: SessionSegment) -> str:
        if obj.ended_at is None:
            return "open"
        return format_duration((obj.ended_at - obj.started_at).total_seconds())


@admin.register(ContextStream)
class ContextStreamAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = (
        "streamed_at",
        "session",
        "reason",
        "source_model",
        "target_model",
        "source_domain",
        "target_domain",
        "message_count",
        "total_tokens",
        "cost",
    )
    list_filter = ("reason", "source_domain", "target_domain", "streamed_at")
    search_fields = ("session__name", "source_model", "target_model", "note")
    list_select_related = ("session", "source_domain", "target_domain")
    date_hierarchy = "streamed_at"
    readonly_fields = (
        "stream_id",
        "session",
        "reason",
        "note",
        "source_model",
        "target_model",
        "source_domain",
        "target_domain",
        "message_count",
        "omitted_count",
        "total_tokens",
        "cost",
        "streamed_at",
        "settled_at",
        "snapshot",
    )
    fields = readonly_fields

    @admin.display(description="Cost (USD)", ordering="cost_usd")
    def cost(self, obj: ContextStream) -> str:
        if obj.cost_usd is None:
            return "not settled yet"
        return money(obj.cost_usd)

    @admin.display(description="Context carried")
    def snapshot(self, obj: ContextStream) -> str:
        return preformatted(json.dumps(obj.context_snapshot, indent=2, ensure_ascii=False), max_height="40em")


# --- API tokens ---------------------------------------------------------------------------


class TokenStateFilter(ChoiceFilter):
    title = "state"
    parameter_name = "state"
    options = {
        "live": ("Live", Q(revoked_at__isnull=True)),
        "revoked": ("Revoked", Q(revoked_at__isnull=False)),
    }


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    """Tokens are shown by their hint only; the raw token is displayed once, on creation."""

    list_display = ("display_hint", "name", "user", "client", "created_at", "last_used_at", "state")
    list_filter = (TokenStateFilter, "client")
    search_fields = ("name", "hint", "user__username", "client__name", "client__slug")
    list_select_related = ("user", "client")
    raw_id_fields = ("user",)
    actions = ["revoke"]

    def get_fields(self, request, obj=None):
        if obj is None:
            return ("user", "client", "name")
        return ("display_hint", "user", "client", "name", "created_at", "last_used_at", "revoked_at")

    def get_readonly_fields(self, request, obj=None):
        if obj is None:
            return ()
        return ("display_hint", "user", "client", "created_at", "last_used_at", "revoked_at")

    def save_model(self, request, obj: ApiToken, form, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        raw = ApiToken.PREFIX + secrets.token_urlsafe(32)
        obj.token_hash = ApiToken.hash_token(raw)
        obj.hint = raw[:10]
        super().save_model(request, obj, form, change)
        messages.warning(
            request,
            f"New API token for {obj.user}: {raw} — copy it now; it is stored only as a hash and will not be shown again.",
        )

    @admin.display(description="Token", ordering="hint")
    def display_hint(self, obj: ApiToken) -> str:
        return f"{obj.hint}…" if obj.hint else "—"

    @admin.display(description="State", ordering="revoked_at")
    def state(self, obj: ApiToken) -> str:
        return f"revoked {obj.revoked_at:%Y-%m-%d %H:%M}" if obj.revoked_at else "live"

    @admin.action(description="Revoke the selected tokens")
    def revoke(self, request, queryset):
        count = queryset.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())
        self.message_user(request, f"{count} token(s) revoked.")
