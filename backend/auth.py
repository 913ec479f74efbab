"""Who may call the backend: HTTP basic auth for Label Studio's ML connection, a secret for its webhooks.

Label Studio sends the ML connection's basic auth user/password on /setup, /predict, /train and the
Start Training /webhook call, but the webhook it creates for annotation events carries only what the
project's webhook settings hold: extra headers and the URL. WEBHOOK_SECRET, sent as the
X-Webhook-Secret header or the `secret` query parameter, lets those webhooks reach /webhook (and only
/webhook) while basic auth protects everything else.
"""
from __future__ import annotations

import hmac
import threading
import time

from werkzeug.datastructures import Authorization

WEBHOOK_SECRET_HEADER = "X-Webhook-Secret"
WEBHOOK_SECRET_PARAM = "secret"


def _same(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


class RequestAuth:
    """Checks credentials and remembers webhook calls it refused, so /health can say why training never starts."""

    def __init__(self, basic: tuple[str, str] | None, webhook_secret: str | None):
        self.basic = basic
        self.webhook_secret = webhook_secret or None
        self._lock = threading.Lock()
        self.webhooks_refused = 0
        self.last_webhook_refused: float | None = None

    @property
    def enabled(self) -> bool:
        return self.basic is not None

    def basic_ok(self, auth: Authorization | None) -> bool:
        """True without basic auth configured, or when the request carries the right user and password."""
        if self.basic is None:
            return True
        return auth is not None and auth.type == "basic" and _same(auth.username, self.basic[0]) and \
            _same(auth.password, self.basic[1])

    def webhook_secret_ok(self, header: str | None, param: str | None) -> bool:
        """True when WEBHOOK_SECRET is set and the header or the query parameter carries it."""
        if self.webhook_secret is None:
            return False
        return _same(header, self.webhook_secret) or _same(param, self.webhook_secret)

    def refused_webhook(self) -> None:
        with self._lock:
            self.webhooks_refused += 1
            self.last_webhook_refused = time.time()

    def warnings(self) -> list[str]:
        """What stops Label Studio's annotation webhooks from authenticating, in words for the operator."""
        if self.basic is None:
            return []
        out = []
        if self.webhook_secret is None:
            out.append("basic auth is on but WEBHOOK_SECRET is not set: Label Studio's annotation webhooks carry no "
                       "credentials, so they are refused (401) and annotations never start training. Set "
                       "WEBHOOK_SECRET and add it to the project's webhook as the X-Webhook-Secret header "
                       "(README: Basic auth and webhooks)")
        with self._lock:
            refused, last = self.webhooks_refused, self.last_webhook_refused
        if refused:
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(last))
            out.append(f"{refused} webhook call(s) refused for missing credentials, the last at {when}: add the "
                       "X-Webhook-Secret header (or ?secret=) to the project's webhook in Label Studio")
        return out
