"""Settings: SQLite by default, MySQL from DATABASE_URL, bad values fail naming the variable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROBE = (
    "import json, django; from django.conf import settings; django.setup(); "
    "d = settings.DATABASES['default']; "
    "print(json.dumps({'engine': d['ENGINE'], 'name': str(d['NAME']), 'options': {k: str(v) for k, v in d['OPTIONS'].items()}, "
    "'host': d.get('HOST', ''), 'broker': settings.Q_BROKER}))"
)


def probe(tmp_path, **env):
    clean = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "Q_BROKER", "TASK_LEASE_SECONDS")}
    clean.update(DJANGO_SETTINGS_MODULE="config.settings", VAR_DIR=str(tmp_path), **env)
    return subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, env=clean, capture_output=True, text=True, timeout=60
    )


def test_sqlite_by_default_with_wal_and_busy_timeout(tmp_path):
    out = probe(tmp_path)
    assert out.returncode == 0, out.stderr
    conf = json.loads(out.stdout.strip().splitlines()[-1])
    assert conf["engine"] == "django.db.backends.sqlite3"
    assert conf["name"] == str(tmp_path / "db.sqlite3")
    assert "journal_mode=WAL" in conf["options"]["init_command"]
    assert "busy_timeout" in conf["options"]["init_command"]
    assert conf["broker"] == "orm"


def test_mysql_from_database_url(tmp_path):
    out = probe(tmp_path, DATABASE_URL="mysql://panel:s3cret@db.example:3307/cloudhost")
    assert out.returncode == 0, out.stderr
    conf = json.loads(out.stdout.strip().splitlines()[-1])
    assert conf["engine"] == "django.db.backends.mysql"
    assert (conf["name"], conf["host"]) == ("cloudhost", "db.example")
    assert conf["options"]["charset"] == "utf8mb4"
    assert "STRICT_TRANS_TABLES" in conf["options"]["init_command"]


def test_bad_values_fail_at_start_naming_the_variable(tmp_path):
    for env, name in (
        ({"TASK_LEASE_SECONDS": "soon"}, "TASK_LEASE_SECONDS"),
        ({"DATABASE_URL": "postgres://x/y"}, "DATABASE_URL"),
        ({"Q_BROKER": "rabbit"}, "Q_BROKER"),
        ({"Q_BROKER_CLASS": "tasks.engine.broker.Nope"}, "Q_BROKER_CLASS"),
        ({"DJANGO_DEBUG": "maybe"}, "DJANGO_DEBUG"),
    ):
        out = probe(tmp_path, **env)
        assert out.returncode != 0
        assert "ImproperlyConfigured" in out.stderr and name in out.stderr
