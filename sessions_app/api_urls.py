"""REST routes under /api/ollama/ (docs/DESIGN.md "Interfaces")."""

from django.urls import path, re_path

from sessions_app import api, api_conversation, toolkit_views

app_name = "api"

urlpatterns = [
    path("session/start", api.session_start, name="session-start"),
    path("session/<str:session_id>/chat", api.session_chat, name="session-chat"),
    path("session/<str:session_id>/switch", api.session_switch, name="session-switch"),
    path("session/<str:session_id>/end", api.session_end, name="session-end"),
    path("session/<str:session_id>/summary", api.session_summary, name="session-summary"),
    path("sessions", api.session_list, name="session-list"),
    path("signing-key", api.signing_key, name="signing-key"),
    path("openapi.json", api.openapi, name="openapi"),
    path("session/import", toolkit_views.session_import_api, name="session-import"),
    path("session/<str:session_id>/export", toolkit_views.session_export_api, name="session-export"),
    path("search", toolkit_views.search_api, name="search"),
    path("session/<str:session_id>/branch", api_conversation.session_branch, name="session-branch"),
    path("session/<str:session_id>/continue", api_conversation.session_continue, name="session-continue"),
    path("session/<str:session_id>/edit", api_conversation.session_edit, name="session-edit"),
    path("session/<str:session_id>/regenerate", api_conversation.session_regenerate, name="session-regenerate"),
    path("session/<str:session_id>/versions", api_conversation.session_versions, name="session-versions"),
    path("session/<str:session_id>/transcript", api_conversation.session_transcript, name="session-transcript"),
    path("session/<str:session_id>/invitations", api_conversation.session_invitations, name="session-invitations"),
    path(
        "session/<str:session_id>/invitations/<str:username>",
        api_conversation.session_invitation_revoke,
        name="session-invitation",
    ),
    path("session/<str:session_id>", api_conversation.session_detail, name="session-detail"),
    path("stats", toolkit_views.stats_api, name="stats"),
    re_path(r"^.*$", api.not_found),
]
