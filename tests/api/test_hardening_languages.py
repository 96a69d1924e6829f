"""Issue 18's refusals speak the request's language (issue 20), including the ones
made by middleware that runs before LocaleMiddleware."""

from __future__ import annotations

from django.test import Client, override_settings
from rest_framework.test import APIClient

from tasks.models import PortMapping
from tests.api.conftest import client_for


def test_the_size_limit_answers_in_chinese_and_in_english(alice):
    client = client_for(alice)
    zh = client.generic(
        "POST", "/api/v1/instances/", b"{}", "application/json", CONTENT_LENGTH="99999999", HTTP_ACCEPT_LANGUAGE="zh-CN"
    )
    assert (zh.status_code, zh.json()["code"]) == (413, "request_too_large")
    assert "请求体" in zh.json()["detail"]
    en = client.generic("POST", "/api/v1/instances/", b"{}", "application/json", CONTENT_LENGTH="99999999")
    assert en.json()["detail"].startswith("the request body is 99999999 bytes")
    bad = client.generic(
        "POST", "/api/v1/instances/", b"{}", "application/json", CONTENT_LENGTH="abc", HTTP_ACCEPT_LANGUAGE="zh-hans"
    )
    assert (bad.status_code, bad.json()["code"], bad.json()["detail"]) == (
        400,
        "bad_request",
        "Content-Length 请求头无效",
    )


@override_settings(LOGIN_THROTTLE_ATTEMPTS=2)
def test_the_console_login_throttle_answers_in_the_switchs_language(root):
    client = Client(REMOTE_ADDR="198.51.100.60")
    client.cookies["django_language"] = "zh-hans"
    for _ in range(2):
        client.post("/admin/login/", {"username": "root", "password": "wrong"})
    refused = client.post("/admin/login/", {"username": "root", "password": "wrong"})
    assert refused.status_code == 429
    assert refused.content.decode() == "登录失败次数过多，请稍后再试。"


@override_settings(LOGIN_THROTTLE_ATTEMPTS=1)
def test_the_api_login_throttle_and_the_port_quota_in_chinese(alice, provider, make_instance):
    api = APIClient(REMOTE_ADDR="198.51.100.61", HTTP_ACCEPT_LANGUAGE="zh-hans")
    api.post("/api/v1/auth/token/", {"username": "alice", "password": "wrong"}, format="json")
    throttled = api.post("/api/v1/auth/token/", {"username": "alice", "password": "wrong"}, format="json")
    assert throttled.status_code == 429
    assert throttled.json()["detail"].startswith("登录失败次数过多")  # DRF adds its own (Chinese) wait hint

    instance = make_instance(alice, provider)
    client = client_for(alice)
    refused = client.post(
        f"/api/v1/instances/{instance.pk}/ports/",
        {"protocol": "tcp", "guest_port": 1000, "count": 51},
        format="json",
        HTTP_ACCEPT_LANGUAGE="zh-hans",
    )
    body = refused.json()
    assert (refused.status_code, body["code"], body["resource"]) == (409, "quota_exceeded", "ports")
    assert body["detail"] == "您的配额允许 50 主机端口；此操作将使用 51"
    assert not PortMapping.objects.exists()
