"""Small environment helpers: every knob has a variable, bad values fail loudly.

Each helper raises ImproperlyConfigured naming the variable, so a typo in a
deployment stops the process at start instead of surfacing as odd behaviour.
"""

from __future__ import annotations

import os
from urllib.parse import parse_qs, unquote, urlparse

from django.core.exceptions import ImproperlyConfigured

TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off", ""}


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise ImproperlyConfigured(f"{name}={raw!r} is not a boolean (use 1/0, true/false, yes/no, on/off)")


def env_int(name: str, default: int, minimum: int | None = None, maximum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not an integer") from None
    _check_range(name, value, minimum, maximum)
    return value


def env_float(name: str, default: float, minimum: float | None = None, maximum: float | None = None) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not a number") from None
    _check_range(name, value, minimum, maximum)
    return value


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = os.environ.get(name, default).strip().lower()
    if value not in choices:
        raise ImproperlyConfigured(f"{name}={value!r} must be one of: {', '.join(choices)}")
    return value


def env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


def env_header(name: str) -> tuple[str, str] | None:
    """``HTTP_X_FORWARDED_PROTO=https`` -> ("HTTP_X_FORWARDED_PROTO", "https"); unset or empty -> None."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    header, sep, value = raw.partition("=")
    header, value = header.strip().upper(), value.strip()
    if not sep or not header.startswith("HTTP_") or not value:
        raise ImproperlyConfigured(f"{name}={raw!r} must look like HTTP_X_FORWARDED_PROTO=https")
    return header, value


def private_file(path) -> None:
    """Create ``path`` empty and readable by its owner only (0600) if it does not exist yet.

    For files that hold secrets (the generated secret key, the SQLite database: SQLite
    gives its -wal and -shm files the mode of the database file).
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)


def _check_range(name: str, value: float, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name}={value} is below the minimum {minimum}")
    if maximum is not None and value > maximum:
        raise ImproperlyConfigured(f"{name}={value} is above the maximum {maximum}")


def parse_database_url(url: str, base_dir) -> dict:
    """Turn DATABASE_URL into a Django DATABASES entry.

    sqlite:///relative/or/absolute/path.sqlite3 and mysql://user:pass@host:port/name
    (mariadb:// is an alias). Query parameters are ignored except ``conn_max_age``.
    """
    parsed = urlparse(url)
    scheme = parsed.scheme.lower()
    params = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
    if scheme == "sqlite":
        path = unquote(parsed.path)
        if parsed.netloc:  # sqlite://relative/path
            path = parsed.netloc + path
        if path.startswith("/") and not url.startswith("sqlite:////"):
            path = path[1:]
        if not path:
            raise ImproperlyConfigured(f"DATABASE_URL={url!r} names no SQLite file")
        name = path if os.path.isabs(path) else str(base_dir / path)
        return sqlite_database(name)
    if scheme in ("mysql", "mariadb"):
        name = unquote(parsed.path.lstrip("/"))
        if not name:
            raise ImproperlyConfigured(f"DATABASE_URL={url!r} names no database")
        try:
            port = parsed.port or 3306
        except ValueError:
            raise ImproperlyConfigured(f"DATABASE_URL={url!r} has a bad port") from None
        try:
            conn_max_age = int(params.get("conn_max_age", "60"))
        except ValueError:
            raise ImproperlyConfigured(f"DATABASE_URL={url!r}: conn_max_age is not an integer") from None
        return mysql_database(
            name=name,
            user=unquote(parsed.username or "root"),
            password=unquote(parsed.password or ""),
            host=parsed.hostname or "127.0.0.1",
            port=port,
            conn_max_age=conn_max_age,
        )
    raise ImproperlyConfigured(f"DATABASE_URL={url!r}: scheme must be sqlite or mysql")


def sqlite_database(name: str) -> dict:
    busy_ms = env_int("SQLITE_BUSY_TIMEOUT_MS", 20000, minimum=0)
    return {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": name,
        "OPTIONS": {
            # WAL lets readers run beside the one writer; the busy timeout makes a
            # second writer wait instead of failing with "database is locked".
            "init_command": (
                "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; "
                f"PRAGMA busy_timeout={busy_ms}; PRAGMA foreign_keys=ON;"
            ),
            "timeout": busy_ms / 1000,
            # BEGIN IMMEDIATE takes the write lock up front, so two processes never
            # deadlock upgrading read locks: SQLite's stand-in for row locks.
            "transaction_mode": "IMMEDIATE",
        },
        "TEST": {"NAME": os.environ.get("SQLITE_TEST_NAME") or None},
    }


def mysql_database(*, name: str, user: str, password: str, host: str, port: int, conn_max_age: int) -> dict:
    return {
        "ENGINE": "django.db.backends.mysql",
        "NAME": name,
        "USER": user,
        "PASSWORD": password,
        "HOST": host,
        "PORT": str(port),
        "CONN_MAX_AGE": conn_max_age,
        "CONN_HEALTH_CHECKS": True,
        "OPTIONS": {
            "charset": "utf8mb4",
            # READ COMMITTED: a locked re-read sees what other transactions
            # committed, which admission (count running, claim pending) relies on.
            "isolation_level": "read committed",
            "init_command": "SET sql_mode='STRICT_TRANS_TABLES,NO_ZERO_DATE,ERROR_FOR_DIVISION_BY_ZERO', innodb_lock_wait_timeout=10",
            "connect_timeout": 5,
        },
        "TEST": {"CHARSET": "utf8mb4", "COLLATION": "utf8mb4_unicode_ci"},
    }
