"""Staff admin for clients, brands, prices, aliases, the usage ledger and invoices.

Every changelist selects its related rows up front (`list_select_related`, annotations,
one prefetch), so the number of queries does not grow with the number of rows.
"""

from __future__ import annotations

import re
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import NON_FIELD_ERRORS
from django.db import transaction
from django.db.models import Count, Exists, OuterRef, Prefetch, Q, Subquery
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

from billing import budgets
from billing.admin_actions import draft_last_month, issue_invoices
from billing.branding import safe_color
from billing.models import (
    TERMS_EPOCH,
    Brand,
    ClientBudget,
    ClientDomain,
    ClientTerms,
    ExchangeRate,
    Invoice,
    InvoiceLine,
    InvoiceStatus,
    LLMUsage,
    ModelAlias,
    ModelPrice,
    SessionTemplate,
)
from billing.money import format_cost, format_ledger, format_money, format_rate
from billing.rates import RecordLocked, client_terms_guard, exchange_rate_guard
from config.admin_layout import WideChangelist
from providers.naming import PROVIDERS, parse_model
from sessions_app.models import SessionMessage

HOSTNAME = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")
CURRENCY = re.compile(r"^[A-Z]{3}$")

DUPLICATE_SLUG = "Another client already uses the slug “%(slug)s”."
BAD_HOSTNAME = "Enter a bare hostname such as acme.example.com (no scheme, port or path)."
BAD_CURRENCY = "Enter a three-letter ISO 4217 currency code, for example USD."
CURRENCY_FIXED = "This client has issued invoices in %(currency)s; its currency can no longer change."
TERMS_IN_PAST = "Terms take effect now or later: past work keeps the terms it was done at."
TERMS_HISTORY = "Terms that have taken effect are history and stay as they were; add a new row from now on."
MISSING_RATES = (
    "No exchange rate in force for: {clients}. Their USD costs are flagged and not billed until a rate "
    "is added (Exchange rates, or manage.py load_exchange_rates)."
)
SECOND_DEFAULT_BRAND = (
    "%(client)s already has a default brand (%(brand)s). Untick it there first, "
    "or use the “Make default” action on the brand list."
)


def swatch(color: str, label: str = "") -> str:
    """A small colour square; the colour is re-validated, the label escaped."""
    return format_html(
        '<span class="bs-swatch" title="{}" style="display:inline-block;width:1.1em;height:1.1em;'
        'border-radius:3px;border:1px solid rgba(0,0,0,.25);vertical-align:middle;background:{}"></span>',
        label or color,
        safe_color(color, "#ffffff"),
    )


def money(value) -> str:
    """A cost in the admin's USD columns, as stored (six decimals); "—" for none."""
    if value is None:
        return "—"
    return format_ledger(value, "USD")


def cost_with_flag(value, unpriced: bool) -> str:
    """A total cost that is flagged when some of its calls have no known price (never read as complete)."""
    if not unpriced:
        return money(value)
    return format_html(
        '{} <strong style="color:#b42318" title="calls with unknown price are not in this total">+ price unknown</strong>',
        money(value),
    )


class SessionBilling:
    """For the work-session admin: which invoice billed each client's part, and unknown prices."""

    def annotate(self, queryset):

        unpriced = SessionMessage.objects.filter(session=OuterRef("pk"), cost_usd__isnull=True).exclude(role="user")
        billed = (
            InvoiceLine.objects.billed()
            .select_related("invoice", "client")
            .only("session_id", "client__name", "invoice__number")
        )
        return queryset.annotate(has_unpriced=Exists(unpriced)).prefetch_related(
            Prefetch("invoice_lines", queryset=billed, to_attr="billed_lines")
        )

    def has_unpriced(self, session) -> bool:
        found = getattr(session, "has_unpriced", None)
        if found is None:
            found = session.messages.filter(cost_usd__isnull=True).exclude(role="user").exists()
        return bool(found)

    def column(self, session) -> str:
        lines = getattr(session, "billed_lines", None)
        if lines is None:
            lines = list(InvoiceLine.objects.billed().filter(session=session).select_related("invoice", "client"))
        parts = sorted({(line.client.name, line.invoice.number) for line in lines})
        if not parts:
            return "unbilled"
        if len(parts) == 1:
            return format_html("🔒 {}", parts[0][1])
        return format_html_join(", ", "🔒 {} ({})", ((number, client) for client, number in parts))


session_billing = SessionBilling()


def guarded(form, check, instance) -> None:
    """Run a billing guard in a form's clean(): its refusal becomes the form's error, not a 500."""
    try:
        check(instance)
    except RecordLocked as exc:
        raise forms.ValidationError(str(exc)) from None


class ColorInput(forms.TextInput):
    """A native colour picker that still posts plain #rrggbb (validated by the model)."""

    input_type = "color"


# --- Clients ------------------------------------------------------------------------------


class ClientDomainForm(forms.ModelForm):
    class Meta:
        model = ClientDomain
        fields = (
            "name",
            "slug",
            "hostname",
            "is_active",
            "hourly_rate",
            "currency",
            "llm_markup_percent",
            "billing_increment_minutes",
            "tax_rate_percent",
            "payment_terms_days",
            "members",
        )
        help_texts = {
            "hourly_rate": "A change takes effect now; work done before keeps the rate it was done at.",
            "currency": "Amounts are billed in it; USD costs are converted at the exchange rates. Fixed once invoiced.",
        }

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Left empty, tax and payment terms keep their defaults (no tax, 30 days).
        for name in ("tax_rate_percent", "payment_terms_days"):
            self.fields[name].required = False

    def clean_tax_rate_percent(self):
        value = self.cleaned_data.get("tax_rate_percent")
        return ClientDomain._meta.get_field("tax_rate_percent").default if value is None else value

    def clean_payment_terms_days(self):
        value = self.cleaned_data.get("payment_terms_days")
        return ClientDomain._meta.get_field("payment_terms_days").default if value is None else value

    def clean_slug(self) -> str:
        slug = self.cleaned_data["slug"].strip().lower()
        clash = ClientDomain.objects.filter(slug__iexact=slug)
        if self.instance.pk:
            clash = clash.exclude(pk=self.instance.pk)
        if clash.exists():
            raise forms.ValidationError(DUPLICATE_SLUG, code="unique", params={"slug": slug})
        return slug

    def clean_hostname(self) -> str | None:
        host = (self.cleaned_data.get("hostname") or "").strip().lower()
        if not host:
            return None
        if not HOSTNAME.fullmatch(host):
            raise forms.ValidationError(BAD_HOSTNAME, code="invalid")
        return host

    def clean_currency(self) -> str:
        currency = (self.cleaned_data.get("currency") or "").strip().upper()
        if not CURRENCY.fullmatch(currency):
            raise forms.ValidationError(BAD_CURRENCY, code="invalid")
        if self.instance.pk and currency != self.instance.currency:
            issued = Invoice.objects.filter(client=self.instance).exclude(status=InvoiceStatus.DRAFT)
            if issued.exists():
                raise forms.ValidationError(CURRENCY_FIXED, code="locked", params={"currency": self.instance.currency})
        return currency


class BrandInline(admin.TabularInline):
    model = Brand
    extra = 0
    fields = ("preview", "name", "is_default", "font", "primary_color", "accent_color", "background_color")
    readonly_fields = ("preview",)
    show_change_link = True

    def formfield_for_dbfield(self, db_field, request, **kwargs):
        if db_field.name in ("primary_color", "accent_color", "background_color"):
            kwargs["widget"] = ColorInput
        return super().formfield_for_dbfield(db_field, request, **kwargs)

    @admin.display(description="Colours")
    def preview(self, obj: Brand) -> str:
        if not obj.pk:
            return "—"
        return format_html("{}{}{}", swatch(obj.primary_color), swatch(obj.accent_color), swatch(obj.background_color))


class OneBudgetVersion:
    """A changelist with a budget column: the budgets' version is read once for all its rows."""

    def changelist_view(self, request, extra_context=None):
        with budgets.budgets_at(budgets.read_version()):
            response = super().changelist_view(request, extra_context)  # type: ignore[misc]
            if hasattr(response, "render"):
                response.render()  # the rows' budget cells are computed while it renders
            return response


@admin.register(ClientDomain)
class ClientDomainAdmin(OneBudgetVersion, admin.ModelAdmin):
    form = ClientDomainForm
    list_display = (
        "name",
        "slug",
        "hostname",
        "rate",
        "llm_markup_percent",
        "billing_increment_minutes",
        "exchange_rate",
        "budget",
        "default_brand",
        "member_count",
        "is_active",
    )
    list_display_links = ("name",)
    list_filter = ("is_active", "currency", "billing_increment_minutes")
    actions = [draft_last_month]
    search_fields = ("name", "slug", "hostname")
    prepopulated_fields = {"slug": ("name",)}
    filter_horizontal = ("members",)
    readonly_fields = ("id", "created_at", "terms_history")
    inlines = [BrandInline]
    fieldsets = (
        (None, {"fields": ("name", "slug", "hostname", "is_active")}),
        (
            "Billing",
            {
                "fields": (
                    "hourly_rate",
                    "currency",
                    "llm_markup_percent",
                    "billing_increment_minutes",
                    "tax_rate_percent",
                    "payment_terms_days",
                    "terms_history",
                )
            },
        ),
        ("Who may bill this client", {"fields": ("members",)}),
        ("Record", {"fields": ("id", "created_at"), "classes": ("collapse",)}),
    )

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .annotate(
                member_total=Count("members", distinct=True),
                rate_now=Subquery(
                    ExchangeRate.objects.filter(currency=OuterRef("currency"), effective_from__lte=timezone.now())
                    .order_by("-effective_from")
                    .values("usd_rate")[:1]
                ),
            )
            .prefetch_related(Prefetch("brands", queryset=Brand.objects.filter(is_default=True), to_attr="defaults"))
        )

    @admin.display(description="Hourly rate", ordering="hourly_rate")
    def rate(self, obj: ClientDomain) -> str:
        return format_money(obj.hourly_rate, obj.currency)

    def changelist_view(self, request, extra_context=None):
        # A client whose currency has no exchange rate cannot have its USD costs billed: say so.
        missing = rates_missing()
        if missing:
            messages.warning(request, MISSING_RATES.format(clients=", ".join(missing)))
        return super().changelist_view(request, extra_context)

    @admin.display(description="Dated terms")
    def terms_history(self, obj: ClientDomain) -> str:
        """Each part is billed at the terms in force when its session ended; a change takes effect now."""
        if obj.pk is None:
            return "—"
        rows = list(obj.terms.order_by("-effective_from")[:20])
        add = reverse("admin:billing_clientterms_add") + f"?client={obj.pk}"
        if not rows:
            return format_html('Never changed: the fields above. <a href="{}">Schedule a change</a>', add)
        return format_html(
            '{}<br><a href="{}">Schedule a change</a>',
            format_html_join(
                mark_safe("<br>"),
                "from {}: {}/h, {}% markup, {}-minute increments",
                (
                    (
                        "the start"
                        if r.effective_from == TERMS_EPOCH
                        else f"{timezone.localtime(r.effective_from):%Y-%m-%d %H:%M}",
                        format_money(r.hourly_rate, obj.currency),
                        r.llm_markup_percent,
                        r.billing_increment_minutes,
                    )
                    for r in rows
                ),
            ),
            add,
        )

    @admin.display(description="Exchange rate")
    def exchange_rate(self, obj: ClientDomain) -> str:
        if obj.currency == "USD":
            return "—"
        rate = getattr(obj, "rate_now", None)
        if rate is None:
            return format_html('<strong style="color:#b42318">{} rate missing</strong>', obj.currency)
        return f"1 USD = {format_rate(rate)} {obj.currency}"

    @admin.display(description="Budget this month")
    def budget(self, obj: ClientDomain) -> str:
        state = budgets.budget_state(client_id=obj.pk)
        if state is None:
            return "—"
        text = f"{state.used_text()} of {state.limit_text()} ({state.percent}%)"
        if state.level == "ok":
            return text
        return format_html('<strong style="color:#b42318">{}</strong>', text)

    @admin.display(description="Default brand")
    def default_brand(self, obj: ClientDomain) -> str:
        defaults = getattr(obj, "defaults", None)
        if defaults is None:
            defaults = list(obj.brands.filter(is_default=True))
        if not defaults:
            return "—"
        brand = defaults[0]
        return format_html("{} {}", swatch(brand.primary_color), brand.name)

    @admin.display(description="Members", ordering="member_total")
    def member_count(self, obj: ClientDomain) -> str:
        total = getattr(obj, "member_total", None)
        if total is None:
            total = obj.members.count()
        return str(total) if total else "open to all"


class ClientTermsForm(forms.ModelForm):
    class Meta:
        model = ClientTerms
        fields = ("client", "effective_from", "hourly_rate", "llm_markup_percent", "billing_increment_minutes")

    def clean(self):
        cleaned = super().clean()
        when = cleaned.get("effective_from")
        held = not self.instance._state.adding and self.instance.effective_from <= timezone.now()
        if held and self.changed_data:
            raise forms.ValidationError(TERMS_HISTORY)
        if when is not None and (self.instance._state.adding or "effective_from" in self.changed_data):
            if when < timezone.now() - timezone.timedelta(minutes=1):
                raise forms.ValidationError(TERMS_IN_PAST)
        if cleaned.get("client") is not None and not self.errors:
            for name, value in cleaned.items():
                setattr(self.instance, name, value)
            guarded(self, client_terms_guard, self.instance)
        return cleaned


@admin.register(ClientTerms)
class ClientTermsAdmin(admin.ModelAdmin):
    """A client's dated terms: history stays as it was; a change is scheduled from now on."""

    form = ClientTermsForm
    list_display = ("client", "effective_from", "hourly_rate", "llm_markup_percent", "billing_increment_minutes")
    list_filter = ("client",)
    list_select_related = ("client",)
    autocomplete_fields = ("client",)
    ordering = ("client__name", "-effective_from")

    def has_delete_permission(self, request, obj=None) -> bool:
        # A dated row is history: terms that held are never taken back.
        return obj is not None and obj.effective_from > timezone.now()


# --- Brands -------------------------------------------------------------------------------


class BrandForm(forms.ModelForm):
    class Meta:
        model = Brand
        fields = (
            "client",
            "name",
            "owner",
            "is_default",
            "primary_color",
            "accent_color",
            "background_color",
            "font",
            "logo",
            "welcome_text",
        )
        widgets = {
            "primary_color": ColorInput,
            "accent_color": ColorInput,
            "background_color": ColorInput,
            "welcome_text": forms.Textarea(attrs={"rows": 3}),
        }

    def clean(self):
        cleaned = super().clean()
        client = cleaned.get("client")
        if cleaned.get("is_default") and client is not None:
            others = Brand.objects.filter(client=client, is_default=True)
            if self.instance.pk:
                others = others.exclude(pk=self.instance.pk)
            other = others.first()
            if other is not None:
                self.add_error(
                    "is_default",
                    forms.ValidationError(
                        SECOND_DEFAULT_BRAND, code="unique", params={"client": client.name, "brand": other.name}
                    ),
                )
        return cleaned

    def _post_clean(self) -> None:
        super()._post_clean()
        # The one-default-per-client rule is reported on the field above, in words; drop
        # the model constraint's terse duplicate of it.
        general = self._errors.get(NON_FIELD_ERRORS) if self._errors else None
        if general and self.has_error("is_default"):
            kept = [e for e in general.as_data() if "one_default_brand_per_client" not in " ".join(e.messages)]
            if kept:
                self._errors[NON_FIELD_ERRORS] = self.error_class(kept, error_class="nonfield", renderer=self.renderer)
            else:
                del self._errors[NON_FIELD_ERRORS]


@admin.register(Brand)
class BrandAdmin(admin.ModelAdmin):
    form = BrandForm
    list_display = ("colours", "name", "client", "font", "is_default", "owner")
    list_display_links = ("name",)
    list_filter = ("is_default", "font", "client")
    search_fields = ("name", "client__name", "client__slug", "welcome_text")
    list_select_related = ("client", "owner")
    autocomplete_fields = ("client",)
    raw_id_fields = ("owner",)
    readonly_fields = ("id", "created_at", "preview")
    actions = ["make_default"]
    fieldsets = (
        (None, {"fields": ("client", "name", "owner", "is_default")}),
        ("Look", {"fields": ("primary_color", "accent_color", "background_color", "font", "logo", "preview")}),
        ("Words", {"fields": ("welcome_text",)}),
        ("Record", {"fields": ("id", "created_at"), "classes": ("collapse",)}),
    )

    @admin.display(description="Colours")
    def colours(self, obj: Brand) -> str:
        return format_html(
            "{}{}{}",
            swatch(obj.primary_color, "primary"),
            swatch(obj.accent_color, "accent"),
            swatch(obj.background_color, "background"),
        )

    @admin.display(description="Preview")
    def preview(self, obj: Brand) -> str:
        if not obj.pk:
            return "Saved brands show a preview here."
        return format_html(
            '<div style="padding:.75em 1em;border-radius:6px;background:{};font-family:{};border:1px solid #ccc">'
            '<strong style="color:{}">{}</strong> <span style="color:{}">accent</span><br>{}</div>',
            safe_color(obj.background_color, "#ffffff"),
            obj.font_stack,
            safe_color(obj.primary_color, "#1f6feb"),
            obj.name,
            safe_color(obj.accent_color, "#8250df"),
            obj.welcome_text or "",
        )

    @admin.action(description="Make the selected brand its client's default")
    def make_default(self, request, queryset):
        done = 0
        with transaction.atomic():
            for brand in queryset.select_related("client").order_by("client_id", "-created_at"):
                Brand.objects.filter(client_id=brand.client_id, is_default=True).exclude(pk=brand.pk).update(
                    is_default=False
                )
                if not brand.is_default:
                    brand.is_default = True
                    brand.save(update_fields=["is_default"])
                done += 1
        self.message_user(request, f"{done} brand(s) are now their client's default.")


# --- Prices and aliases -------------------------------------------------------------------


class ChoiceFilter(admin.SimpleListFilter):
    """A list filter declared as data: `options` maps each parameter value to its label and the
    condition (a Q, or a callable returning one, for conditions on the current time) of the
    rows it keeps."""

    options: dict[str, tuple[str, Any]] = {}

    def lookups(self, request, model_admin):
        return [(value, label) for value, (label, _condition) in self.options.items()]

    def queryset(self, request, queryset):
        choice = self.options.get(self.value())
        if choice is None:
            return queryset
        condition = choice[1]
        return queryset.filter(condition() if callable(condition) else condition)


class InForceFilter(ChoiceFilter):
    title = "in force"
    parameter_name = "in_force"
    options = {
        "yes": ("In force now", lambda: Q(effective_from__lte=timezone.now(), superseded=False)),
        "future": ("Scheduled", lambda: Q(effective_from__gt=timezone.now())),
        "superseded": ("Superseded", Q(superseded=True)),
    }


@admin.register(ModelPrice)
class ModelPriceAdmin(admin.ModelAdmin):
    list_display = (
        "model_name",
        "input_per_mtok",
        "output_per_mtok",
        "effective_from",
        "state",
        "context_window",
        "source",
    )
    list_filter = ("provider", InForceFilter, "effective_from")
    search_fields = ("model", "source")
    date_hierarchy = "effective_from"
    readonly_fields = ("id", "created_at")
    fieldsets = (
        (None, {"fields": ("provider", "model", "effective_from")}),
        ("USD per million tokens", {"fields": ("input_per_mtok", "output_per_mtok")}),
        ("Details", {"fields": ("context_window", "source", "id", "created_at")}),
    )

    def get_queryset(self, request):
        now = timezone.now()
        newer = ModelPrice.objects.filter(
            provider=OuterRef("provider"),
            model=OuterRef("model"),
            effective_from__gt=OuterRef("effective_from"),
            effective_from__lte=now,
        )
        return super().get_queryset(request).annotate(superseded=Exists(newer))

    @admin.display(description="Model", ordering="model")
    def model_name(self, obj: ModelPrice) -> str:
        return f"{obj.provider}:{obj.model}"

    @admin.display(description="State")
    def state(self, obj: ModelPrice) -> str:
        if obj.effective_from > timezone.now():
            return "scheduled"
        if getattr(obj, "superseded", False):
            return "superseded"
        return "in force"


@admin.register(ModelAlias)
class ModelAliasAdmin(admin.ModelAdmin):
    list_display = ("alias_name", "target", "provider")
    list_filter = ("provider",)
    search_fields = ("alias", "target")

    @admin.display(description="Alias", ordering="alias")
    def alias_name(self, obj: ModelAlias) -> str:
        return f"{obj.provider}:{obj.alias}"


# --- Exchange rates and budgets -----------------------------------------------------------


def rates_missing() -> list[str]:
    """Active non-USD clients with no exchange rate in force now (a problem to fix)."""
    now = timezone.now()
    found = ExchangeRate.objects.filter(currency=OuterRef("currency"), effective_from__lte=now)
    return [
        f"{name} ({currency})"
        for name, currency in ClientDomain.objects.active()
        .exclude(currency="USD")
        .exclude(Exists(found))
        .values_list("name", "currency")
    ]


class ExchangeRateForm(forms.ModelForm):
    class Meta:
        model = ExchangeRate
        fields = ("currency", "usd_rate", "effective_from", "source")

    def clean_currency(self) -> str:
        currency = (self.cleaned_data.get("currency") or "").strip().upper()
        if not CURRENCY.fullmatch(currency):
            raise forms.ValidationError(BAD_CURRENCY, code="invalid")
        return currency

    def clean(self):
        cleaned = super().clean()
        if not self.errors:
            for name, value in cleaned.items():
                setattr(self.instance, name, value)
            guarded(self, exchange_rate_guard, self.instance)
        return cleaned


@admin.register(ExchangeRate)
class ExchangeRateAdmin(admin.ModelAdmin):
    form = ExchangeRateForm
    list_display = ("currency", "rate_text", "effective_from", "state", "used_by", "source")
    list_filter = ("currency",)
    search_fields = ("currency", "source")
    date_hierarchy = "effective_from"

    def get_queryset(self, request):
        newer = ExchangeRate.objects.filter(
            currency=OuterRef("currency"),
            effective_from__gt=OuterRef("effective_from"),
            effective_from__lte=timezone.now(),
        )
        used = InvoiceLine.objects.filter(
            invoice__status__in=(InvoiceStatus.ISSUED, InvoiceStatus.VOID),
            invoice__currency=OuterRef("currency"),
            exchange_rate_from=OuterRef("effective_from"),
        )
        return super().get_queryset(request).annotate(superseded=Exists(newer), used=Exists(used))

    def changelist_view(self, request, extra_context=None):
        missing = rates_missing()
        if missing:
            messages.warning(request, MISSING_RATES.format(clients=", ".join(missing)))
        return super().changelist_view(request, extra_context)

    def has_delete_permission(self, request, obj=None) -> bool:
        if obj is not None and getattr(obj, "used", None) is None:
            obj.used = InvoiceLine.objects.filter(
                invoice__status__in=(InvoiceStatus.ISSUED, InvoiceStatus.VOID),
                invoice__currency=obj.currency,
                exchange_rate_from=obj.effective_from,
            ).exists()
        if obj is not None and obj.used:
            return False
        return super().has_delete_permission(request, obj)

    @admin.display(description="1 USD =", ordering="usd_rate")
    def rate_text(self, obj: ExchangeRate) -> str:
        return f"{format_rate(obj.usd_rate)} {obj.currency}"

    @admin.display(description="State")
    def state(self, obj: ExchangeRate) -> str:
        if obj.effective_from > timezone.now():
            return "scheduled"
        return "superseded" if getattr(obj, "superseded", False) else "in force"

    @admin.display(description="Issued invoices", boolean=True)
    def used_by(self, obj: ExchangeRate) -> bool:
        return bool(getattr(obj, "used", False))


class ClientBudgetForm(forms.ModelForm):
    class Meta:
        model = ClientBudget
        fields = ("client", "month", "llm_limit", "hours_limit")
        help_texts = {"month": "Any day of the first month it applies to; it holds until a later month's budget."}

    def clean_month(self):
        month = self.cleaned_data["month"]
        return month.replace(day=1) if month else month


@admin.register(ClientBudget)
class ClientBudgetAdmin(OneBudgetVersion, admin.ModelAdmin):
    form = ClientBudgetForm
    list_display = ("client", "month_label", "limit_text", "hours_limit", "use_now")
    list_filter = ("client",)
    list_select_related = ("client",)
    autocomplete_fields = ("client",)
    ordering = ("client__name", "-month")

    def save_model(self, request, obj, form, change) -> None:
        obj.updated_by = request.user
        super().save_model(request, obj, form, change)

    @admin.display(description="From", ordering="month")
    def month_label(self, obj: ClientBudget) -> str:
        return f"{obj.month:%B %Y}"

    @admin.display(description="Paid-model budget", ordering="llm_limit")
    def limit_text(self, obj: ClientBudget) -> str:
        return format_money(obj.llm_limit, obj.client.currency)

    @admin.display(description="Used this month")
    def use_now(self, obj: ClientBudget) -> str:
        state = budgets.budget_state(client_id=obj.client_id, with_hours=True)
        if state is None or state.month < obj.month:
            return "—"
        text = f"{state.used_text()} ({state.percent}%)"
        if state.hours_percent is not None:
            text += f", {state.hours_used} h ({state.hours_percent}%)"
        if state.level == "ok":
            return text
        return format_html('<strong style="color:#b42318">{}</strong>', text)


# --- Usage ledger -------------------------------------------------------------------------


class PriceKnownFilter(ChoiceFilter):
    title = "price"
    parameter_name = "price"
    options = {
        "unknown": ("Price unknown (to fix)", Q(cost__isnull=True)),
        "known": ("Priced", Q(cost__isnull=False)),
    }


class ReadOnlyAdminMixin:
    """A record, not a form: staff may look, nobody edits it here."""

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


@admin.register(LLMUsage)
class LLMUsageAdmin(WideChangelist, ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = (
        "created_at",
        "user",
        "client",
        "model_name",
        "provider_model",
        "prompt_tokens",
        "completion_tokens",
        "token_source",
        "cost_display",
        "time_to_first_token_ms",
        "duration_ms",
        "status",
    )
    list_filter = ("status", PriceKnownFilter, "provider", "token_source", "client", "created_at")
    search_fields = ("model", "provider_model", "user__username", "client__name", "client__slug", "error_text")
    list_select_related = ("user", "client")
    date_hierarchy = "created_at"
    readonly_fields = [f.name for f in LLMUsage._meta.fields]

    @admin.display(description="Model", ordering="model")
    def model_name(self, obj: LLMUsage) -> str:
        return f"{obj.provider}:{obj.model}"

    @admin.display(description="Cost (USD)", ordering="cost")
    def cost_display(self, obj: LLMUsage) -> str:
        if obj.cost is None:
            return format_html('<strong style="color:#b42318">{}</strong>', "price unknown")
        return format_cost(obj.cost, "USD")  # the decimals it needs; the record view keeps all six


# --- Invoices -----------------------------------------------------------------------------


class InvoiceLineInline(admin.TabularInline):
    model = InvoiceLine
    extra = 0
    fields = ("position", "kind", "description", "session", "quantity", "unit", "unit_price", "amount")
    readonly_fields = fields
    can_delete = False
    show_change_link = False

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("session")


@admin.register(Invoice)
class InvoiceAdmin(admin.ModelAdmin):
    list_display = (
        "label",
        "client",
        "period_start",
        "period_end",
        "status",
        "kind",
        "total_display",
        "due_date",
        "paid_at",
        "line_count",
        "desk",
    )
    list_filter = ("status", "kind", "client", "currency")
    search_fields = ("number", "client__name", "client__slug", "lines__description")
    actions = [issue_invoices]
    list_select_related = ("client",)
    date_hierarchy = "period_start"
    inlines = [InvoiceLineInline]
    readonly_fields = (
        "id",
        "number",
        "status",
        "time_total",
        "llm_total",
        "total",
        "created_by",
        "created_at",
        "issued_at",
        "sessions_billed",
        "csv_export",
        "desk",
    )
    fieldsets = (
        (None, {"fields": ("client", "period_start", "period_end", "currency", "number", "status")}),
        ("Totals", {"fields": ("time_total", "llm_total", "total")}),
        (
            "Record",
            {"fields": ("id", "created_by", "created_at", "issued_at", "sessions_billed", "csv_export", "desk")},
        ),
    )

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(line_total=Count("lines", distinct=True))

    def has_add_permission(self, request) -> bool:
        # Invoices are drawn up from the usage by the billing service, not typed in.
        return False

    def get_readonly_fields(self, request, obj=None):
        fields = list(super().get_readonly_fields(request, obj))
        # Lines are drawn from the client and period: changing either means a new draft.
        if obj is not None:
            fields += ["client", "period_start", "period_end", "currency"]
        return fields

    def has_change_permission(self, request, obj=None) -> bool:
        # An invoice is drawn up and changed by the billing desk's services, never typed in here:
        # the admin shows it (no Save buttons); issued ones are final anyway.
        if obj is not None:
            return False
        return super().has_change_permission(request, obj)

    def has_delete_permission(self, request, obj=None) -> bool:
        if obj is not None and obj.status != InvoiceStatus.DRAFT:
            return False
        return super().has_delete_permission(request, obj)

    @admin.display(description="Billing desk")
    def desk(self, obj: Invoice) -> str:
        return format_html('<a href="{}">Open</a>', reverse("billing:invoice", args=[obj.pk]))

    @admin.display(description="Invoice", ordering="number")
    def label(self, obj: Invoice) -> str:
        return obj.number or "draft"

    @admin.display(description="Total", ordering="total")
    def total_display(self, obj: Invoice) -> str:
        return format_money(obj.total, obj.currency, sign=obj.sign)

    @admin.display(description="Lines", ordering="line_total")
    def line_count(self, obj: Invoice) -> int:
        total = getattr(obj, "line_total", None)
        return obj.lines.count() if total is None else total

    @admin.display(description="CSV")
    def csv_export(self, obj: Invoice) -> str:
        if obj.number is None:
            return "available once issued"
        return format_html(
            '<a href="{}">Download {}.csv</a>', reverse("billing:invoice_csv", args=[obj.pk]), obj.number
        )

    @admin.display(description="Sessions billed")
    def sessions_billed(self, obj: Invoice) -> str:
        sessions = list(obj.sessions.select_related("domain").order_by("started_at")[:200])
        if not sessions:
            return "—"
        return format_html_join(
            ", ",
            '<a href="{}">{}</a>',
            ((reverse("admin:sessions_app_chatsession_change", args=[s.pk]), str(s)) for s in sessions),
        )


# --- Conversation templates ---------------------------------------------------------------


class SessionTemplateForm(forms.ModelForm):
    class Meta:
        model = SessionTemplate
        fields = ("name", "client", "default_model", "system_prompt", "first_message", "is_active")

    def clean_default_model(self) -> str:
        """A `provider:model` name of a known provider; a key or a price is checked when a session starts."""

        name = (self.cleaned_data.get("default_model") or "").strip()
        if not name:
            return ""
        ref = parse_model(name)
        if ref.provider not in PROVIDERS or not ref.model or any(ch.isspace() for ch in ref.model):
            raise forms.ValidationError(TEMPLATE_MODEL_INVALID.format(name=name))
        return ref.name


TEMPLATE_MODEL_INVALID = "{name!r} is not a model name: write provider:model, e.g. ollama:llama3.2 or openai:gpt-4o."


@admin.register(SessionTemplate)
class SessionTemplateAdmin(admin.ModelAdmin):
    """Per-client presets consultants pick on the new-session form (no client: offered for all)."""

    form = SessionTemplateForm
    list_display = ("name", "client_name", "default_model", "opens_with", "is_active")
    list_filter = ("is_active", "client")
    list_select_related = ("client",)
    search_fields = ("name", "client__name", "system_prompt", "first_message")
    list_per_page = 50

    @admin.display(description="Client", ordering="client__name")
    def client_name(self, obj: SessionTemplate) -> str:
        return obj.client.name if obj.client_id else "every client"

    @admin.display(description="First message")
    def opens_with(self, obj: SessionTemplate) -> str:
        text = obj.first_message.strip()
        return (text[:60] + "…") if len(text) > 60 else (text or "—")
