"""Forms of the chat pages: start a session, filter the session list; and sign in, throttled."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging

from asgiref.sync import async_to_sync
from django import forms
from django.conf import settings
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth import get_user_model
from django.contrib.auth.forms import AuthenticationForm
from django.core.cache import cache
from django.db.models import Q
from django.utils import timezone

from billing.models import Brand, ClientDomain, SessionTemplate
from providers import router
from providers.base import ModelInfo
from sessions_app import model_picker, throttle
from sessions_app.models import SessionInvitation, SessionStatus

logger = logging.getLogger(__name__)

MODELS_CACHE_KEY = "chat:available-models"
MODELS_CACHE_SECONDS = 30
MODELS_UNAVAILABLE = "The model list could not be loaded ({error}); type a model name such as ollama:llama3.2."
BRAND_NOT_OF_CLIENT = "That brand belongs to another client."
NO_CLIENTS = "No client is open to you yet; ask staff to add you to one."
DATES_REVERSED = "The end date is before the start date."
INVITE_CHOICES_LIMIT = 500
TEMPLATE_NOT_OF_CLIENT = "That template is for {client}; pick it with that client, or another template."


def models_cache_key() -> str:
    """The model list's cache key, by what the list depends on: where each provider answers and
    which have a key. Two deployments sharing one Redis (or a test's servers) never read each
    other's list."""
    config = (
        settings.OLLAMA_HOST,
        settings.OPENAI_BASE_URL,
        bool(settings.OPENAI_API_KEY),
        settings.ANTHROPIC_BASE_URL,
        bool(settings.ANTHROPIC_API_KEY),
    )
    return f"{MODELS_CACHE_KEY}:{hashlib.sha256(repr(config).encode()).hexdigest()[:16]}"


def load_models() -> tuple[list[ModelInfo], str]:
    """The router's live model list (cached briefly), and an error text if it could not be had."""

    key = models_cache_key()
    models = cache.get(key)
    if models is not None:
        return models, ""
    try:
        models = async_to_sync(router.available_models)()
    except Exception as exc:  # an unreachable Ollama must not break the page
        logger.warning("Listing models failed: %s", exc)
        return [], MODELS_UNAVAILABLE.format(error=str(exc)[:200] or type(exc).__name__)
    cache.set(key, models, MODELS_CACHE_SECONDS)
    return models, ""


def client_for_host(host: str) -> ClientDomain | None:
    """The active client whose hostname this is (northwind.localhost → Northwind)."""
    host = (host or "").split(":")[0].strip().lower()
    if not host:
        return None
    return ClientDomain.objects.filter(hostname=host, is_active=True).first()


def install_model_field(form: forms.Form, models: list[ModelInfo], models_error: str, preferred: str = "") -> None:
    """The model picker: grouped by provider, aliases folded, prices shown, the default preselected."""
    form.model_options = model_picker.model_options(models) if models else []
    if form.model_options:
        form.fields["model"] = forms.ChoiceField(
            label="Model",
            choices=model_picker.grouped_choices(form.model_options),
            help_text="Ollama models run locally for free; paid models show their price per million tokens.",
        )
        if not form.is_bound:
            form.initial["model"] = model_picker.default_choice(form.model_options, preferred)
    else:
        # No live list: accept a typed name; the session service validates it.
        form.fields["model"] = forms.CharField(
            label="Model", max_length=200, help_text=models_error or "provider:model, e.g. ollama:llama3.2"
        )
        if not form.is_bound:
            form.initial["model"] = preferred or settings.CHAT_MODEL


class NewSessionForm(forms.Form):
    template = forms.ChoiceField(
        label="Template",
        required=False,
        help_text="A preset for your clients: fills in the model, name, system prompt and a first message.",
    )
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

    def __init__(
        self, *args, user, models: list[ModelInfo], models_error: str = "", host_client=None, **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        self.models_error = models_error
        clients = list(ClientDomain.objects.open_to(user).active().order_by("name"))
        self.clients = {c.slug: c for c in clients}
        self.fields["client"].choices = [(c.slug, c.name) for c in clients]
        if not self.is_bound and not self.initial.get("client") and host_client is not None:
            if host_client.slug in self.clients:
                self.initial["client"] = host_client.slug
        brands = list(
            Brand.objects.filter(client__in=clients).select_related("client").order_by("client__name", "name")
        )
        self.brands = {str(b.pk): b for b in brands}
        grouped: dict[str, list] = {}
        for brand in brands:
            grouped.setdefault(brand.client.name, []).append((str(brand.pk), brand.name))
        self.fields["brand"].choices = [("", "The client's default brand"), *grouped.items()]
        self.fields["system_prompt"].max_length = settings.CHAT_MAX_MESSAGE_CHARS
        install_model_field(self, models, models_error)
        self.templates = {
            str(t.pk): t
            for t in SessionTemplate.objects.filter(is_active=True)
            .filter(Q(client__isnull=True) | Q(client__in=clients))
            .select_related("client")
            .order_by("client__name", "name")
        }
        if self.templates:
            by_client: dict[str, list] = {}
            for key, template in self.templates.items():
                group = template.client.name if template.client_id else "Any client"
                by_client.setdefault(group, []).append((key, template.name))
            self.fields["template"].choices = [("", "No template"), *by_client.items()]
        else:
            del self.fields["template"]
        if not clients:
            self.fields["client"].help_text = NO_CLIENTS

    def template_data(self) -> dict:
        """What the page's script fills in when a template is picked (embedded with json_script)."""
        options = self.model_options
        out = {}
        for key, template in self.templates.items():
            option = model_picker.option_for(options, template.default_model)
            out[key] = {
                "client": template.client.slug if template.client_id else "",
                "name": template.name,
                "system_prompt": template.system_prompt,
                "model": option.name if option else ("" if options else template.default_model),
                "first_message": template.first_message,
            }
        return out

    def clean(self) -> dict:
        data = super().clean()
        brand_id = data.get("brand")
        client = self.clients.get(data.get("client", ""))
        if brand_id and client is not None and self.brands[brand_id].client_id != client.pk:
            self.add_error("brand", BRAND_NOT_OF_CLIENT)
        template = self.templates.get(data.get("template") or "")
        if template is not None and template.client_id and client is not None and template.client_id != client.pk:
            self.add_error("template", TEMPLATE_NOT_OF_CLIENT.format(client=template.client.name))
        data["template_obj"] = template
        return data


class ContinueForm(forms.Form):
    """Carry an ended session on: the client picker starts on its old client, the model on its old model."""

    client = forms.ChoiceField(label="Client", help_text="The new session's time and cost are billed to it.")
    model = forms.ChoiceField(label="Model")
    name = forms.CharField(label="Name", max_length=200, required=False)

    def __init__(self, *args, user, session, models: list[ModelInfo], models_error: str = "", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        clients = list(ClientDomain.objects.open_to(user).active().order_by("name"))
        self.fields["client"].choices = [(c.slug, c.name) for c in clients]
        if not self.is_bound:
            if any(c.pk == session.domain_id for c in clients):
                self.initial["client"] = session.domain.slug
            self.initial["name"] = f"{session} (continued)"[:200]
        install_model_field(self, models, models_error, preferred=session.current_model)
        # Left out (the summary page's one-click form): the ended session's own model.
        self.fields["model"].required = False


class RenameForm(forms.Form):
    name = forms.CharField(label="Name", max_length=200, required=False)


class InviteForm(forms.Form):
    user = forms.ChoiceField(label="Consultant", help_text="Only consultants who may bill this client are listed.")

    def __init__(self, *args, session, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        User = get_user_model()
        invited = SessionInvitation.objects.live().filter(session=session).values("user_id")
        candidates = User.objects.filter(is_active=True).exclude(pk=session.user_id).exclude(pk__in=invited)
        members = session.domain.members.values("pk")
        if session.domain.members.exists():
            candidates = candidates.filter(Q(pk__in=members) | Q(is_staff=True))
        self.fields["user"].choices = [
            (u.get_username(), f"{u.get_full_name()} ({u.get_username()})" if u.get_full_name() else u.get_username())
            for u in candidates.order_by(User.USERNAME_FIELD)[:INVITE_CHOICES_LIMIT]
        ]


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
