"""The login throttle of ``POST /api/v1/auth/token/`` (API.md).

After ``LOGIN_THROTTLE_ATTEMPTS`` (10) failed attempts for one username, or from
one client address, within a window of ``LOGIN_THROTTLE_WINDOW_SECONDS`` (60),
further attempts are refused with 429 and ``Retry-After`` until the window ends.

The check comes BEFORE the password hash is computed, and an attempt is counted
before its hash too (an atomic increment where the store has one): a refused
attempt costs two cache round trips, never a hash, so a flood of wrong passwords
cannot occupy the web workers with hashing and slow the rest of the API. A
successful login takes its own attempt back, so users who type their password
right are never counted.

Counters are fixed windows (the minute number is part of the key) in the cache
alias ``throttle`` (settings): Redis when the system runs on Redis, else a file
cache in VAR_DIR shared by every process of the machine. Usernames count
case-insensitively and are hashed into the key (any input is a valid key).
"""

from __future__ import annotations

import hashlib
import math
import time

from django.conf import settings
from django.core.cache import caches
from rest_framework.throttling import BaseThrottle

CACHE_ALIAS = "throttle"


def _now() -> float:
    return time.time()


def _cache():
    return caches[CACHE_ALIAS]


def client_address(request) -> str:
    """REMOTE_ADDR, or the X-Forwarded-For entry DRF's NUM_PROXIES (DJANGO_NUM_PROXIES) trusts."""
    return BaseThrottle().get_ident(request) or "unknown"


def _keys(username: str | None, address: str, window: int) -> list[str]:
    def digest(value: str) -> str:
        return hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()[:32]

    keys = [f"login:a:{digest(address)}:{window}"]
    if username:
        keys.append(f"login:u:{digest(username.casefold())}:{window}")
    return keys


def _increment(cache, key: str, delta: int, ttl: int) -> int:
    cache.add(key, 0, timeout=ttl)
    try:
        return cache.incr(key, delta) if delta >= 0 else cache.decr(key, -delta)
    except ValueError:  # expired between add and incr
        cache.set(key, max(delta, 0), timeout=ttl)
        return max(delta, 0)


class Attempt:
    """One login attempt: ``begin`` counts it (or says how long to wait), ``succeeded`` takes it back."""

    def __init__(self, username, address: str):
        self.window_seconds = settings.LOGIN_THROTTLE_WINDOW_SECONDS
        now = _now()
        self.window = int(now // self.window_seconds)
        self.retry_after = max(1, math.ceil((self.window + 1) * self.window_seconds - now))
        self.keys = _keys(username if isinstance(username, str) else None, address, self.window)
        self.first_refusal = False

    def begin(self) -> int | None:
        """Count the attempt; the seconds to wait if it is over the limit (then no hash may follow)."""
        cache = _cache()
        ttl = self.window_seconds + 5
        counts = [_increment(cache, key, 1, ttl) for key in self.keys]
        # The first refusal of a window is worth a log line; the rest of a flood is not.
        self.first_refusal = settings.LOGIN_THROTTLE_ATTEMPTS + 1 in counts
        if max(counts) > settings.LOGIN_THROTTLE_ATTEMPTS:
            return self.retry_after
        return None

    def succeeded(self) -> None:
        cache = _cache()
        for key in self.keys:
            _increment(cache, key, -1, self.window_seconds + 5)


class AdminLoginThrottleMiddleware:
    """The same throttle on the console's login form (``POST /admin/login/``): refused with
    429 before Django's login view computes a hash; a successful login (a redirect) takes
    its attempt back."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if request.method != "POST" or request.path != "/admin/login/":
            return self.get_response(request)
        from django.http import HttpResponse
        from django.utils import translation

        attempt = Attempt(request.POST.get("username"), client_address(request))
        wait = attempt.begin()
        if wait is not None:
            # Before LocaleMiddleware: the language switch's cookie or Accept-Language, here.
            with translation.override(translation.get_language_from_request(request)):
                text = translation.gettext("Too many failed login attempts; try again later.")
            response = HttpResponse(text, status=429, content_type="text/plain; charset=utf-8")
            response["Retry-After"] = str(wait)
            return response
        response = self.get_response(request)
        if response.status_code == 302:
            attempt.succeeded()
        return response
