"""URL routes. Each app owns its own module; see docs/ARCHITECTURE.md for the full map."""

from django.contrib import admin
from django.urls import include, path

from sessions_app.forms import AdminSignInForm
from sessions_app.views import admin_sign_in, sign_in

admin.site.site_header = "Billable Sessions — staff"
admin.site.site_title = "Billable Sessions"
admin.site.index_title = "Sessions, clients, prices and invoices"
admin.site.login_form = AdminSignInForm  # throttled (sessions_app/throttle.py)

urlpatterns = [
    # Sign-in pages first: throttled versions of Django's and the admin's own.
    path("admin/login/", admin_sign_in, name="admin-login"),
    path("accounts/login/", sign_in, name="login"),
    path("admin/", admin.site.urls),
    path("accounts/", include("django.contrib.auth.urls")),
    path("api/ollama/", include("sessions_app.api_urls")),
    path("reports/", include("billing.urls")),
    path("", include("sessions_app.gateway_urls")),
    path("", include("sessions_app.urls")),
]
