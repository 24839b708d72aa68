"""Gateway routes: Ollama's `/api/...` and OpenAI's `/v1/...`, also under `/t/<token>/`.

The `/t/<token>/` prefix is for clients that cannot set an Authorization header: point
them at `http://host/t/<token>` as if it were an Ollama server (or `.../t/<token>/v1`).
"""

from django.urls import include, path

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

app_name = "gateway"
urlpatterns = [
    *routes,
    path("t/<str:token>/", views.ollama_root, name="root"),
    path("t/<str:token>/", include((routes, "gateway"), namespace="token")),
]
