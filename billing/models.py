"""Clients, brands, prices, the per-call usage ledger and invoices."""

from __future__ import annotations

import datetime as dt
import functools
import uuid
from decimal import Decimal
from typing import TypedDict

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models, transaction
from django.db.models import Q
from django.utils import timezone

from config import statements


class Digits(TypedDict):
    """The size of a DecimalField, spread into it (`models.DecimalField(**MONEY)`)."""

    max_digits: int
    decimal_places: int


MONEY: Digits = {"max_digits": 12, "decimal_places": 6}
RATE: Digits = {"max_digits": 14, "decimal_places": 6}
# The beginning of a client's terms when they were never changed: they cover all earlier work.
TERMS_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
HEX_COLOR = RegexValidator(r"^#[0-9a-fA-F]{6}$", "Enter a colour as #rrggbb, for example #1f6feb.")
LOGO_URL = RegexValidator(
    r"^(https?://[^\s\"'<>]+|/[^\s\"'<>]*)?$",
    "Enter an http(s) URL or a path starting with /.",
)


class Provider(models.TextChoices):
    OLLAMA = "ollama", "Ollama"
    OPENAI = "openai", "OpenAI"
    ANTHROPIC = "anthropic", "Anthropic"


class TokenSource(models.TextChoices):
    PROVIDER = "provider", "Reported by provider"
    ESTIMATED = "estimated", "Estimated"


class ClientDomainQuerySet(models.QuerySet):
    def active(self) -> ClientDomainQuerySet:
        return self.filter(is_active=True)

    def open_to(self, user) -> ClientDomainQuerySet:
        """Clients this user may bill: open ones (no members) and those listing them."""
        if user.is_staff:
            return self
        return self.filter(Q(members__isnull=True) | Q(members=user)).distinct()


class ClientDomain(models.Model):
    """A client: the party time and LLM cost are billed to."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=100, unique=True)
    hostname = models.CharField(
        max_length=253,
        unique=True,
        null=True,
        blank=True,
        help_text="Requests for this Host get this client's branding.",
    )
    hourly_rate = models.DecimalField(
        max_digits=10, decimal_places=2, default=Decimal("0"), validators=[MinValueValidator(0)]
    )
    currency = models.CharField(max_length=3, default="USD")
    llm_markup_percent = models.DecimalField(
        max_digits=6, decimal_places=2, default=Decimal("0"), validators=[MinValueValidator(0)]
    )
    billing_increment_minutes = models.PositiveSmallIntegerField(
        default=6, validators=[MinValueValidator(1)], help_text="Billable time is rounded up to this increment."
    )
    tax_rate_percent = models.DecimalField(
        max_digits=5,
        decimal_places=2,
        default=Decimal("0"),
        validators=[MinValueValidator(0), MaxValueValidator(100)],
        help_text="Applied to the invoice total (VAT, sales tax); 0 for none.",
    )
    payment_terms_days = models.PositiveSmallIntegerField(
        default=30, validators=[MaxValueValidator(365)], help_text="An issued invoice is due this many days later."
    )
    is_active = models.BooleanField(default=True)
    members = models.ManyToManyField(
        settings.AUTH_USER_MODEL,
        blank=True,
        related_name="client_memberships",
        help_text="Consultants who may bill this client. Empty: open to every consultant.",
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    objects = ClientDomainQuerySet.as_manager()

    class Meta:
        db_table = "domain_portfolio"
        ordering = ["name"]
        verbose_name = "client"
        constraints = [
            models.CheckConstraint(condition=Q(hourly_rate__gte=0), name="client_rate_non_negative"),
            models.CheckConstraint(condition=Q(llm_markup_percent__gte=0), name="client_markup_non_negative"),
            models.CheckConstraint(condition=Q(billing_increment_minutes__gte=1), name="client_increment_positive"),
            models.CheckConstraint(
                condition=Q(tax_rate_percent__gte=0, tax_rate_percent__lte=100), name="client_tax_rate_range"
            ),
        ]

    def __str__(self) -> str:
        return self.name

    def save(self, *args, **kwargs):
        # An empty hostname means "none"; store NULL so uniqueness ignores it.
        if not self.hostname:
            self.hostname = None
        else:
            self.hostname = self.hostname.strip().lower()
        super().save(*args, **kwargs)


class ClientTerms(models.Model):
    """A client's rate, markup and increment from `effective_from` on: dated, like prices.

    A session–client part is billed at the terms in force when its session ended (or now, for
    one still running), so a change never rewrites a period already worked. Saving a client
    whose rate, markup or increment changed records the change here, effective from then.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    client = models.ForeignKey(ClientDomain, on_delete=models.CASCADE, related_name="terms")
    effective_from = models.DateTimeField(default=timezone.now)
    hourly_rate = models.DecimalField(max_digits=10, decimal_places=2, validators=[MinValueValidator(0)])
    llm_markup_percent = models.DecimalField(max_digits=6, decimal_places=2, validators=[MinValueValidator(0)])
    billing_increment_minutes = models.PositiveSmallIntegerField(validators=[MinValueValidator(1)])
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        db_table = "client_terms"
        ordering = ["client", "-effective_from"]
        verbose_name = "client terms"
        verbose_name_plural = "client terms"
        constraints = [
            models.UniqueConstraint(fields=["client", "effective_from"], name="one_terms_per_instant"),
            models.CheckConstraint(condition=Q(hourly_rate__gte=0), name="terms_rate_non_negative"),
            models.CheckConstraint(condition=Q(llm_markup_percent__gte=0), name="terms_markup_non_negative"),
            models.CheckConstraint(condition=Q(billing_increment_minutes__gte=1), name="terms_increment_positive"),
        ]

    def __str__(self) -> str:
        return f"{self.client}: {self.hourly_rate}/h, {self.llm_markup_percent}%, {self.billing_increment_minutes} min from {self.effective_from:%Y-%m-%d %H:%M}"


class ExchangeRate(models.Model):
    """Units of `currency` per US dollar from `effective_from` on.

    Provider costs are stored in USD; a client's amounts are converted at the rate in force at
    each call's time. A rate an issued invoice used is never edited or deleted, and no rate may
    be added that would take over calls an issued invoice already billed.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    currency = models.CharField(max_length=3, help_text="ISO 4217 code, for example EUR.")
    usd_rate = models.DecimalField(**RATE, help_text="Units of the currency for one US dollar.")
    effective_from = models.DateTimeField(default=timezone.now)
    source = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        db_table = "exchange_rates"
        ordering = ["currency", "-effective_from"]
        constraints = [
            models.UniqueConstraint(fields=["currency", "effective_from"], name="one_rate_per_instant"),
            models.CheckConstraint(condition=Q(usd_rate__gt=0), name="rate_positive"),
            models.CheckConstraint(condition=~Q(currency="USD"), name="rate_not_for_usd"),
        ]
        indexes = [models.Index(fields=["currency", "effective_from"], name="rate_lookup_idx")]

    def __str__(self) -> str:
        return f"1 USD = {self.usd_rate} {self.currency} from {self.effective_from:%Y-%m-%d %H:%M}"


class Brand(models.Model):
    FONTS = [
        ("system", "System UI"),
        ("serif", "Serif (Georgia)"),
        ("humanist", "Humanist (Seravek, Gill Sans)"),
        ("geometric", "Geometric (Avenir, Montserrat)"),
        ("mono", "Monospace"),
    ]
    FONT_STACKS = {
        "system": 'system-ui, -apple-system, "Segoe UI", Roboto, sans-serif',
        "serif": 'Georgia, Cambria, "Times New Roman", serif',
        "humanist": 'Seravek, "Gill Sans Nova", Ubuntu, Calibri, sans-serif',
        "geometric": 'Avenir, Montserrat, Corbel, "URW Gothic", sans-serif',
        "mono": 'ui-monospace, "Cascadia Code", Menlo, Consolas, monospace',
    }

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    client = models.ForeignKey(ClientDomain, on_delete=models.CASCADE, related_name="brands")
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="brands"
    )
    name = models.CharField(max_length=200)
    logo = models.CharField(max_length=500, blank=True, validators=[LOGO_URL], help_text="URL or /static/ path.")
    primary_color = models.CharField(max_length=7, default="#1f6feb", validators=[HEX_COLOR])
    accent_color = models.CharField(max_length=7, default="#8250df", validators=[HEX_COLOR])
    background_color = models.CharField(max_length=7, default="#ffffff", validators=[HEX_COLOR])
    font = models.CharField(max_length=20, choices=FONTS, default="system")
    welcome_text = models.TextField(blank=True)
    is_default = models.BooleanField(default=False, help_text="The brand used for this client unless one is chosen.")
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        db_table = "user_brands"
        ordering = ["client__name", "name"]
        constraints = [
            models.UniqueConstraint(
                fields=["client"], condition=Q(is_default=True), name="one_default_brand_per_client"
            ),
            models.CheckConstraint(condition=Q(primary_color__regex=r"^#[0-9a-fA-F]{6}$"), name="brand_primary_hex"),
            models.CheckConstraint(condition=Q(accent_color__regex=r"^#[0-9a-fA-F]{6}$"), name="brand_accent_hex"),
            models.CheckConstraint(
                condition=Q(background_color__regex=r"^#[0-9a-fA-F]{6}$"), name="brand_background_hex"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.client})"

    @property
    def font_stack(self) -> str:
        return self.FONT_STACKS.get(self.font, self.FONT_STACKS["system"])


CATALOGUE_KEY = "catalogue"  # prices and aliases (`billing.catalogue`)
BUDGETS_KEY = "budgets"  # budgets, clients, terms and exchange rates (`billing.budgets`)


class CatalogueVersion(models.Model):
    """One row per cache every process keeps (`key`): a new random `version` each time what it
    caches is written, in the same transaction, so every process sees at once that its copy
    is stale (`new_version`)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    key = models.CharField(max_length=20, unique=True, default=CATALOGUE_KEY)
    version = models.UUIDField(default=uuid.uuid4)

    class Meta:
        db_table = "model_catalogue_version"

    def __str__(self) -> str:
        return f"catalogue version {self.version}"


def new_version(key: str) -> None:
    """Inside the writer's transaction: give the cache `key` a new version (creating its row)."""
    new = uuid.uuid4()
    if not CatalogueVersion.objects.filter(key=key).update(version=new):
        CatalogueVersion.objects.update_or_create(key=key, defaults={"version": new})


def stored_version(key: str) -> object:
    """The cache `key`'s version as stored now (one prepared statement; None: no row)."""
    row = statements.select_row(CatalogueVersion, ("version",), {"key": key})
    return row["version"] if row is not None else None


@functools.cache
def version_column(key: str) -> statements.Scalar:
    """The cache `key`'s version as a column of another statement (`statements.select_row(also=...)`)."""
    return statements.Scalar(CatalogueVersion, "version", {"key": key})


def catalogue_changed() -> None:
    new_version(CATALOGUE_KEY)


class CatalogueQuerySet(models.QuerySet):
    """Bulk writes that skip the model signals still move the catalogue's version."""

    def update(self, **kwargs):
        with transaction.atomic(using=self.db):
            rows = super().update(**kwargs)
            catalogue_changed()
        return rows

    def bulk_create(self, objs, *args, **kwargs):
        with transaction.atomic(using=self.db):
            created = super().bulk_create(objs, *args, **kwargs)
            catalogue_changed()
        return created

    def bulk_update(self, objs, *args, **kwargs):
        with transaction.atomic(using=self.db):
            rows = super().bulk_update(objs, *args, **kwargs)
            catalogue_changed()
        return rows


class ModelPriceQuerySet(CatalogueQuerySet):
    def in_force(self, at) -> ModelPriceQuerySet:
        return self.filter(effective_from__lte=at)


class ModelPrice(models.Model):
    """List price of a model, per million tokens, from `effective_from` on."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    provider = models.CharField(max_length=20, choices=Provider.choices)
    model = models.CharField(max_length=200, help_text="Bare model id; also matches ids it prefixes.")
    input_per_mtok = models.DecimalField(**MONEY, validators=[MinValueValidator(0)])
    output_per_mtok = models.DecimalField(**MONEY, validators=[MinValueValidator(0)])
    effective_from = models.DateTimeField(default=timezone.now)
    context_window = models.PositiveIntegerField(null=True, blank=True, help_text="Max input tokens, if known.")
    source = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    objects = ModelPriceQuerySet.as_manager()

    class Meta:
        db_table = "model_prices"
        ordering = ["provider", "model", "-effective_from"]
        constraints = [
            models.UniqueConstraint(fields=["provider", "model", "effective_from"], name="one_price_per_instant"),
            models.CheckConstraint(condition=Q(input_per_mtok__gte=0), name="price_input_non_negative"),
            models.CheckConstraint(condition=Q(output_per_mtok__gte=0), name="price_output_non_negative"),
        ]
        indexes = [models.Index(fields=["provider", "model", "effective_from"], name="price_lookup_idx")]

    def __str__(self) -> str:
        return f"{self.provider}:{self.model} {self.input_per_mtok}/{self.output_per_mtok} from {self.effective_from:%Y-%m-%d}"


class ModelAlias(models.Model):
    """A friendly name (`claude-sonnet-4`) for the provider's current id (`claude-sonnet-4-20250514`)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    provider = models.CharField(max_length=20, choices=Provider.choices)
    alias = models.CharField(max_length=200)
    target = models.CharField(max_length=200)

    objects = CatalogueQuerySet.as_manager()

    class Meta:
        db_table = "model_aliases"
        ordering = ["provider", "alias"]
        verbose_name_plural = "model aliases"
        constraints = [models.UniqueConstraint(fields=["provider", "alias"], name="unique_alias_per_provider")]

    def __str__(self) -> str:
        return f"{self.provider}:{self.alias} → {self.target}"


class UsageStatus(models.TextChoices):
    OK = "ok", "OK"
    ERROR = "error", "Error"
    CANCELLED = "cancelled", "Cancelled"


class LLMUsageQuerySet(models.QuerySet):
    def for_period(self, start, end) -> LLMUsageQuerySet:
        return self.filter(created_at__gte=start, created_at__lt=end)

    def unpriced(self) -> LLMUsageQuerySet:
        return self.filter(cost__isnull=True)


class LLMUsage(models.Model):
    """One row per provider call: the ledger cost attribution is reconciled against."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="llm_usage")
    session = models.ForeignKey(
        "sessions_app.ChatSession", on_delete=models.PROTECT, null=True, blank=True, related_name="usage"
    )
    message = models.ForeignKey(
        "sessions_app.SessionMessage", on_delete=models.SET_NULL, null=True, blank=True, related_name="usage"
    )
    client = models.ForeignKey(ClientDomain, on_delete=models.PROTECT, null=True, blank=True, related_name="usage")
    provider = models.CharField(max_length=20, choices=Provider.choices)
    model = models.CharField(max_length=200, help_text="The model as requested.")
    provider_model = models.CharField(max_length=200, blank=True, help_text="The id the provider reported.")
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    token_source = models.CharField(max_length=10, choices=TokenSource.choices, default=TokenSource.PROVIDER)
    cost = models.DecimalField(**MONEY, null=True, blank=True, help_text="Empty: no price known (a problem to fix).")
    carried_tokens = models.PositiveIntegerField(default=0, help_text="Input tokens that were carried-over context.")
    time_to_first_token_ms = models.PositiveIntegerField(null=True, blank=True)
    duration_ms = models.PositiveIntegerField(default=0)
    status = models.CharField(max_length=10, choices=UsageStatus.choices, default=UsageStatus.OK)
    error_text = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    objects = LLMUsageQuerySet.as_manager()

    class Meta:
        db_table = "user_llm_usage"
        ordering = ["-created_at"]
        verbose_name = "LLM usage"
        verbose_name_plural = "LLM usage"
        constraints = [
            models.CheckConstraint(condition=Q(prompt_tokens__gte=0), name="usage_prompt_non_negative"),
            models.CheckConstraint(condition=Q(completion_tokens__gte=0), name="usage_completion_non_negative"),
            models.CheckConstraint(condition=Q(cost__gte=0) | Q(cost__isnull=True), name="usage_cost_non_negative"),
        ]
        indexes = [
            models.Index(fields=["client", "created_at"], name="usage_client_time_idx"),
            models.Index(fields=["user", "created_at"], name="usage_user_time_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.provider}:{self.model} {self.prompt_tokens}+{self.completion_tokens} @ {self.created_at:%Y-%m-%d %H:%M}"

    @property
    def price_missing(self) -> bool:
        return self.cost is None


class InvoiceStatus(models.TextChoices):
    DRAFT = "draft", "Draft"
    ISSUED = "issued", "Issued"
    VOID = "void", "Void"


class InvoiceKind(models.TextChoices):
    INVOICE = "invoice", "Invoice"
    CREDIT_NOTE = "credit_note", "Credit note"


class Invoice(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    client = models.ForeignKey(ClientDomain, on_delete=models.PROTECT, related_name="invoices")
    period_start = models.DateField()
    period_end = models.DateField(help_text="Inclusive.")
    number = models.CharField(max_length=40, unique=True, null=True, blank=True, help_text="Assigned on issue.")
    status = models.CharField(max_length=10, choices=InvoiceStatus.choices, default=InvoiceStatus.DRAFT)
    kind = models.CharField(max_length=12, choices=InvoiceKind.choices, default=InvoiceKind.INVOICE)
    credit_for = models.ForeignKey(
        "self",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="credit_notes",
        help_text="The voided invoice this credit note cancels.",
    )
    currency = models.CharField(max_length=3, default="USD")
    time_total = models.DecimalField(max_digits=12, decimal_places=2, default=Decimal("0"))
    llm_total = models.DecimalField(max_digits=12, decimal_places=2, default=Decimal("0"))
    subtotal = models.DecimalField(max_digits=12, decimal_places=2, default=Decimal("0"))
    tax_rate_percent = models.DecimalField(max_digits=5, decimal_places=2, default=Decimal("0"))
    tax_total = models.DecimalField(max_digits=12, decimal_places=2, default=Decimal("0"))
    total = models.DecimalField(max_digits=12, decimal_places=2, default=Decimal("0"))
    payment_terms_days = models.PositiveSmallIntegerField(default=30)
    due_date = models.DateField(null=True, blank=True, help_text="Set on issue from the client's payment terms.")
    paid_at = models.DateTimeField(null=True, blank=True)
    voided_at = models.DateTimeField(null=True, blank=True)
    void_reason = models.CharField(max_length=500, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    issued_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "invoices"
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(condition=Q(period_end__gte=models.F("period_start")), name="invoice_period_order"),
            models.CheckConstraint(condition=Q(total__gte=0), name="invoice_total_non_negative"),
            models.CheckConstraint(
                condition=Q(kind="invoice", credit_for__isnull=True) | Q(kind="credit_note", credit_for__isnull=False),
                name="credit_note_references_invoice",
            ),
        ]
        indexes = [models.Index(fields=["client", "status"], name="invoice_client_status_idx")]

    def __str__(self) -> str:
        if self.number:
            return self.number
        return f"Draft {self.client} {self.period_start}–{self.period_end}"

    @property
    def is_credit_note(self) -> bool:
        return self.kind == InvoiceKind.CREDIT_NOTE

    @property
    def sign(self) -> int:
        """Credit notes are stored positive and shown negative."""
        return -1 if self.is_credit_note else 1

    def is_overdue(self, today: dt.date) -> bool:
        return (
            self.status == InvoiceStatus.ISSUED
            and not self.is_credit_note
            and self.paid_at is None
            and self.due_date is not None
            and self.due_date < today
        )

    @property
    def title(self) -> str:
        return "Credit note" if self.is_credit_note else "Invoice"


class InvoiceSequence(models.Model):
    """The last number given out in a year: one gapless sequence per year for invoices and credit notes.

    The issuing transaction locks the year's row, takes the next number and commits it with the
    issued invoice, so a rolled-back issue gives its number back and two issues never share one.
    """

    year = models.PositiveSmallIntegerField(primary_key=True)
    last = models.PositiveIntegerField(default=0)

    class Meta:
        db_table = "invoice_sequences"

    def __str__(self) -> str:
        return f"{self.year}: {self.last}"


class InvoiceLineQuerySet(models.QuerySet):
    def billed(self) -> InvoiceLineQuerySet:
        """Lines that bill a part: on an issued invoice (not a credit note, not a voided one), not pending."""
        return self.filter(
            invoice__status=InvoiceStatus.ISSUED,
            invoice__kind=InvoiceKind.INVOICE,
            kind__in=InvoiceLine.BILLED_KINDS,
        )


class InvoiceLine(models.Model):
    class Kind(models.TextChoices):
        TIME = "time", "Billable time"
        LLM = "llm", "LLM cost"
        MARKUP = "markup", "LLM markup"
        PENDING = "pending", "Still running (not billed here)"

    BILLED_KINDS = ("time", "llm", "markup")

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    invoice = models.ForeignKey(Invoice, on_delete=models.CASCADE, related_name="lines")
    position = models.PositiveIntegerField(default=0)
    kind = models.CharField(max_length=10, choices=Kind.choices)
    description = models.CharField(max_length=500)
    session = models.ForeignKey(
        "sessions_app.ChatSession", on_delete=models.PROTECT, null=True, blank=True, related_name="invoice_lines"
    )
    # Hours to four decimals, a USD cost to six, a markup's base to two: what is printed is stored.
    quantity = models.DecimalField(max_digits=18, decimal_places=6, default=Decimal("0"))
    unit = models.CharField(max_length=20, default="hours")
    unit_price = models.DecimalField(**MONEY, default=Decimal("0"))
    amount = models.DecimalField(max_digits=12, decimal_places=2, default=Decimal("0"))
    client = models.ForeignKey(
        ClientDomain, on_delete=models.PROTECT, null=True, blank=True, related_name="+", help_text="The part billed."
    )
    usd_cost = models.DecimalField(
        max_digits=18, decimal_places=6, null=True, blank=True, help_text="LLM lines: the provider cost in USD."
    )
    exchange_rate = models.DecimalField(
        **RATE, null=True, blank=True, help_text="LLM lines: units of the invoice currency per USD used."
    )
    exchange_rate_from = models.DateTimeField(null=True, blank=True, help_text="When the rate used took effect.")
    calls = models.PositiveIntegerField(default=0)
    unpriced_calls = models.PositiveIntegerField(default=0)
    unconverted_calls = models.PositiveIntegerField(default=0, help_text="Calls with no exchange rate in force.")
    first_call_at = models.DateTimeField(null=True, blank=True)
    last_call_at = models.DateTimeField(null=True, blank=True)
    part_ended_at = models.DateTimeField(null=True, blank=True, help_text="When the billed session ended.")

    objects = InvoiceLineQuerySet.as_manager()

    class Meta:
        db_table = "invoice_lines"
        ordering = ["invoice", "position"]
        constraints = [
            models.CheckConstraint(condition=Q(quantity__gte=0), name="line_quantity_non_negative"),
            models.CheckConstraint(condition=Q(amount__gte=0), name="line_amount_non_negative"),
        ]
        indexes = [models.Index(fields=["session", "client"], name="line_session_client_idx")]

    def __str__(self) -> str:
        return self.description


class SessionMessageTotals(models.Model):
    """Billable-message totals per (session, client), kept by PostgreSQL for the heavy reports.

    A trigger on `ollama_session_messages` (migration billing 0003, PostgreSQL only) updates
    the row in the same transaction as every insert, update or delete of a billable message
    (not a branch copy, not an import), so the totals are always exactly those of the
    messages. `first_at`/`last_at` bound the messages' timestamps; they only widen (a moved
    or deleted message leaves them as they were), which is all the reports need: a pair whose
    bounds lie inside a period is taken from here, any other pair is summed from its messages.
    On SQLite the table stays empty and the reports use the Python path.
    """

    # The trigger gives each new row its id with PostgreSQL's gen_random_uuid().
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    session = models.ForeignKey("sessions_app.ChatSession", on_delete=models.CASCADE, related_name="+")
    domain = models.ForeignKey(ClientDomain, on_delete=models.CASCADE, related_name="+")
    messages = models.IntegerField(default=0)
    tokens = models.BigIntegerField(default=0)
    cost = models.DecimalField(max_digits=18, decimal_places=6, default=Decimal("0"))
    unpriced = models.IntegerField(default=0)
    first_at = models.DateTimeField()
    last_at = models.DateTimeField()

    class Meta:
        db_table = "session_message_totals"
        constraints = [
            models.UniqueConstraint(fields=["session", "domain"], name="one_message_total_per_session_client"),
        ]
        indexes = [models.Index(fields=["first_at"], name="message_totals_first_idx")]

    def __str__(self) -> str:
        return f"{self.session_id} / {self.domain_id}: {self.messages} messages"


class SessionTemplateQuerySet(models.QuerySet):
    def for_client(self, client) -> SessionTemplateQuerySet:
        """Active presets a session on `client` may start from: the client's own and the shared ones."""
        return self.filter(Q(client=client) | Q(client__isnull=True), is_active=True)


class SessionTemplate(models.Model):
    """A conversation preset: what a session starts with when a consultant picks it."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    client = models.ForeignKey(
        ClientDomain,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="session_templates",
        help_text="Empty: offered for every client.",
    )
    name = models.CharField(max_length=200)
    system_prompt = models.TextField(blank=True)
    default_model = models.CharField(
        max_length=200, blank=True, help_text="provider:model, e.g. ollama:llama3.2. Empty: the consultant picks."
    )
    first_message = models.TextField(
        blank=True, help_text="Optional: put in the message box of the new session, ready to send or edit."
    )
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    objects = SessionTemplateQuerySet.as_manager()

    class Meta:
        db_table = "session_templates"
        ordering = ["name"]
        verbose_name = "conversation template"
        constraints = [
            models.UniqueConstraint(fields=["client", "name"], name="unique_template_name_per_client"),
            models.UniqueConstraint(
                fields=["name"], condition=Q(client__isnull=True), name="unique_shared_template_name"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.client})" if self.client_id else self.name


class ClientBudgetQuerySet(models.QuerySet):
    def in_force(self, month: dt.date) -> ClientBudgetQuerySet:
        """Budgets carry over: the one for a month is the newest set for it or an earlier month."""
        return self.filter(month__lte=month).order_by("-month")


class ClientBudget(models.Model):
    """A monthly limit on a client's paid-model cost (and optionally hours), in the client's currency.

    It holds from `month` on until a later month's budget replaces it. At 80 % consultants and
    staff are warned; at 100 % of the cost limit paid models are refused for the client in
    every front end; Ollama stays usable.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    client = models.ForeignKey(ClientDomain, on_delete=models.CASCADE, related_name="budgets")
    month = models.DateField(help_text="The first day of the first month it applies to.")
    llm_limit = models.DecimalField(
        max_digits=12,
        decimal_places=2,
        validators=[MinValueValidator(0)],
        help_text="Paid-model cost per month (with markup, converted), in the client's currency.",
    )
    hours_limit = models.DecimalField(
        max_digits=8,
        decimal_places=2,
        null=True,
        blank=True,
        validators=[MinValueValidator(0)],
        help_text="Optional: billable hours per month (a warning, never a refusal).",
    )
    updated_at = models.DateTimeField(auto_now=True)
    updated_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )

    objects = ClientBudgetQuerySet.as_manager()

    class Meta:
        db_table = "client_budgets"
        ordering = ["client", "-month"]
        constraints = [
            models.UniqueConstraint(fields=["client", "month"], name="one_budget_per_client_month"),
            models.CheckConstraint(condition=Q(llm_limit__gte=0), name="budget_limit_non_negative"),
            models.CheckConstraint(
                condition=Q(hours_limit__isnull=True) | Q(hours_limit__gte=0), name="budget_hours_non_negative"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.client} from {self.month:%Y-%m}: {self.llm_limit} {self.client.currency}"


class BudgetAlert(models.Model):
    """A budget warning that went out: one per client, month, measure and threshold, never more."""

    class Measure(models.TextChoices):
        COST = "cost", "Paid-model cost"
        HOURS = "hours", "Hours"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    client = models.ForeignKey(ClientDomain, on_delete=models.CASCADE, related_name="budget_alerts")
    month = models.DateField()
    measure = models.CharField(max_length=10, choices=Measure.choices)
    threshold = models.PositiveSmallIntegerField(help_text="Percent of the limit: 80 or 100.")
    used = models.DecimalField(max_digits=14, decimal_places=2)
    limit = models.DecimalField(max_digits=14, decimal_places=2)
    recipients = models.TextField(blank=True)
    sent_at = models.DateTimeField(default=timezone.now)

    class Meta:
        db_table = "budget_alerts"
        ordering = ["-sent_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["client", "month", "measure", "threshold"], name="one_alert_per_threshold_and_month"
            )
        ]

    def __str__(self) -> str:
        return f"{self.client} {self.month:%Y-%m} {self.measure} {self.threshold}%"


class ArchivedMessageCost(models.Model):
    """What billing needs of an archived message: kept in the hot database when its text is archived.

    Archiving moves a session's messages into a compressed blob; their billed figures stay here,
    so reports and invoices never lose them. Restoring the session deletes these rows again.
    """

    id = models.BigAutoField(primary_key=True)
    session = models.ForeignKey("sessions_app.ChatSession", on_delete=models.CASCADE, related_name="+")
    domain = models.ForeignKey(ClientDomain, on_delete=models.PROTECT, related_name="+")
    seq = models.PositiveIntegerField()
    role = models.CharField(max_length=10)
    timestamp = models.DateTimeField()
    model = models.CharField(max_length=200, blank=True)
    tokens = models.PositiveIntegerField(default=0)
    cost_usd = models.DecimalField(**MONEY, null=True, blank=True)

    class Meta:
        db_table = "archived_message_costs"
        constraints = [models.UniqueConstraint(fields=["session", "seq"], name="one_archived_cost_per_message")]

    def __str__(self) -> str:
        return f"{self.session_id} #{self.seq}"
