"""Forms of the chat pages: start a session, filter the session list; and sign in, throttled."""

from __future__ import annotations

import datetime as dt
import logging

from asgiref.sync import async_to_sync
from django import forms
from django.conf import settings
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth.forms import AuthenticationForm
from django.core.cache import cache
from django.utils import timezone

from billing.models import Brand, ClientDomain
from providers.base import ModelInfo
from sessions_app.models import SessionStatus

logger = logging.getLogger(__name__)

MODELS_CACHE_KEY = "chat:available-models"
MODELS_CACHE_SECONDS = 30
MODELS_UNAVAILABLE = "The model list could not be loaded ({error}); type a model name such as ollama:llama3.2."
BRAND_NOT_OF_CLIENT = "That brand belongs to another client."
NO_CLIENTS = "No client is open to you yet; ask staff to add you to one."
DATES_REVERSED = "The end date is before the start date."


def load_models() -> tuple[list[ModelInfo], str]:
    """The router's live model list (cached briefly), and an error text if it could not be had."""
    from providers import router

    models = cache.get(MODELS_CACHE_KEY)
    if models is not None:
        return models, ""
    try:
        models = async_to_sync(router.available_models)()
    except Exception as exc:  # an unreachable Ollama must not break the page
        logger.warning("Listing models failed: %s", exc)
        return [], MODELS_UNAVAILABLE.format(error=str(exc)[:200] or type(exc).__name__)
    cache.set(MODELS_CACHE_KEY, models, MODELS_CACHE_SECONDS)
    return models, ""


def model_label(info: ModelInfo) -> str:
    return f"{info.name} · {'paid' if info.paid else 'free, local'}"


def model_choices(models: list[ModelInfo]) -> list:
    """Models grouped by provider, free ones first."""
    groups: dict[str, list] = {}
    for info in sorted(models, key=lambda m: (m.paid, m.provider, m.name)):
        groups.setdefault(info.provider.capitalize(), []).append((info.name, model_label(info)))
    return list(groups.items())


class NewSessionForm(forms.Form):
    client = forms.ChoiceField(label="Client", help_text="Time and cost are billed to this client.")
    model = forms.ChoiceField(label="Model")
    brand = forms.ChoiceField(label="Brand", required=False, help_text="The look of the chat page.")
    name = forms.CharField(
        label="Session name", max_length=200, required=False, help_text="Optional, e.g. the ticket or topic."
    )
    system_prompt = forms.CharField(
        label="System prompt",
        required=False,
        widget=forms.Textarea(attrs={"rows": 4}),
        help_text="Optional instructions the model keeps for the whole session.",
    )

    def __init__(self, *args, user, models: list[ModelInfo], models_error: str = "", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.models_error = models_error
        clients = list(ClientDomain.objects.open_to(user).active().order_by("name"))
        self.clients = {c.slug: c for c in clients}
        self.fields["client"].choices = [(c.slug, c.name) for c in clients]
        brands = list(
            Brand.objects.filter(client__in=clients).select_related("client").order_by("client__name", "name")
        )
        self.brands = {str(b.pk): b for b in brands}
        grouped: dict[str, list] = {}
        for brand in brands:
            grouped.setdefault(brand.client.name, []).append((str(brand.pk), brand.name))
        self.fields["brand"].choices = [("", "The client's default brand"), *grouped.items()]
        self.fields["system_prompt"].max_length = settings.CHAT_MAX_MESSAGE_CHARS
        if models:
            self.fields["model"].choices = model_choices(models)
            free = [m for m in models if not m.paid]
            if free and not self.is_bound:
                self.initial.setdefault("model", sorted(free, key=lambda m: m.name)[0].name)
        else:
            # No live list: accept a typed name; the session service validates it.
            self.fields["model"] = forms.CharField(
                label="Model", max_length=200, help_text=models_error or "provider:model, e.g. ollama:llama3.2"
            )
        if not clients:
            self.fields["client"].help_text = NO_CLIENTS

    def clean(self) -> dict:
        data = super().clean()
        brand_id = data.get("brand")
        client = self.clients.get(data.get("client", ""))
        if brand_id and client is not None and self.brands[brand_id].client_id != client.pk:
            self.add_error("brand", BRAND_NOT_OF_CLIENT)
        return data


class SessionFilterForm(forms.Form):
    """The session list's filters; every field optional, bad values are form errors."""

    client = forms.ChoiceField(required=False, label="Client")
    status = forms.ChoiceField(required=False, label="Status", choices=[("", "Any status"), *SessionStatus.choices])
    start = forms.DateField(required=False, label="From", widget=forms.DateInput(attrs={"type": "date"}))
    end = forms.DateField(required=False, label="To", widget=forms.DateInput(attrs={"type": "date"}))

    def __init__(self, *args, user, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        clients = ClientDomain.objects.open_to(user).order_by("name").values_list("slug", "name")
        self.fields["client"].choices = [("", "All clients"), *clients]

    def clean(self) -> dict:
        data = super().clean()
        if data.get("start") and data.get("end") and data["end"] < data["start"]:
            self.add_error("end", DATES_REVERSED)
        return data

    def period(self) -> tuple[dt.datetime | None, dt.datetime | None]:
        """Whole days in the viewer's time zone, as aware datetimes (the end day included)."""
        zone = timezone.get_current_timezone()
        start = self.cleaned_data.get("start")
        end = self.cleaned_data.get("end")
        return (
            dt.datetime.combine(start, dt.time.min, tzinfo=zone) if start else None,
            dt.datetime.combine(end + dt.timedelta(days=1), dt.time.min, tzinfo=zone) if end else None,
        )


class ThrottledSignInMixin:
    """Refuse a sign-in once too many have failed for the username or the address (`throttle`).

    Only a wrong username or password counts; while refused, even the right password is.
    """

    throttled_for = 0  # seconds to wait, when this attempt was refused

    def clean(self):
        from sessions_app import throttle

        username = self.cleaned_data.get("username") or ""
        if self.request is not None and (wait := throttle.signin_wait(self.request, username)):
            self.throttled_for = wait
            raise forms.ValidationError(throttle.signin_message(wait), code="throttled")
        try:
            return super().clean()
        except forms.ValidationError as exc:
            if self.request is not None and getattr(exc, "code", None) == "invalid_login":
                throttle.signin_failed(self.request, username)
            raise


class SignInForm(ThrottledSignInMixin, AuthenticationForm):
    """The consultants' sign-in form (`/accounts/login/`)."""


class AdminSignInForm(ThrottledSignInMixin, AdminAuthenticationForm):
    """The admin's sign-in form (`/admin/login/`)."""
