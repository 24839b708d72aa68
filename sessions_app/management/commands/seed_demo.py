"""Load the demo portfolio: 12 clients with brands, a consultant and a staff login, and a
few ended demo sessions (sessions_app/demo.py) so the home page and reports have content.

Idempotent: running it again updates the same rows (matched by slug and username) and
creates nothing twice. Demo passwords are set to the documented ones when they differ
(an unchanged one is left alone: setting it again would sign everyone out on every
`make run`), which is why it refuses to run with DEBUG off unless told `--force`.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command, get_commands
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from billing.models import Brand, ClientDomain
from sessions_app.demo import DEMO_SESSIONS, demo_sessions_create
from sessions_app.models import ChatSession

REFUSE_IN_PRODUCTION = (
    "seed_demo creates logins with published passwords; DEBUG is off, so this looks like a "
    "real deployment. Run it with --force if you really want demo data here."
)
NO_LOAD_PRICES = (
    "Prices not loaded: the load_prices command is not available yet. "
    "Paid models will show their cost as unknown until prices are loaded."
)


@dataclass(frozen=True)
class DemoClient:
    slug: str
    name: str
    hourly_rate: str
    increment: int
    markup: str
    primary: str
    accent: str
    background: str
    font: str
    welcome: str
    members_only: bool = False


# fmt: off
# slug, name, hourly rate, increment (minutes), LLM markup %, primary, accent, background, font, welcome
DEMO_CLIENTS: tuple[DemoClient, ...] = (
    DemoClient(
        "acme", "Acme Corporation", "185.00", 6, "15.00", "#0b7285", "#f08c00", "#f8fafb", "system",
        "Welcome to the Acme workspace. Keep supply-chain data out of paid models unless the engagement allows it.",
    ),
    DemoClient(
        "northwind", "Northwind Traders", "160.00", 15, "10.00", "#2b8a3e", "#e8590c", "#f7fbf7", "humanist",
        "Northwind merchandising and pricing analytics. Time is billed in quarter hours.",
    ),
    DemoClient(
        "contoso", "Contoso Pharmaceuticals", "240.00", 6, "20.00", "#1864ab", "#0ca678", "#f5f9fd", "serif",
        "Contoso regulatory writing. Do not paste patient-identifiable data into any session.",
        members_only=True,
    ),
    DemoClient(
        "fabrikam", "Fabrikam Logistics", "150.00", 15, "10.00", "#5f3dc4", "#fab005", "#f8f7fd", "geometric",
        "Fabrikam route optimisation and warehouse automation.",
    ),
    DemoClient(
        "woodgrove", "Woodgrove Bank", "275.00", 6, "25.00", "#364fc7", "#c2255c", "#f6f7fc", "serif",
        "Woodgrove Bank model-risk review. Every session is reviewed by compliance before invoicing.",
        members_only=True,
    ),
    DemoClient(
        "tailspin", "Tailspin Toys", "125.00", 15, "0.00", "#e03131", "#1c7ed6", "#fffafa", "geometric",
        "Tailspin product copy and catalogue work.",
    ),
    DemoClient(
        "litware", "Litware Legal", "260.00", 6, "15.00", "#343a40", "#c92a2a", "#fafafa", "serif",
        "Litware contract review. Summaries only; the client's own counsel signs off.",
    ),
    DemoClient(
        "adventure-works", "Adventure Works Cycles", "140.00", 15, "10.00", "#d9480f", "#2f9e44", "#fffaf5", "humanist",
        "Adventure Works e-commerce and customer support tooling.",
    ),
    DemoClient(
        "proseware", "Proseware Analytics", "195.00", 6, "12.50", "#087f5b", "#7048e8", "#f5fbf9", "mono",
        "Proseware data-platform engineering. Paste schemas, not production rows.",
    ),
    DemoClient(
        "alpine-ski", "Alpine Ski House", "110.00", 15, "0.00", "#1971c2", "#e64980", "#f7fbff", "humanist",
        "Alpine Ski House booking system and seasonal marketing.",
    ),
    DemoClient(
        "coho-winery", "Coho Winery", "135.00", 15, "5.00", "#862e9c", "#c29b00", "#fcf8fd", "serif",
        "Coho Winery export compliance and label copy.",
    ),
    DemoClient(
        "fourth-coffee", "Fourth Coffee", "120.00", 6, "10.00", "#6d4c41", "#2b8a3e", "#fbf8f6", "system",
        "Fourth Coffee loyalty programme and store analytics.",
    ),
)
# fmt: on


@dataclass(frozen=True)
class DemoLogin:
    username: str
    password: str
    first_name: str
    last_name: str
    is_staff: bool


CONSULTANT = DemoLogin("consultant", "demo-consultant-pass", "Casey", "Morgan", is_staff=False)
STAFF = DemoLogin("staff", "demo-staff-pass", "Sam", "Rivera", is_staff=True)


class Command(BaseCommand):
    help = "Load 12 demo clients with brands, a demo consultant and a staff user (idempotent); print their logins."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--force", action="store_true", help="Run even though DEBUG is off.")
        parser.add_argument("--no-prices", action="store_true", help="Do not run load_prices.")

    def handle(self, *args, force: bool = False, no_prices: bool = False, **options) -> None:
        if not settings.DEBUG and not force:
            raise CommandError(REFUSE_IN_PRODUCTION)

        with transaction.atomic():
            consultant = self._login(CONSULTANT)
            staff = self._login(STAFF)
            created = 0
            for demo in DEMO_CLIENTS:
                created += self._client(demo, owner=staff, consultant=consultant)

        self.stdout.write(
            f"Demo data: {len(DEMO_CLIENTS)} clients ({created} new), each with a default brand; "
            f"hostnames like {DEMO_CLIENTS[0].slug}.localhost wear that client's brand."
        )
        if not no_prices:
            self._load_prices()
        made = demo_sessions_create(user=consultant)
        total = ChatSession.objects.filter(user=consultant, name__in=[d.name for d in DEMO_SESSIONS]).count()
        self.stdout.write(f"Demo sessions: {total} ended sessions for {consultant.username} ({made} new).")
        self.stdout.write(
            f"Demo logins (sign in at /accounts/login/): {CONSULTANT.username} is a consultant, "
            f"{STAFF.username} is staff with the admin at /admin/."
        )
        for login in (CONSULTANT, STAFF):
            self.stdout.write(f"login: {login.username} / {login.password}")

    def _login(self, demo: DemoLogin):
        user, _ = get_user_model().objects.get_or_create(username=demo.username)
        user.first_name = demo.first_name
        user.last_name = demo.last_name
        user.email = f"{demo.username}@example.com"
        user.is_staff = demo.is_staff
        user.is_superuser = demo.is_staff
        user.is_active = True
        # A new hash would change the session auth hash and sign every browser out.
        if not user.check_password(demo.password):
            user.set_password(demo.password)
        user.save()
        return user

    def _client(self, demo: DemoClient, *, owner, consultant) -> int:
        client, created = ClientDomain.objects.update_or_create(
            slug=demo.slug,
            defaults={
                "name": demo.name,
                "hostname": f"{demo.slug}.localhost",
                "hourly_rate": Decimal(demo.hourly_rate),
                "currency": "USD",
                "llm_markup_percent": Decimal(demo.markup),
                "billing_increment_minutes": demo.increment,
                "is_active": True,
            },
        )
        if demo.members_only:
            client.members.add(consultant)
        brand = Brand.objects.filter(client=client, name=demo.name).first() or Brand(client=client, name=demo.name)
        other_default = client.brands.filter(is_default=True).exclude(pk=brand.pk).exists()
        brand.owner = owner
        brand.primary_color = demo.primary
        brand.accent_color = demo.accent
        brand.background_color = demo.background
        brand.font = demo.font
        brand.welcome_text = demo.welcome
        # One default per client; if staff made another brand the default, leave it so.
        brand.is_default = not other_default
        brand.full_clean()
        brand.save()
        return int(created)

    def _load_prices(self) -> None:
        if "load_prices" not in get_commands():
            self.stderr.write(NO_LOAD_PRICES)
            return
        call_command("load_prices", stdout=self.stdout, stderr=self.stderr)
