"""Optional API keys (`MVKE_API_KEYS`, `MVKE_API_KEYS_FILE`).

Keys are held only as sha256 digests: a presented key (`Authorization: Bearer <key>` or
`X-API-Key: <key>`) is hashed and compared with every known digest with
`hmac.compare_digest`, all of them each time, so neither the comparison nor the number of
comparisons depends on how much of a key matched. Keys are never logged: the access log
records method, path and status only, and a 401 never echoes what was sent.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

OPEN_PATHS = frozenset(("/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/ui",
                        "/v2/health/live", "/v2/health/ready"))   # the Open Inference health routes
OPEN_PREFIXES = ("/ui/", "/docs/assets/")


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh random key and the digest to put in MVKE_API_KEYS_FILE."""
    key = "mvke_" + secrets.token_urlsafe(24)
    return key, key_digest(key)


def read_digest_file(path: str | Path) -> list[str]:
    digests = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip().lower()
        if not line:
            continue
        if len(line) != 64 or any(c not in "0123456789abcdef" for c in line):
            raise ValueError(f"{path}:{n}: expected a sha256 hex digest (64 hex characters)")
        digests.append(line)
    return digests


class ApiKeys:
    """The configured key digests; `allows(headers)` checks one request's ASGI headers."""

    def __init__(self, keys: str | None = None, keys_file: str | None = None, metrics_need_key: bool = False):
        digests = [key_digest(k.strip()) for k in (keys or "").split(",") if k.strip()]
        if keys_file:
            digests += read_digest_file(keys_file)
        self.digests = [bytes.fromhex(d) for d in dict.fromkeys(digests)]
        self.metrics_need_key = metrics_need_key

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    def protects(self, path: str) -> bool:
        if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return False
        return path != "/metrics" or self.metrics_need_key

    @staticmethod
    def presented(headers: dict[bytes, bytes]) -> bytes | None:
        auth = headers.get(b"authorization")
        if auth is not None:
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
        key = headers.get(b"x-api-key")
        return key.strip() if key else None

    def allows(self, headers: dict[bytes, bytes]) -> bool:
        key = self.presented(headers)
        if key is None:
            return False
        digest = hashlib.sha256(key).digest()
        ok = False
        for known in self.digests:
            ok |= hmac.compare_digest(digest, known)
        return ok
