"""Signal receivers of the work-session app."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.signals import user_logged_out
from django.dispatch import receiver


@receiver(user_logged_out, dispatch_uid="sessions_app.say_signed_out")
def say_signed_out(sender, request, user, **kwargs) -> None:
    # The sign-in page is where sign-out lands; tell the person it worked.
    if request is not None and hasattr(request, "_messages"):
        messages.info(request, "You are signed out.")
