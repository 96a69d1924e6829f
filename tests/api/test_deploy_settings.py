"""HTTPS knobs from the environment, and files holding secrets readable by their owner only (issue 18, item 9)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from rest_framework.test import APIClient

ROOT = Path(__file__).resolve().parents[2]


def example_env(var_dir: Path, drop: tuple[str, ...] = ()) -> dict[str, str]:
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    for line in (ROOT / "deploy" / "env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            name, value = line.split("=", 1)
            if name not in drop:
                env[name] = value
    env["VAR_DIR"] = str(var_dir)
    return env


def manage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_check_deploy_is_clean_with_the_example_production_settings(tmp_path):
    done = manage(example_env(tmp_path), "check", "--deploy", "--fail-level", "WARNING")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no issues" in done.stdout


def test_without_the_https_knobs_check_deploy_complains(tmp_path):
    https = ("DJANGO_HTTPS", "DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", "DJANGO_SECURE_HSTS_PRELOAD")
    done = manage(example_env(tmp_path, drop=https), "check", "--deploy", "--fail-level", "WARNING")
    assert done.returncode != 0
    for warning in ("security.W004", "security.W008", "security.W012", "security.W016"):
        assert warning in done.stdout + done.stderr, warning


def test_a_malformed_proxy_header_stops_the_start(tmp_path):
    env = example_env(tmp_path)
    env["DJANGO_SECURE_PROXY_SSL_HEADER"] = "X-Forwarded-Proto: https"
    done = manage(env, "check")
    assert done.returncode != 0
    assert "DJANGO_SECURE_PROXY_SSL_HEADER" in done.stderr


def test_the_secret_key_and_the_sqlite_file_are_created_0600(tmp_path):
    script = (
        "import os, django; os.umask(0o022); os.environ['DJANGO_SETTINGS_MODULE'] = 'config.settings'; "
        "django.setup(); from django.db import connection; c = connection.cursor(); "
        "c.execute('CREATE TABLE t (x)'); c.execute('INSERT INTO t VALUES (1)'); "
        "import stat; var = os.environ['VAR_DIR']; "
        "print(' '.join(f'{n}={stat.S_IMODE(os.stat(os.path.join(var, n)).st_mode):o}' "
        "for n in sorted(os.listdir(var)) if os.path.isfile(os.path.join(var, n))))"
    )
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "VAR_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", f"import os; os.umask(0o022); {script}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    modes = dict(item.split("=") for item in done.stdout.split())
    assert modes["secret_key"] == "600"
    assert modes["db.sqlite3"] == "600"
    assert modes["db.sqlite3-wal"] == modes["db.sqlite3-shm"] == "600"  # SQLite copies the database's mode
    assert all(mode == "600" for mode in modes.values()), modes
    assert stat.S_IMODE((tmp_path / "secret_key").stat().st_mode) == 0o600


@pytest.mark.django_db
def test_ssl_redirect_spares_probes_and_trusts_the_proxy_header(settings):
    settings.SECURE_SSL_REDIRECT = True
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    client = APIClient()
    plain = client.get("/api/v1/tasks/")
    assert (plain.status_code, plain["Location"]) == (301, "https://testserver/api/v1/tasks/")
    assert client.get("/api/v1/tasks/", HTTP_X_FORWARDED_PROTO="https").status_code == 401
    assert client.get("/healthz").status_code != 301
