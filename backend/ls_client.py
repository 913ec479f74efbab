"""The one place a Label Studio client is built, its --label-studio-url/--api-key flags and token auth.

Label Studio 1.23 disables legacy tokens by default; a personal access token (a JWT refresh token)
is exchanged at ``/api/token/refresh/`` for short-lived access tokens, renewed before they expire.
A legacy token is sent as ``Authorization: Token <key>``. The SDK client does the same on its own.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import json
import threading
import time
from typing import Any

import requests


class LabelStudioAuthError(RuntimeError):
    """Label Studio is unknown, unreachable, or refused the API key; the message says what to set."""


def add_label_studio_flags(p: argparse.ArgumentParser, older_url_spelling: bool = False) -> None:
    """--label-studio-url and --api-key; unset, they fall back to LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY."""
    names = ["--label-studio-url", "--url"] if older_url_spelling else ["--label-studio-url"]
    p.add_argument(*names, dest="label_studio_url",
                   help="Label Studio address, e.g. http://localhost:8080 (env LABEL_STUDIO_URL)"
                        + ("; --url is an older spelling" if older_url_spelling else ""))
    p.add_argument("--api-key", help="Label Studio personal access token or legacy token (env LABEL_STUDIO_API_KEY)")


def make_client(url: str | None, api_key: str | None, purpose: str = "--project") -> Any:
    """A label-studio-sdk client for `url` with `api_key` (personal access token or legacy token)."""
    from label_studio_sdk.client import LabelStudio

    if not url or not api_key:
        raise LabelStudioAuthError(f"{purpose} needs --label-studio-url and --api-key "
                                   "(or LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY)")
    return LabelStudio(base_url=url.rstrip("/"), api_key=api_key)


def _jwt_claims(token: str) -> dict | None:
    """Unverified claims of a JWT, or None when `token` is not one."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    return claims if isinstance(claims, dict) else None


class LabelStudioAuth:
    """Authorization header for Label Studio: legacy token as-is, personal access token via refresh."""

    REFRESH_MARGIN = 30.0  # seconds before expiry when an access token is renewed

    def __init__(self, base_url: str, api_key: str, timeout: float = 10.0):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key.strip()
        self.timeout = timeout
        claims = _jwt_claims(self.api_key)
        self.is_personal_token = bool(claims and claims.get("token_type") == "refresh")
        self._access: str | None = None
        self._expires = 0.0
        self._lock = threading.Lock()

    def header(self, force_refresh: bool = False) -> dict[str, str]:
        if not self.is_personal_token:
            return {"Authorization": f"Token {self.api_key}"}
        with self._lock:
            if force_refresh or self._access is None or time.time() > self._expires - self.REFRESH_MARGIN:
                self._refresh()
            return {"Authorization": f"Bearer {self._access}"}

    def client(self) -> Any:
        """An SDK client with the same address and key."""
        return make_client(self.base_url, self.api_key)

    def _refresh(self) -> None:
        url = f"{self.base_url}/api/token/refresh/"
        try:
            r = requests.post(url, json={"refresh": self.api_key}, timeout=self.timeout)
        except requests.RequestException as e:
            raise LabelStudioAuthError(f"cannot reach Label Studio at {self.base_url} to refresh the access token: {e}")
        if r.status_code != 200:
            raise LabelStudioAuthError(
                f"Label Studio rejected the personal access token at {url} (HTTP {r.status_code}): create a new one "
                "in Account & Settings > Personal Access Token and set LABEL_STUDIO_API_KEY")
        self._access = r.json()["access"]
        claims = _jwt_claims(self._access) or {}
        self._expires = float(claims.get("exp", time.time() + 300))
