"""The types callers hand the session services: a session's id as they hold it, and who acts."""

from __future__ import annotations

import uuid
from typing import TypeAlias

from django.contrib.auth.models import User

SessionRef: TypeAlias = str | uuid.UUID
"""A session's id as a caller holds it: the UUID, or its text from a URL, a frame or a terminal."""

Person: TypeAlias = User
"""Who acts: a signed-in consultant or staff (the auth user model, `settings.AUTH_USER_MODEL`)."""
