"""Access policies: which compartments each user may compose.

A policy is TOML; each user names sources (all their compartments) and/or compartments,
and, for `cdm serve`, the SHA-256 of each API key they may use (`cdm key` makes one) and
whether they are an admin (may forget through the API):

    [users.alice]
    sources = ["digits"]
    compartments = ["museum"]
    keys = ["<sha256 of alice's key>"]
    admin = false

A user's composition is exactly their allowed set, and only those models are opened.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .store import Store, StoreError


@dataclass(frozen=True)
class UserRule:
    sources: tuple[str, ...] = ()
    compartments: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()  # sha256 hex of API keys
    admin: bool = False


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh API key and the hash to put in the policy."""
    key = "cdm_" + secrets.token_urlsafe(24)
    return key, hash_key(key)


@dataclass(frozen=True)
class Policy:
    users: dict[str, UserRule]
    text: str
    origin: str

    @classmethod
    def parse(cls, text: str, origin: str = "<policy>") -> "Policy":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise StoreError(f"{origin}: not valid TOML ({e})") from None
        extra = set(data) - {"users"}
        if extra:
            raise StoreError(f"{origin}: unknown top-level field(s) {', '.join(sorted(extra))}; expected [users.NAME]")
        users = {}
        for name, rule in data.get("users", {}).items():
            if not isinstance(rule, dict) or set(rule) - {"sources", "compartments", "keys", "admin"}:
                raise StoreError(f"{origin}: users.{name} may only have 'sources', 'compartments', 'keys' lists "
                                 f"and 'admin'")
            for key in ("sources", "compartments", "keys"):
                v = rule.get(key, [])
                if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                    raise StoreError(f"{origin}: users.{name}.{key} must be a list of strings")
            bad = [k for k in rule.get("keys", []) if not re.fullmatch(r"[0-9a-f]{64}", k)]
            if bad:
                raise StoreError(f"{origin}: users.{name}.keys must hold SHA-256 hex digests of keys (`cdm key`), "
                                 f"never keys themselves")
            if not isinstance(rule.get("admin", False), bool):
                raise StoreError(f"{origin}: users.{name}.admin must be true or false")
            users[name] = UserRule(tuple(rule.get("sources", [])), tuple(rule.get("compartments", [])),
                                   tuple(rule.get("keys", [])), rule.get("admin", False))
        owners: dict[str, str] = {}
        for name, r in users.items():
            for k in r.keys:
                if owners.setdefault(k, name) != name:
                    raise StoreError(f"{origin}: one key is listed for users {owners[k]} and {name}")
        if not users:
            raise StoreError(f"{origin}: names no users")
        return cls(users, text, origin)

    @classmethod
    def load(cls, path: str | Path) -> "Policy":
        p = Path(path)
        if not p.is_file():
            raise StoreError(f"policy file not found: {p}")
        return cls.parse(p.read_text(), str(p))

    def user_for_key(self, key: str | None) -> str | None:
        """The user an API key belongs to, or None (compared as hashes, in constant time)."""
        if not key:
            return None
        h = hash_key(key)
        found = None
        for name, r in self.users.items():
            for k in r.keys:
                if hmac.compare_digest(k, h):
                    found = name
        return found

    def check(self, store: Store) -> None:
        """Every source and compartment the policy names must exist in the store."""
        comps, sources = store.compartments(), store.sources()
        bad = [f"users.{u}.sources: {s}" for u, r in self.users.items() for s in r.sources if s not in sources]
        bad += [f"users.{u}.compartments: {c}" for u, r in self.users.items() for c in r.compartments if c not in comps]
        if bad:
            raise StoreError(f"{self.origin} names unknown source(s)/compartment(s): {'; '.join(bad)}")

    def allowed(self, store: Store, user: str) -> list[str]:
        if user not in self.users:
            raise StoreError(f"unknown user {user!r} in {self.origin}; known: {', '.join(sorted(self.users))}")
        self.check(store)
        r = self.users[user]
        names = {c for c, s in store.compartments().items() if s in r.sources} | set(r.compartments)
        if not names:
            raise StoreError(f"user {user!r} may use no compartment under {self.origin}")
        return sorted(names)


def store_policy(store: Store) -> Policy | None:
    text = store.get_meta("policy")
    return None if text is None else Policy.parse(text, "the store's default policy")


def set_store_policy(store: Store, policy: Policy, actor: str | None = None) -> None:
    with store.writing("policy"), store.tx() as db:
        policy.check(store)
        store.set_meta(db, "policy", policy.text)
        store.log(db, "policy", {"users": {u: dict(sources=list(r.sources), compartments=list(r.compartments))
                                           for u, r in policy.users.items()}, "origin": policy.origin}, actor)
