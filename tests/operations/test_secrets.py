"""Passwords never appear in plain text: not in any table, task_data, event, log line or list response."""

from __future__ import annotations

import logging
from pathlib import Path

from django.db import connection
from rest_framework.test import APIClient

from tasks import crypto, services
from tasks.models import PortMapping, Task
from tests.operations.conftest import inject, run, store


def _all_rows_text() -> str:
    """Every row of every table of the database, as text."""
    chunks = []
    with connection.cursor() as cursor:
        for table in connection.introspection.table_names():
            cursor.execute(f"SELECT * FROM {connection.ops.quote_name(table)}")
            chunks.extend(repr(row) for row in cursor.fetchall())
    return "\n".join(chunks)


def _api_text(user, paths: list[str]) -> str:
    client = APIClient()
    client.force_authenticate(user)
    out = []
    for path in paths:
        response = client.get(path)
        assert response.status_code == 200, (path, response.status_code)
        out.append(response.content.decode())
    return "\n".join(out)


def test_no_plaintext_password_anywhere_after_every_task_type(alice, root, provider, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    generated: list[str] = []
    real = crypto.generate_password

    def recording(length: int = 20) -> str:
        password = real(length)
        generated.append(password)
        return password

    monkeypatch.setattr(crypto, "generate_password", recording)

    instance, create = services.create_instance(alice, provider=provider, image="debian/12")
    run(provider)
    done = [create]
    for op in ("reset-password", "stop", "start", "restart", "reset"):
        done.append(services.request_operation(alice, instance.pk, op))
        run(provider)
    port_task, mapping = services.create_port(alice, instance.pk, protocol="both", guest_port=80)
    run(provider)
    done.append(port_task)
    done.append(services.delete_port(alice, instance.pk, mapping.pk))
    run(provider)
    # A failed password change: its password was generated, and must not be kept anywhere.
    inject(provider, fail_ops={"set_password": "permanent"})
    done.append(services.request_operation(alice, instance.pk, "reset-password"))
    run(provider)
    inject(provider, fail_ops={})
    assert [Task.objects.get(pk=t.pk).status for t in done] == ["completed"] * 8 + ["failed"]
    assert len(generated) == 4  # create, reset-password, reset, the failed reset-password

    def leaks(text: str) -> list[str]:
        return [p for p in generated if p in text]

    # The owner can read each new password once; it works on the guest.
    shown = [services.read_password_once(alice, t.pk) for t in (done[0], done[1], done[5])]
    assert shown == generated[:3] and store(provider).password_matches(instance.guest_name, shown[-1])

    # Nowhere in the database (tasks, task_data, events, secrets, django-q, sessions ...).
    assert leaks(_all_rows_text()) == []
    # Nor on the simulated host's disk (it keeps a salted hash).
    host_files = Path(store(provider).path).parent.glob("*")
    assert all(leaks(f.read_bytes().decode("latin-1")) == [] for f in host_files)
    # Nor in any log line, at any level.
    assert leaks(caplog.text) == []
    # Nor in the API's lists and details (user and admin views).
    user_paths = [
        "/api/v1/tasks/",
        "/api/v1/instances/",
        f"/api/v1/instances/{instance.pk}/",
        f"/api/v1/instances/{instance.pk}/ports/",
    ] + [f"/api/v1/tasks/{t.pk}/" for t in done]
    admin_paths = ["/api/v1/admin/tasks/"] + [f"/api/v1/admin/tasks/{t.pk}/" for t in done]
    assert leaks(_api_text(alice, user_paths) + _api_text(root, admin_paths)) == []
    assert PortMapping.objects.filter(pk=mapping.pk).get().status == "deleted"
