"""Issue an API token for the REST API and the gateway; print it once, store only its hash."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from billing.models import ClientDomain
from sessions_app.models import ApiToken

UNKNOWN_USER = "No user named {username!r}."
INACTIVE_USER = "User {username!r} is inactive; activate them first."
UNKNOWN_CLIENT = "No client with slug {slug!r}. Known clients: {known}."
INACTIVE_CLIENT = "Client {slug!r} is inactive."
NOT_A_MEMBER = "User {username!r} may not bill client {slug!r}: it lists its members and they are not one."


class Command(BaseCommand):
    help = (
        "Create an API token for USER (optionally bound to a client). The token is printed once, "
        "alone on the last line; only its SHA-256 is stored."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("username", help="The user the token acts for.")
        parser.add_argument(
            "--client", metavar="SLUG", help="Bind the token to this client (gateway sessions bill it)."
        )
        parser.add_argument("--name", default="", help="A label to tell tokens apart, e.g. 'laptop CLI'.")

    def handle(self, *args, username: str, client: str | None = None, name: str = "", **options) -> None:
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(UNKNOWN_USER.format(username=username))
        if not user.is_active:
            raise CommandError(INACTIVE_USER.format(username=username))

        bound = None
        if client:
            bound = ClientDomain.objects.filter(slug=client).first()
            if bound is None:
                known = ", ".join(ClientDomain.objects.active().values_list("slug", flat=True)[:20]) or "none"
                raise CommandError(UNKNOWN_CLIENT.format(slug=client, known=known))
            if not bound.is_active:
                raise CommandError(INACTIVE_CLIENT.format(slug=client))
            if not ClientDomain.objects.open_to(user).filter(pk=bound.pk).exists():
                raise CommandError(NOT_A_MEMBER.format(username=username, slug=client))

        token, raw = ApiToken.issue(user=user, client=bound, name=name[:200])
        scope = f" for client {bound.slug}" if bound else ""
        self.stdout.write(
            f"API token {token.hint}… created for {user.get_username()}{scope}. "
            "It is shown once and stored only as a hash; keep it now:"
        )
        self.stdout.write(raw)
