"""Routes of the web pages."""

from django.urls import path

from sessions_app import conversation_views, toolkit_views, views

urlpatterns = [
    path("", views.home, name="home"),
    path("sessions/", views.session_list_page, name="session-list"),
    path("sessions/new/", views.session_new_page, name="session-new"),
    path("sessions/models.json", views.session_models_json, name="session-models"),
    path("sessions/<uuid:session_id>/", views.session_chat_page, name="session-chat"),
    path("sessions/<uuid:session_id>/billing.json", views.session_billing_json, name="session-billing"),
    path("sessions/<uuid:session_id>/summary/", views.session_summary_page, name="session-summary"),
    path("sessions/<uuid:session_id>/messages.json", views.session_messages_json, name="session-messages"),
    path("sessions/<uuid:session_id>/continue/", conversation_views.session_continue_page, name="session-continue"),
    path("sessions/<uuid:session_id>/branch/", conversation_views.session_branch_page, name="session-branch"),
    path("sessions/<uuid:session_id>/rename/", conversation_views.session_rename, name="session-rename"),
    path("sessions/<uuid:session_id>/hide/", conversation_views.session_hide, name="session-hide"),
    path("sessions/<uuid:session_id>/share/", conversation_views.session_share_page, name="session-share"),
    path(
        "sessions/<uuid:session_id>/share/<str:username>/revoke/",
        conversation_views.session_revoke_page,
        name="session-revoke",
    ),
    path("search/", toolkit_views.search_page, name="search"),
]
