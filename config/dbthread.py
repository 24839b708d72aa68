"""Run ORM code from async code: the one database-thread helper every app uses."""

from __future__ import annotations

from asgiref.sync import sync_to_async
from django.db import close_old_connections, connection


def db_sync_to_async(func):
    """`channels.db.database_sync_to_async`, minus closing a connection inside a transaction.

    Like channels, drop stale connections around the call (a long-lived worker thread must
    not keep a dead one). Unlike channels, leave a connection alone while it is inside an
    atomic block: closing it there would abort the caller's transaction (a test's, under
    PostgreSQL, or a service's).
    """

    def run(*args, **kwargs):
        outside = not connection.in_atomic_block
        if outside:
            close_old_connections()
        try:
            return func(*args, **kwargs)
        finally:
            if outside:
                close_old_connections()

    return sync_to_async(run)
