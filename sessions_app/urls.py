"""Routes of the web pages."""

from django.urls import path

from sessions_app import toolkit_views, views

urlpatterns = [
    path("", views.home, name="home"),
    path("sessions/", views.session_list_page, name="session-list"),
    path("sessions/new/", views.session_new_page, name="session-new"),
    path("sessions/models.json", views.session_models_json, name="session-models"),
    path("sessions/<uuid:session_id>/", views.session_chat_page, name="session-chat"),
    path("sessions/<uuid:session_id>/summary/", views.session_summary_page, name="session-summary"),
    path("sessions/<uuid:session_id>/messages.json", views.session_messages_json, name="session-messages"),
    path("search/", toolkit_views.search_page, name="search"),
]
