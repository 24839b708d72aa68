"""Assert that a page's query count does not grow with the number of rows it lists."""

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
