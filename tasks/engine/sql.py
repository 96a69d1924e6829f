"""Plain SQL for the pipeline's hot paths: create, admit, claim, finish.

Every task goes through about thirty statements on its way from created to
completed. Built by the ORM, each one costs 150-450 µs of CPU in the Django
process (query compilation, model construction); written here once per model
they cost 30-60 µs, which is what lets the pipeline keep pace with plain
django-q2 (bench/pipeline). The rest of the code base uses the ORM.

Values still go through each field's own ``pre_save`` / ``get_db_prep_save``
and come back through the backend's and the field's converters, so the objects
built here are exactly what the ORM would give (aware datetimes, parsed JSON,
booleans). Errors are Django's (the cursor is Django's CursorWrapper), so
``retry_on_deadlock`` and the API's error mapping see the same exceptions.

Only the default database is used; the statements are portable between
MySQL/MariaDB and SQLite (FOR UPDATE is added only where the backend has it).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from django.db import DEFAULT_DB_ALIAS, DatabaseError, Error, connections, transaction
from django.db.models import Model, signals
from django.db.models.base import ModelState


def db():
    """This thread's connection object itself.

    ``django.db.connection`` is a proxy that looks the connection up again on every
    attribute (a thread-local lookup each time); the hot paths touch it about a
    hundred times per task, passing it to every field and converter. Resolved once
    per call instead, it costs a dictionary access.
    """
    return connections[DEFAULT_DB_ALIAS]


@contextmanager
def atomic() -> Iterator[None]:
    """``transaction.atomic()`` for the hot paths, two round trips cheaper on MySQL/MariaDB.

    Django opens a transaction with SET autocommit=0 and closes it with COMMIT and
    SET autocommit=1. MySQL's START TRANSACTION opens one without leaving autocommit
    mode, and COMMIT ends it: two statements instead of four. Inside, Django sees an
    ordinary outermost atomic block (autocommit off, nested atomic() makes
    savepoints, on_commit callbacks wait for the commit), so the code within needs
    nothing special. Elsewhere (SQLite, or already inside a transaction) this is
    plain ``transaction.atomic()``.
    """
    conn = db()
    if conn.vendor != "mysql" or conn.in_atomic_block or not conn.get_autocommit():
        with transaction.atomic():
            yield
        return
    cursor().execute("START TRANSACTION")
    conn.commit_on_exit, conn.needs_rollback = True, False
    conn.in_atomic_block, conn.autocommit = True, False
    try:
        yield
    except BaseException:
        _end(conn, commit=False)
        raise
    _end(conn, commit=not conn.needs_rollback)


def _end(conn, *, commit: bool) -> None:
    """Leave the block opened by :func:`atomic`: commit (then run on_commit callbacks) or roll back."""
    conn.in_atomic_block, conn.autocommit, conn.needs_rollback = False, True, False
    if conn.closed_in_transaction:  # closed inside: the server rolled back
        conn.connection, conn.run_on_commit = None, []
        return
    if commit:
        try:
            with conn.wrap_database_errors:
                conn.connection.commit()
        except DatabaseError:
            _rollback(conn)
            raise
        conn.run_and_clear_commit_hooks()
    else:
        _rollback(conn)


def _rollback(conn) -> None:
    conn.run_on_commit = []
    try:
        with conn.wrap_database_errors:
            conn.connection.rollback()
    except Error:
        conn.close()  # a connection that cannot roll back is dropped


class Inc:
    """``column = column + n`` in :func:`update`."""

    __slots__ = ("n",)

    def __init__(self, n: int = 1):
        self.n = n


class Table:
    """A model's columns, quoted names and converters, computed once per backend."""

    def __init__(self, model: type[Model], conn):
        meta = model._meta
        quote = conn.ops.quote_name
        self.model = model
        self.name = quote(meta.db_table)
        self.fields = list(meta.concrete_fields)
        self.by_name = {}
        for f in self.fields:
            self.by_name[f.name] = f
            self.by_name[f.attname] = f
        self.attnames = [f.attname for f in self.fields]
        self.quoted = {f.attname: quote(f.column) for f in self.fields}
        self.converters = []
        for f in self.fields:
            col = f.get_col(meta.db_table)
            convs = conn.ops.get_db_converters(col) + col.get_db_converters(conn)
            self.converters.append((col, convs))
        self.json_attnames = [f.attname for f in self.fields if f.get_internal_type() == "JSONField"]
        # Model.__init__ sets every field through its descriptor and sends pre/post_init:
        # a third of the cost of reading a row. Without init receivers, a row's values
        # go straight into the instance's __dict__, which is where __init__ puts them.
        self.plain = not (signals.pre_init.has_listeners(model) or signals.post_init.has_listeners(model))
        self._columns: dict[str, str] = {}

    def columns(self, alias: str = "") -> str:
        """The column list of a SELECT (``alias.`` before each), built once per alias."""
        cached = self._columns.get(alias)
        if cached is None:
            prefix = f"{alias}." if alias else ""
            cached = self._columns[alias] = ", ".join(prefix + self.quoted[a] for a in self.attnames)
        return cached

    def build(self, row, offset: int = 0) -> Model:
        """A model instance from ``len(fields)`` values of ``row`` starting at ``offset``."""
        conn = db()
        values = list(row[offset : offset + len(self.fields)])
        for i, (col, convs) in enumerate(self.converters):
            if convs:
                value = values[i]
                for conv in convs:
                    value = conv(value, col, conn)
                values[i] = value
        if not self.plain:
            return self.model.from_db(conn.alias, self.attnames, values)
        obj = self.model.__new__(self.model)
        state = ModelState()
        state.adding, state.db = False, conn.alias
        obj.__dict__.update(zip(self.attnames, values, strict=True))
        obj.__dict__["_state"] = state
        return obj


_tables: dict[type[Model], Table] = {}


def table(model: type[Model]) -> Table:
    """The model's Table, built once per process (one database per process: the default)."""
    t = _tables.get(model)
    if t is None:
        t = _tables[model] = Table(model, db())
    return t


def cursor():
    """This thread's cursor, reused while the connection lasts (a new one costs ~35 µs).

    When queries are being logged (DEBUG, CaptureQueriesContext) a fresh debug
    cursor is returned so that every statement shows up.
    """
    conn = db()
    if conn.queries_logged:
        return conn.cursor()
    conn.ensure_connection()
    cached = getattr(conn, "_hot_cursor", None)
    if cached is not None and cached[0] is conn.connection:
        return cached[1]
    cur = conn.cursor()
    conn._hot_cursor = (conn.connection, cur)
    return cur


def execute(sql: str, params=()) -> int:
    """Run a statement; return the number of rows it matched."""
    cur = cursor()
    cur.execute(sql, params)
    return cur.rowcount


def fetchone(sql: str, params=()):
    cur = cursor()
    cur.execute(sql, params)
    return cur.fetchone()


def fetchall(sql: str, params=()) -> list:
    cur = cursor()
    cur.execute(sql, params)
    return list(cur.fetchall())


def for_update() -> str:
    return " FOR UPDATE" if db().features.has_select_for_update else ""


def _by_pk(t: Table, columns: str, *, lock: bool, where: str) -> str:
    sql = f"SELECT {columns} FROM {t.name} WHERE {t.quoted[t.model._meta.pk.attname]} = %s"
    if where:
        sql += f" AND ({where})"
    return sql + for_update() if lock else sql


def get(model: type[Model], pk, *, lock: bool = False, where: str = "", params=()) -> Model | None:
    """The row with this primary key as a model instance (None if absent); ``lock``: FOR UPDATE."""
    t = table(model)
    row = fetchone(_by_pk(t, t.columns(), lock=lock, where=where), [pk, *params])
    return None if row is None else t.build(row)


def values(model: type[Model], pk, names: list[str], *, lock: bool = False, where: str = "", params=()):
    """Some columns of the row with this primary key, as the database returns them (None if absent)."""
    t = table(model)
    columns = ", ".join(t.quoted[t.by_name[n].attname] for n in names)
    return fetchone(_by_pk(t, columns, lock=lock, where=where), [pk, *params])


def prep(field, value, conn=None) -> Any:
    return field.get_db_prep_save(value, conn or db())


def insert(obj: Model) -> Model:
    """INSERT the object (defaults, auto_now_add and friends applied as save() would)."""
    conn = db()
    t = table(type(obj))
    pk_attname = obj._meta.pk.attname
    names, values = [], []
    for f in t.fields:
        if f.attname == pk_attname and getattr(obj, pk_attname) is None:
            continue
        names.append(t.quoted[f.attname])
        values.append(prep(f, f.pre_save(obj, True), conn))
    placeholders = ", ".join(["%s"] * len(values))
    cur = cursor()
    cur.execute(f"INSERT INTO {t.name} ({', '.join(names)}) VALUES ({placeholders})", values)
    if getattr(obj, pk_attname) is None:
        setattr(obj, pk_attname, cur.lastrowid)
    obj._state.adding = False
    obj._state.db = conn.alias
    return obj


def update(model: type[Model], values: dict[str, Any], where: str, params=()) -> int:
    """UPDATE model SET values WHERE where; return the number of rows matched.

    ``values`` are field names (or attnames) to Python values, prepared by the
    field; :class:`Inc` adds to the column.
    """
    conn = db()
    t = table(model)
    sets, args = [], []
    for name, value in values.items():
        f = t.by_name[name]
        col = t.quoted[f.attname]
        if isinstance(value, Inc):
            sets.append(f"{col} = {col} + %s")
            args.append(value.n)
        else:
            sets.append(f"{col} = %s")
            args.append(prep(f, value, conn))
    return execute(f"UPDATE {t.name} SET {', '.join(sets)} WHERE {where}", [*args, *params])


def col(model: type[Model], name: str) -> str:
    """A quoted column name, for hand-written WHERE clauses."""
    t = table(model)
    return t.quoted[t.by_name[name].attname]


def snapshot(obj: Model) -> dict[str, Any]:
    """The object's field values, to find later what changed (JSON values copied)."""
    t = table(type(obj))
    values = {a: obj.__dict__.get(a) for a in t.attnames}
    for a in t.json_attnames:
        values[a] = copy.deepcopy(values[a])
    return values


def changed(obj: Model, before: dict[str, Any]) -> dict[str, Any]:
    """Fields whose value differs from the snapshot, as {attname: value}."""
    return {a: obj.__dict__.get(a) for a, v in before.items() if obj.__dict__.get(a) != v}


def save_changes(obj: Model, before: dict[str, Any], *, now=None) -> bool:
    """UPDATE only the fields changed since the snapshot (auto_now fields refreshed); False if none."""
    diff = changed(obj, before)
    if not diff:
        return False
    t = table(type(obj))
    for f in t.fields:
        if getattr(f, "auto_now", False):
            value = now if now is not None else f.pre_save(obj, False)
            setattr(obj, f.attname, value)
            diff[f.attname] = value
    pk = obj._meta.pk
    update(type(obj), diff, f"{t.quoted[pk.attname]} = %s", [obj.pk])
    return True
