"""Query and transaction counts: a page's queries do not grow with its rows; a turn's writes stay in budget."""

from __future__ import annotations

from collections.abc import Callable

from django.db import connection
from django.test.utils import CaptureQueriesContext


def queries_for(client, url: str) -> int:
    with CaptureQueriesContext(connection) as ctx:
        response = client.get(url)
    assert response.status_code == 200, (url, response.status_code)
    return len(ctx.captured_queries)


def assert_bounded_queries(
    client, url: str, make_rows: Callable[[int], None], django_assert_max_num_queries, *, bound: int
) -> None:
    """No more queries for 22 rows than for 2, and never more than `bound`.

    (The admin's date hierarchy may spend one query less when all rows share a date,
    so "no more" rather than "exactly as many".)
    """
    make_rows(2)
    client.get(url)  # warm per-process caches (content types, permissions)
    with django_assert_max_num_queries(bound):
        assert client.get(url).status_code == 200
    few = queries_for(client, url)
    make_rows(20)
    with django_assert_max_num_queries(bound):
        response = client.get(url)
    assert response.status_code == 200
    many = queries_for(client, url)
    assert many <= few, f"{url}: {few} queries for 2 rows, {many} for 22"


class WriteTransactions:
    """Count write transactions as the database sees them (inside the test's own transaction).

    Each `transaction.atomic` block is a SAVEPOINT here; one that wrote and was released is one
    write transaction. A write outside any block (autocommit in production) is one on its own.
    """

    def __init__(self) -> None:
        self.count = 0
        self.stack: list[bool] = []

    def __call__(self, execute, sql, params, many, ctx):
        statement = sql.lstrip().upper()
        if statement.startswith("SAVEPOINT"):
            self.stack.append(False)
        elif statement.startswith("RELEASE SAVEPOINT"):
            wrote = self.stack.pop()
            if wrote and not self.stack:
                self.count += 1
            elif wrote:
                self.stack[-1] = True
        elif statement.startswith("ROLLBACK TO SAVEPOINT"):
            self.stack.pop()
        elif statement.startswith(("INSERT", "UPDATE", "DELETE")):
            if self.stack:
                self.stack[-1] = True
            else:
                self.count += 1
        return execute(sql, params, many, ctx)
