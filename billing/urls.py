"""Report routes, mounted under /reports/."""

from django.urls import path

from billing import views

app_name = "billing"

urlpatterns = [
    path("", views.report, name="report"),
    path("mine/", views.my_report, name="mine"),
    path("monitoring/", views.monitoring, name="monitoring"),
    path("clients/<slug:slug>/", views.client_report, name="client"),
    path("clients/<slug:slug>/invoice/", views.client_invoice_draft, name="client_invoice_draft"),
    path("invoices/<uuid:pk>.csv", views.invoice_csv, name="invoice_csv"),
]
