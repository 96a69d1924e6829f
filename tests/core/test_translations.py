"""Chinese and English: every message has a translation; the language follows the request."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from django.utils import translation
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from tasks import messages, services
from tasks.models import Provider, Task
from tests.conftest import make_task

ROOT = Path(__file__).resolve().parents[2]
PO = ROOT / "locale" / "zh_Hans" / "LC_MESSAGES" / "django.po"


def client_for(user, language: str | None = None) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.get_or_create(user=user)[0].key}")
    if language:
        client.defaults["HTTP_ACCEPT_LANGUAGE"] = language
    return client


# ------------------------------------------------------------------ the catalog


def untranslated(po: Path) -> list[str]:
    """msgids with no msgstr, or marked fuzzy (gettext's msgattrib)."""
    found = []
    for option in ("--untranslated", "--only-fuzzy"):
        out = subprocess.run(
            ["msgattrib", option, "--no-obsolete", str(po)], capture_output=True, text=True, check=True
        ).stdout
        found += [line[6:] for line in out.splitlines() if line.startswith("msgid ") and line != 'msgid ""']
    return found


@pytest.mark.skipif(shutil.which("xgettext") is None, reason="gettext is not installed (scripts/setup installs it)")
def test_every_message_in_the_source_has_a_chinese_translation(tmp_path):
    """Extract the messages from a copy of the source into a copy of the catalog, as
    scripts/messages does: a message marked in the code but not translated in
    locale/zh_Hans/LC_MESSAGES/django.po (new, changed, or fuzzy) fails here."""
    for name in ("tasks", "templates", "config", "providers", "locale"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "*.mo"))
    shutil.copy(ROOT / "manage.py", tmp_path / "manage.py")
    env = {**os.environ, "VAR_DIR": str(tmp_path / "var"), "DJANGO_SETTINGS_MODULE": "config.settings"}
    env.pop("DATABASE_URL", None)
    subprocess.run(
        [sys.executable, "manage.py", "makemessages", "-l", "zh_Hans", "--add-location=file", "--no-obsolete", "-v0"],
        cwd=tmp_path,
        env=env,
        check=True,
        timeout=300,
    )
    missing = untranslated(tmp_path / "locale" / "zh_Hans" / "LC_MESSAGES" / "django.po")
    assert not missing, "messages without a Chinese translation (run scripts/messages):\n" + "\n".join(missing)


@pytest.mark.skipif(shutil.which("msgattrib") is None, reason="gettext is not installed (scripts/setup installs it)")
def test_the_check_catches_a_missing_translation(tmp_path):
    po = tmp_path / "django.po"
    po.write_text(PO.read_text(encoding="utf-8") + '\nmsgid "a brand new message"\nmsgstr ""\n', encoding="utf-8")
    assert untranslated(po) == ['"a brand new message"']
    assert untranslated(PO) == []


# ------------------------------------------------------------------ the API


def test_api_details_follow_accept_language_and_codes_do_not(alice, running_instance):
    english = client_for(alice).post(f"/api/v1/instances/{running_instance.pk}/start/", {}, format="json")
    chinese = client_for(alice, "zh-CN,zh;q=0.9").post(
        f"/api/v1/instances/{running_instance.pk}/start/", {}, format="json"
    )
    assert english.status_code == chinese.status_code == 409
    assert english.json()["code"] == chinese.json()["code"] == "invalid_state"
    assert english.json()["status"] == chinese.json()["status"] == "running"
    assert english.json()["detail"] == "cannot start an instance that is running"
    assert chinese.json()["detail"] == "无法对状态为“运行中”的实例执行“开机”"
    assert chinese["Content-Language"] == "zh-hans"

    missing = client_for(alice, "zh-hans").get("/api/v1/instances/999999/")
    assert missing.status_code == 404 and missing.json() == {"code": "not_found", "detail": "没有这个对象"}


def test_field_errors_are_translated_and_name_the_same_field(alice, provider):
    body = {"provider": provider.pk, "image": "debian/12", "cpu": 0, "memory_mb": 512, "disk_mb": 10240}
    english = client_for(alice, "en").post("/api/v1/instances/", body, format="json")
    chinese = client_for(alice, "zh-hans").post("/api/v1/instances/", body, format="json")
    assert english.status_code == chinese.status_code == 400
    assert english.json()["field"] == chinese.json()["field"] == "cpu"
    assert english.json()["detail"] == "cpu: Ensure this value is greater than or equal to 1."
    assert chinese.json()["detail"] == "cpu: 请确保该值大于或者等于 1。"
    quota = client_for(alice, "zh-hans").post("/api/v1/instances/", {**body, "cpu": 999}, format="json")
    assert quota.status_code == 409 and quota.json()["code"] == "quota_exceeded"
    assert quota.json()["detail"] == "您的配额允许 16 CPU；此操作将使用 999"


def test_blocked_reason_and_step_messages_are_shown_in_the_readers_language(alice, provider, make_instance):
    Provider.objects.filter(pk=provider.pk).update(enabled=False)
    instance = make_instance(alice, provider, status="stopped")
    task = services.request_operation(alice, instance.pk, "start")  # waits: its provider is disabled
    Task.objects.filter(pk=task.pk).update(status_message="queued")
    task.events.update(message="syncing traffic counters")
    en = client_for(alice, "en").get(f"/api/v1/tasks/{task.pk}/").json()
    zh = client_for(alice, "zh-hans").get(f"/api/v1/tasks/{task.pk}/").json()
    assert (en["blocked_reason"], en["status_message"]) == ("provider disabled", "queued")
    assert (zh["blocked_reason"], zh["status_message"]) == ("节点已停用", "排队中")
    assert en["events"][0]["message"] == "syncing traffic counters"
    assert zh["events"][0]["message"] == "同步流量计数"
    assert zh["status"] == "pending" and zh["task_type"] == "start"  # codes never change


def test_stored_messages_with_figures_are_translated_by_their_pattern():
    with translation.override("zh-hans"):
        assert (
            messages.translate("creating the guest: provider error, retry 2 of 3")
            == "创建实例：节点错误，第 2 次重试（共 3 次）"
        )
        assert messages.translate("downloading image debian/12") == "下载镜像 debian/12"
        assert messages.translate("a provider's own words") == "a provider's own words"
        assert messages.translate("") == ""
    assert messages.translate("creating the guest: provider error, retry 2 of 3").startswith("creating the guest")


def test_language_code_is_the_default_when_the_request_names_none(alice, settings):
    settings.LANGUAGE_CODE = "zh-hans"
    client = client_for(alice)
    assert client.get("/api/v1/instances/999999/").json()["detail"] == "没有这个对象"
    assert client.get("/api/v1/instances/999999/", HTTP_ACCEPT_LANGUAGE="en").json()["detail"] == "no such object"
    # A language we do not have falls back to the default.
    assert client.get("/api/v1/instances/999999/", HTTP_ACCEPT_LANGUAGE="fr").json()["detail"] == "没有这个对象"


def test_management_commands_and_workers_speak_english_whatever_the_default(tmp_path):
    """manage.py (commands, and the worker tier it runs) writes English even with LANGUAGE_CODE=zh-hans."""
    env = {**os.environ, "LANGUAGE_CODE": "zh-hans", "VAR_DIR": str(tmp_path)}
    env.pop("DATABASE_URL", None)
    code = "from django.utils.translation import gettext, get_language; print(get_language(), gettext('queued'))"
    out = subprocess.run(
        [sys.executable, "manage.py", "shell", "--no-imports", "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["en", "queued"]


# ------------------------------------------------------------------ the admin


def test_admin_pages_follow_accept_language(client, root, running_instance):
    make_task(running_instance, status="running", progress=40, status_message="creating the guest")
    client.force_login(root)
    page = client.get("/admin/tasks/task/", HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()
    assert "取消所选任务（需填写原因）" in page  # an action
    assert "运行中" in page and "创建实例" in page  # the status badge, the step message
    assert 'value="cancel_selected"' in page  # the action's name does not change
    dashboard = client.get("/admin/tasks/task/dashboard/", HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()
    assert "任务仪表盘" in dashboard and "各状态任务数" in dashboard and "吞吐量" in dashboard
    english = client.get("/admin/tasks/task/dashboard/", HTTP_ACCEPT_LANGUAGE="en").content.decode()
    assert "Task dashboard" in english and "任务仪表盘" not in english


def test_the_admin_language_switch_overrides_accept_language(client, root, running_instance):
    client.force_login(root)
    page = client.get("/admin/", HTTP_ACCEPT_LANGUAGE="en").content.decode()
    assert 'id="tc-language"' in page and 'value="zh-hans"' in page
    response = client.post("/i18n/setlang/", {"language": "zh-hans", "next": "/admin/"}, HTTP_ACCEPT_LANGUAGE="en")
    assert response.status_code == 302 and response["Location"] == "/admin/"
    page = client.get("/admin/", HTTP_ACCEPT_LANGUAGE="en").content.decode()
    assert "任务控制台" in page and "Task console" not in page
    confirm = client.post(
        "/admin/tasks/instance/",
        {"action": "delete_instances", "_selected_action": [running_instance.pk]},
        HTTP_ACCEPT_LANGUAGE="en",
    ).content.decode()
    assert "删除这些实例" in confirm and "此操作无法撤销" in confirm  # the confirmation page
    client.post("/i18n/setlang/", {"language": "en", "next": "/admin/"})
    assert "Task console" in client.get("/admin/", HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()


def test_the_login_page_has_the_switch_too(client):
    page = client.get("/admin/login/", HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()
    assert 'id="tc-language"' in page and "登录" in page and "切换" in page


STEP_MESSAGE_CALLS = (
    re.compile(r'\bprogress\([^,()]*,\s*"([^"]+)"\)'),  # drivers' progress callbacks
    re.compile(r'\bsteps?\.step\(\s*\d+,\s*"([^"]+)"\)'),  # operations' steps
    re.compile(r'\bsteps\.call\(\s*"([^"]+)"'),  # operations' provider calls (the step's label)
    re.compile(r'\b_spend\([^)]*,\s*"([^"]+)"\)'),  # the simulated provider's delays
)


def test_every_step_message_the_code_writes_has_a_chinese_translation():
    """Workers store step messages in English (tasks/messages.py translates them when shown):
    a new literal message in an operation or a driver must be listed there and translated."""
    found = set()
    for folder in ("providers", "tasks/operations"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            for pattern in STEP_MESSAGE_CALLS:
                found.update((m, path.name) for m in pattern.findall(text))
    assert len({m for m, _ in found}) > 40  # the scan itself works
    with translation.override("zh-hans"):
        missing = sorted((name, m) for m, name in found if messages.translate(m) == m)
    assert not missing, "add these to tasks/messages.py and translate them (scripts/messages): " + repr(missing)
