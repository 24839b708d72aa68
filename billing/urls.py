"""Report routes, mounted under /reports/."""

from django.urls import path

from billing import desk_views, views

app_name = "billing"

urlpatterns = [
    path("", views.report, name="report"),
    path("mine/", views.my_report, name="mine"),
    path("monitoring/", views.monitoring, name="monitoring"),
    path("clients/<slug:slug>/", views.client_report, name="client"),
    path("clients/<slug:slug>/invoice/", views.client_invoice_draft, name="client_invoice_draft"),
    path("invoices/<uuid:pk>.csv", views.invoice_csv, name="invoice_csv"),
    # The billing desk (staff): invoices outside the admin.
    path("invoices/", desk_views.invoice_list, name="invoices"),
    path("invoices/draft/", desk_views.invoice_draft, name="invoice_draft"),
    path("invoices/<uuid:pk>/", desk_views.invoice_page, name="invoice"),
    path("invoices/<uuid:pk>/print/", desk_views.invoice_print, name="invoice_print"),
    path("invoices/<uuid:pk>.pdf", desk_views.invoice_pdf, name="invoice_pdf"),
    path("invoices/<uuid:pk>/issue/", desk_views.invoice_issue_view, name="invoice_issue"),
    path("invoices/<uuid:pk>/void/", desk_views.invoice_void_view, name="invoice_void"),
    path("invoices/<uuid:pk>/paid/", desk_views.invoice_paid, name="invoice_paid"),
    path("invoices/<uuid:pk>/refresh/", desk_views.invoice_refresh, name="invoice_refresh"),
    path("invoices/<uuid:pk>/delete/", desk_views.invoice_delete, name="invoice_delete"),
]
