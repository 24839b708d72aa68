"""Gateway routes: Ollama's `/api/...` and OpenAI's `/v1/...`, also under `/t/<token>/`.

The `/t/<token>/` prefix is for clients that cannot set an Authorization header: point
them at `http://host/t/<token>` as if it were an Ollama server (or `.../t/<token>/v1`).
"""

from django.urls import include, path, re_path

from sessions_app.gateway import views

routes = [
    path("api/chat", views.ollama_chat, name="chat"),
    path("api/generate", views.ollama_generate, name="generate"),
    path("api/tags", views.ollama_tags, name="tags"),
    path("api/show", views.ollama_show, name="show"),
    path("api/ps", views.ollama_ps, name="ps"),
    path("api/version", views.ollama_version, name="version"),
    path("v1/chat/completions", views.openai_chat_completions, name="chat-completions"),
    path("v1/models", views.openai_models, name="models"),
    path("v1/models/<path:model>", views.openai_model, name="model"),
    # Endpoints tools may try that the gateway does not offer: a clear 404 in the protocol's shape.
    *(
        path(f"api/{name}", views.ollama_unsupported)
        for name in ("embed", "embeddings", "pull", "push", "create", "copy", "delete")
    ),
    path("api/blobs/<str:digest>", views.ollama_unsupported),
    *(path(f"v1/{name}", views.openai_unsupported) for name in ("embeddings", "completions", "responses")),
]

# Any other path in the gateway's spaces: a 404 in the protocol's own shape, never the site's
# HTML page (and never Django's "Not Found" log line with a token in it).
unknown = [re_path(r"^v1/", views.openai_not_found), re_path(r"^api/", views.ollama_not_found)]

app_name = "gateway"
urlpatterns = [
    *routes,
    re_path(r"^v1/", views.openai_not_found),
    re_path(r"^api/(?!ollama/)", views.ollama_not_found),  # /api/ollama/ is the REST API
    path("t/<str:token>/", views.ollama_root, name="root"),
    path(
        "t/<str:token>/",
        include(([*routes, *unknown, re_path(r"", views.ollama_not_found)], "gateway"), namespace="token"),
    ),
]
