"""API keys: who may submit jobs, read metrics or the docs; and ``python -m service.keys``.

Keys come from ``API_KEYS`` (``NAME:KEY[:SCOPE+SCOPE]``, plain, for development) and from
``API_KEYS_FILE`` (one ``NAME sha256:HEX [SCOPE,SCOPE]`` a line: only hashes on disk, so the file
can be mounted and backed up without leaking the keys). A key is 32 random bytes, so one SHA-256
is enough to store it safely (a slow password hash protects guessable secrets; these are not).

Scopes: ``jobs`` (submit, poll, cancel: the default) and ``admin`` (also /metrics and the docs
when they are restricted). The key's *name* is what the service records (job owner, rate-limit
bucket, logs); the key itself is never logged or stored.

    python -m service.keys new alice                 # prints the key, and the line for the file
    python -m service.keys new ops --scope admin >> secrets/api_keys
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import re
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

SCOPES = ("jobs", "admin")
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_HASH = re.compile(r"^sha256:([0-9a-f]{64})$")


class KeyFileError(ValueError):
    """``API_KEYS`` or ``API_KEYS_FILE`` cannot be read; the API refuses to start."""


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _scopes(text: str, where: str) -> frozenset[str]:
    scopes = frozenset(s for s in re.split(r"[+,]", text) if s) or frozenset({"jobs"})
    unknown = scopes - set(SCOPES)
    if unknown:
        raise KeyFileError(f"{where}: unknown scope(s) {sorted(unknown)}; use {list(SCOPES)}")
    return scopes


class KeyStore:
    """The configured keys, looked up by the hash of what a request presents."""

    def __init__(self, keys: list[ApiKey]) -> None:
        self._by_digest = {k.digest: k for k in keys}

    def __len__(self) -> int:
        return len(self._by_digest)

    @classmethod
    def load(cls, plain: str, file: Path | None) -> KeyStore:
        keys: list[ApiKey] = []
        for n, item in enumerate(p.strip() for p in plain.split(",")):
            if not item:
                continue
            name, sep, rest = item.partition(":")
            key, _, scopes = rest.partition(":")
            if not sep or not key or not _NAME.match(name):
                raise KeyFileError(f"API_KEYS item {n + 1}: expected NAME:KEY[:SCOPES]")
            keys.append(ApiKey(name, digest(key), _scopes(scopes, f"API_KEYS item {n + 1}")))
        if file is not None:
            try:
                lines = Path(file).read_text().splitlines()
            except OSError as exc:
                raise KeyFileError(f"API_KEYS_FILE {file}: {exc}") from exc
            for number, line in enumerate(lines, 1):
                text = line.split("#", 1)[0].strip()
                if not text:
                    continue
                parts = text.split()
                where = f"API_KEYS_FILE {file} line {number}"
                match = _HASH.match(parts[1]) if len(parts) in (2, 3) else None
                if match is None or not _NAME.match(parts[0]):
                    raise KeyFileError(f"{where}: expected `NAME sha256:HEX [SCOPES]`")
                scopes = _scopes(parts[2] if len(parts) == 3 else "", where)
                keys.append(ApiKey(parts[0], match.group(1), scopes))
        return cls(keys)

    def find(self, presented: str) -> ApiKey | None:
        found = self._by_digest.get(digest(presented))
        # compare_digest: the lookup above is by hash, this keeps the final check constant-time.
        if found is not None and hmac.compare_digest(found.digest, digest(presented)):
            return found
        return None


def new_key() -> str:
    return "isk_" + secrets.token_urlsafe(32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.keys",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    new = sub.add_parser("new", help="make a key: the key on stderr, the file line on stdout")
    new.add_argument("name")
    new.add_argument("--scope", action="append", choices=SCOPES, default=None)
    args = parser.parse_args(argv)
    if not _NAME.match(args.name):
        parser.error("NAME: letters, digits, _ . - (at most 64)")
    key = new_key()
    scopes = ",".join(args.scope or ["jobs"])
    print(f"key for {args.name} (shown once): {key}", file=sys.stderr)
    print(f"{args.name} sha256:{digest(key)} {scopes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
