"""URL routes. Each app owns its own module; see docs/ARCHITECTURE.md for the full map."""

from django.contrib import admin
from django.urls import include, path

admin.site.site_header = "Billable Sessions — staff"
admin.site.site_title = "Billable Sessions"
admin.site.index_title = "Sessions, clients, prices and invoices"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("accounts/", include("django.contrib.auth.urls")),
    path("api/ollama/", include("sessions_app.api_urls")),
    path("reports/", include("billing.urls")),
    path("", include("sessions_app.gateway_urls")),
    path("", include("sessions_app.urls")),
]
