"""POST /api/v1/auth/token/ is throttled before any password hash; DELETE revokes the token (issue 18, item 3)."""

from __future__ import annotations

import pytest
from django.contrib.auth.hashers import MD5PasswordHasher
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from tasks.api import throttle

TOKEN = "/api/v1/auth/token/"


class CountingHasher(MD5PasswordHasher):
    """The test personas' hasher, counting every hash it computes (check or dummy set)."""

    calls = 0

    def encode(self, password, salt):
        type(self).calls += 1
        return super().encode(password, salt)


@pytest.fixture
def hashes(settings):
    settings.PASSWORD_HASHERS = [f"{__name__}.CountingHasher"]
    CountingHasher.calls = 0
    return CountingHasher


def login(username, password, address="198.51.100.7", **headers):
    client = APIClient(REMOTE_ADDR=address, **headers)
    return client.post(TOKEN, {"username": username, "password": password}, format="json")


def test_the_eleventh_wrong_password_is_429_and_computes_no_hash(alice, hashes):
    for _ in range(10):
        assert login("alice", "wrong").status_code == 400
    assert hashes.calls == 10
    for _ in range(200):  # the flood: 200 wrong passwords in a row
        refused = login("alice", "wrong")
        assert refused.status_code == 429
    assert hashes.calls == 10  # not one hash for the 200 refused attempts
    body = refused.json()
    assert body["code"] == "throttled"
    assert 1 <= int(refused["Retry-After"]) <= 60
    # Even the right password waits: the username is locked for the window.
    assert login("alice", "alice-pass-123", address="203.0.113.9").status_code == 429
    assert hashes.calls == 10


def test_per_client_address_across_usernames(alice, bob, hashes):
    for n in range(10):
        assert login(f"nobody{n}", "x").status_code == 400  # unknown users cost a dummy hash each
    assert login("bob", "bob-pass-123").status_code == 429
    assert hashes.calls == 10
    # Another address is not affected, nor is bob's username.
    assert login("bob", "bob-pass-123", address="198.51.100.8").status_code == 200


def test_per_username_across_addresses(alice, hashes):
    for n in range(10):
        assert login("Alice" if n % 2 else "alice", "wrong", address=f"10.0.0.{n}").status_code == 400
    assert login("alice", "wrong", address="10.0.1.1").status_code == 429
    assert hashes.calls == 10


def test_successful_logins_do_not_count(alice):
    for _ in range(30):
        assert login("alice", "alice-pass-123").status_code == 200


def test_the_window_ends(alice, monkeypatch):
    now = [1_000_000.0 * 60]
    monkeypatch.setattr(throttle, "_now", lambda: now[0])
    for _ in range(10):
        login("alice", "wrong")
    refused = login("alice", "alice-pass-123")
    assert (refused.status_code, refused["Retry-After"]) == (429, "60")
    now[0] += 59
    assert login("alice", "alice-pass-123")["Retry-After"] == "1"
    now[0] += 1
    assert login("alice", "alice-pass-123").status_code == 200


def test_a_forged_forwarded_for_does_not_escape_the_address_limit(alice, settings):
    for n in range(10):
        login(f"u{n}", "x", HTTP_X_FORWARDED_FOR=f"192.0.2.{n}")
    assert login("alice", "alice-pass-123", HTTP_X_FORWARDED_FOR="192.0.2.200").status_code == 429


def test_behind_one_trusted_proxy_the_forwarded_address_counts(alice, settings):
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "NUM_PROXIES": 1}
    for n in range(10):
        login(f"u{n}", "x", address="10.9.9.9", HTTP_X_FORWARDED_FOR="192.0.2.1")
    assert login("alice", "alice-pass-123", address="10.9.9.9", HTTP_X_FORWARDED_FOR="192.0.2.1").status_code == 429
    # Another client behind the same proxy logs in.
    assert login("alice", "alice-pass-123", address="10.9.9.9", HTTP_X_FORWARDED_FOR="192.0.2.2").status_code == 200


def test_a_flood_leaves_the_rest_of_the_api_alone(alice, bob, hashes):
    """While wrong passwords flood in, other callers' requests compute no hash and answer as usual."""
    client = APIClient()
    token = Token.objects.create(user=bob).key
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    for _ in range(10):
        login("alice", "wrong")
    before = hashes.calls
    for _ in range(50):
        assert login("alice", "wrong").status_code == 429
        assert client.get("/api/v1/tasks/").status_code == 200
    assert hashes.calls == before


def test_delete_revokes_the_callers_token(alice, bob, anon):
    token = login("alice", "alice-pass-123").json()["token"]
    other = Token.objects.create(user=bob).key
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    assert client.get("/api/v1/tasks/").status_code == 200
    assert client.delete(TOKEN).status_code == 204
    assert client.get("/api/v1/tasks/").status_code == 401
    assert not Token.objects.filter(user=alice).exists()
    assert Token.objects.filter(key=other).exists()
    # Anonymous: 401; a new login issues a fresh token.
    assert anon.delete(TOKEN).status_code == 401
    fresh = login("alice", "alice-pass-123").json()["token"]
    assert fresh != token


def test_the_console_login_is_throttled_too(root, hashes):
    from django.test import Client

    client = Client(REMOTE_ADDR="198.51.100.50")
    for _ in range(10):
        page = client.post("/admin/login/", {"username": "root", "password": "wrong"})
        assert page.status_code == 200  # the form again
    calls = hashes.calls
    refused = client.post("/admin/login/", {"username": "root", "password": "root-pass-123"})
    assert (refused.status_code, hashes.calls) == (429, calls)
    assert int(refused["Retry-After"]) >= 1
    # Another staff member from another address logs in (a redirect) as usual.
    from django.contrib.auth import get_user_model

    get_user_model().objects.create_user("op2", password="op2-pass-123", is_staff=True)
    other = Client(REMOTE_ADDR="198.51.100.51")
    assert other.post("/admin/login/", {"username": "op2", "password": "op2-pass-123"}).status_code == 302
