"""Hot-path statements: one row's INSERT, UPDATE or SELECT, with the SQL built once.

Every gateway call and chat turn makes the same handful of statements (claim the session,
store two messages and a usage row, settle the totals). Building them through the ORM costs
more Python than everything else the turn does: a `QuerySet` is cloned, resolved and
compiled each time. These helpers build each statement's SQL text once per shape (model,
columns, conditions, database vendor) and send it with fresh parameters, so PostgreSQL's
prepared statements (settings: `prepare_threshold`) are reused too.

They keep what the ORM guarantees for these rows: values are converted by their fields
(`get_db_prep_save` / `get_db_prep_value`, so SQLite and PostgreSQL get what they expect),
results by the fields' and the backend's converters, and `insert` sends `pre_save` and
`post_save` as `save()` does (the invoice lock in `sessions_app/locks.py` listens there).

Use them only for a statement that runs on every turn or gateway call; everything else reads
better as a queryset. Conditions are equalities (`None` means IS NULL, `Outer(name)` the outer row's
column in a subquery); `add` increments a column; `order_by` takes names, `-` for descending.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from django.db import connection
from django.db.models import Model
from django.db.models.signals import post_save, pre_save

M = TypeVar("M", bound=Model)


def _field(model: type[Model], name: str):
    return model._meta.get_field(name)


def _quote(name: str) -> str:
    return connection.ops.quote_name(name)


@functools.cache
def _insert_sql(model: type[Model], vendor: str) -> tuple[str, tuple]:
    fields = tuple(f for f in model._meta.local_concrete_fields if not getattr(f, "generated", False))
    columns = ", ".join(_quote(str(f.column)) for f in fields)
    marks = ", ".join(["%s"] * len(fields))
    # Names come from the model's metadata, quoted; values go as parameters.
    return f"INSERT INTO {_quote(model._meta.db_table)} ({columns}) VALUES ({marks})", fields  # noqa: S608


def insert(obj: Model) -> None:
    """`obj.save(force_insert=True)` for a new row whose primary key is already set (a UUID default)."""
    model = type(obj)
    if obj.pk is None:
        raise ValueError(f"{model.__name__}: insert() needs the primary key set (no RETURNING here)")
    using = "default"
    if pre_save.has_listeners(model):
        pre_save.send(sender=model, instance=obj, raw=False, using=using, update_fields=None)
    sql, fields = _insert_sql(model, connection.vendor)
    params = [f.get_db_prep_save(f.pre_save(obj, True), connection) for f in fields]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
    obj._state.adding = False
    obj._state.db = using
    if post_save.has_listeners(model):
        post_save.send(sender=model, instance=obj, created=True, update_fields=None, raw=False, using=using)


class Outer:
    """In a subquery's conditions (`Scalar`, `Exists`): the column `name` of the row read around it."""

    def __init__(self, name: str) -> None:
        self.name = name


def _where(
    model: type[Model], conditions: Mapping[str, Any], table: str = "", outer: type[Model] | None = None
) -> tuple[str, list]:
    """`conditions` (name: value) as SQL (None: IS NULL), columns qualified by `table` when given;
    `Outer` values name `outer`'s columns."""
    prefix = f"{_quote(table)}." if table else ""
    clauses, params = [], []
    for name, value in conditions.items():
        field = _field(model, name)
        if value is None:
            clauses.append(f"{prefix}{_quote(field.column)} IS NULL")
        elif isinstance(value, Outer):
            if outer is None:
                raise ValueError(f"Outer({value.name!r}) outside a subquery")
            column = f"{_quote(outer._meta.db_table)}.{_quote(_field(outer, value.name).column)}"
            clauses.append(f"{prefix}{_quote(field.column)} = {column}")
        else:
            clauses.append(f"{prefix}{_quote(field.column)} = %s")
            params.append(field.get_db_prep_value(value, connection))
    return " AND ".join(clauses), params


@functools.cache
def _update_sql(model: type[Model], sets: tuple[str, ...], adds: tuple[str, ...], where: str, vendor: str) -> str:
    parts = [f"{_quote(_field(model, name).column)} = %s" for name in sets]
    parts += [f"{(column := _quote(_field(model, name).column))} = {column} + %s" for name in adds]
    return f"UPDATE {_quote(model._meta.db_table)} SET {', '.join(parts)} WHERE {where}"  # noqa: S608 (as above)


def update(
    model: type[Model], where: Mapping[str, Any], values: Mapping[str, Any], add: Mapping[str, int] | None = None
) -> int:
    """UPDATE the rows matching `where` (equalities; None is IS NULL); how many matched.

    `values` are set, `add` added to their columns. Like `QuerySet.update()`: no signals, no
    `auto_now`.
    """
    add = add or {}
    where_sql, where_params = _where(model, where)
    sql = _update_sql(model, tuple(values), tuple(add), where_sql, connection.vendor)
    params = [_field(model, name).get_db_prep_save(value, connection) for name, value in values.items()]
    params += list(add.values()) + where_params
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount


def _converters(field, table: str) -> tuple:
    column = field.get_col(table)
    return tuple(connection.ops.get_db_converters(column) + field.get_db_converters(connection)), column


@functools.cache
def _column_converters(model: type[Model], name: str, vendor: str) -> tuple:
    return _converters(_field(model, name), model._meta.db_table)


def _convert(value, converters: tuple):
    functions, column = converters
    for function in functions:
        value = function(value, column, connection)
    return value


class Scalar:
    """One value of another table's row, read in the same statement: `(SELECT column FROM ... WHERE ...)`."""

    def __init__(self, model: type[Model], name: str, where: Mapping[str, Any]) -> None:
        self.model, self.name, self.where = model, name, where

    def sql(self, outer: type[Model]) -> tuple[str, list]:
        table = self.model._meta.db_table
        condition, params = _where(self.model, self.where, table, outer)
        column = _quote(str(_field(self.model, self.name).column))
        return f"(SELECT {_quote(table)}.{column} FROM {_quote(table)} WHERE {condition})", params  # noqa: S608

    def convert(self, value):
        return _convert(value, _column_converters(self.model, self.name, connection.vendor))


class Exists:
    """Whether another table has a row matching `where`, read in the same statement: `EXISTS (...)`."""

    def __init__(self, model: type[Model], where: Mapping[str, Any]) -> None:
        self.model, self.where = model, where

    def sql(self, outer: type[Model]) -> tuple[str, list]:
        table = self.model._meta.db_table
        condition, params = _where(self.model, self.where, table, outer)
        return f"EXISTS (SELECT 1 FROM {_quote(table)} WHERE {condition})", params  # noqa: S608

    def convert(self, value) -> bool:
        return bool(value)  # SQLite answers 0 or 1


def _order(model: type[Model], names: tuple[str, ...]) -> str:
    table = _quote(model._meta.db_table)
    return ", ".join(
        f"{table}.{_quote(_field(model, name.lstrip('-')).column)}{' DESC' if name.startswith('-') else ''}"
        for name in names
    )


@functools.cache
def _select_sql(
    model: type[Model],
    names: tuple[str, ...],
    where: str,
    lock: bool,
    join: str,
    scalars: tuple[str, ...],
    order_by: tuple[str, ...],
    limit: int | None,
    vendor: str,
) -> tuple[str, tuple]:
    table = model._meta.db_table
    fields = [_field(model, name) for name in names]
    columns = [f"{_quote(table)}.{_quote(f.column)}" for f in fields]
    converters = [_converters(f, table) for f in fields]
    source = _quote(table)
    if join:
        # The related row's every concrete field, after this model's (`select_instance`).
        relation = _field(model, join)
        other = relation.related_model
        other_table = other._meta.db_table
        source += (
            f" INNER JOIN {_quote(other_table)} ON {_quote(other_table)}.{_quote(relation.target_field.column)}"
            f" = {_quote(table)}.{_quote(relation.column)}"
        )
        for field in other._meta.concrete_fields:
            columns.append(f"{_quote(other_table)}.{_quote(field.column)}")
            converters.append(_converters(field, other_table))
    columns += scalars
    sql = f"SELECT {', '.join(columns)} FROM {source} WHERE {where}"  # noqa: S608 (as above)
    if order_by:
        sql += f" ORDER BY {_order(model, order_by)}"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    if lock and connection.features.has_select_for_update:
        sql += (
            f" FOR UPDATE OF {_quote(table)}"
            if join and connection.features.has_select_for_update_of
            else " FOR UPDATE"
        )
    return sql, tuple(converters)


Also = Scalar | Exists


def _select(
    model: type[Model],
    names: tuple[str, ...],
    where: Mapping[str, Any],
    *,
    for_update: bool = False,
    join: str = "",
    also: Mapping[str, Also] | None = None,
    order_by: tuple[str, ...] = (),
    limit: int | None = None,
) -> list[list]:
    """The matching rows, each the list of its converted values."""
    extras = tuple((also or {}).values())
    scalars, params = [], []
    for extra in extras:
        extra_sql, extra_params = extra.sql(model)
        scalars.append(extra_sql)
        params += extra_params
    where_sql, where_params = _where(model, where, model._meta.db_table)
    sql, converters = _select_sql(
        model, names, where_sql, for_update, join, tuple(scalars), order_by, limit, connection.vendor
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, params + where_params)
        rows = cursor.fetchall()
    fixed = len(converters)
    converted = []
    for row in rows:
        values = [
            _convert(value, converter) if converter[0] else value
            for value, converter in zip(row[:fixed], converters, strict=True)
        ]
        values += [extra.convert(value) for extra, value in zip(extras, row[fixed:], strict=True)]
        converted.append(values)
    return converted


def select_row(
    model: type[Model],
    names: Iterable[str],
    where: Mapping[str, Any],
    *,
    for_update: bool = False,
    also: Mapping[str, Also] | None = None,
) -> dict | None:
    """The one row matching `where` as {name: value} (converted as the ORM would), or None.

    `for_update` locks it (`SELECT ... FOR UPDATE` where the database has it, as
    `select_for_update()` does); call it inside a transaction. `also` reads other tables'
    values in the same statement, under its own keys.
    """
    names = tuple(names)
    rows = _select(model, names, where, for_update=for_update, also=also)
    return dict(zip((*names, *(also or {})), rows[0], strict=True)) if rows else None


def select_rows(
    model: type[Model], names: Iterable[str], where: Mapping[str, Any], *, order_by: Iterable[str] = ()
) -> list[tuple]:
    """Every row matching `where`, as tuples of `names`' values (as `values_list(*names)` gives them)."""
    return [tuple(values) for values in _select(model, tuple(names), where, order_by=tuple(order_by))]


@functools.cache
def _attnames(model: type[Model]) -> tuple[str, ...]:
    return tuple(field.attname for field in model._meta.concrete_fields)


def select_instance(
    model: type[M],
    where: Mapping[str, Any],
    *,
    related: str = "",
    also: Mapping[str, Also] | None = None,
    order_by: Iterable[str] = (),
) -> M | None:
    """The one instance matching `where`, every concrete field loaded (as `Model.from_db` loads a
    queryset's row); with `related`, that foreign key's row too, in the same statement (as
    `select_related(related)` does, through an inner join). `also`'s values, read in the same
    statement, are the instance's `read_with` dict. With `order_by`, the first of the matching
    rows in that order (`.order_by(...).first()`)."""
    names = _attnames(model)
    order = tuple(order_by)
    rows = _select(model, names, where, join=related, also=also, order_by=order, limit=1 if order else None)
    if not rows:
        return None
    values = rows[0]
    instance = model.from_db("default", names, values[: len(names)])
    rest = values[len(names) :]
    if related:
        other = _field(model, related).related_model
        other_names = _attnames(other)
        setattr(instance, related, other.from_db("default", other_names, rest[: len(other_names)]))
        rest = rest[len(other_names) :]
    instance.read_with = dict(zip(also or {}, rest, strict=True))  # type: ignore[attr-defined]
    return instance
