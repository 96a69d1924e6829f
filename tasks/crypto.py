"""Secrets at rest: Fernet (AES-128-CBC + HMAC) keyed from settings.SECRETS_KEY."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import string
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken
from django.conf import settings


@lru_cache(maxsize=4)
def _fernet(key: str) -> Fernet:
    digest = hashlib.sha256(("cloudhost-secrets:" + key).encode()).digest()
    return Fernet(base64.urlsafe_b64encode(digest))


def encrypt(plaintext: str) -> str:
    return _fernet(settings.SECRETS_KEY).encrypt(plaintext.encode()).decode()


def decrypt(ciphertext: str) -> str:
    try:
        return _fernet(settings.SECRETS_KEY).decrypt(ciphertext.encode()).decode()
    except InvalidToken as exc:
        raise ValueError("secret cannot be decrypted: wrong SECRETS_KEY or corrupted value") from exc


def encrypt_json(data: dict) -> str:
    return encrypt(json.dumps(data, sort_keys=True)) if data else ""


def decrypt_json(ciphertext: str) -> dict:
    return json.loads(decrypt(ciphertext)) if ciphertext else {}


PASSWORD_ALPHABET = string.ascii_letters + string.digits + "-_.+="


def generate_password(length: int = 20) -> str:
    while True:
        pw = "".join(secrets.choice(PASSWORD_ALPHABET) for _ in range(length))
        if any(c.isdigit() for c in pw) and any(c.islower() for c in pw) and any(c.isupper() for c in pw):
            return pw
