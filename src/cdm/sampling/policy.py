"""Access policies: which compartments each user may compose, and who may forget what.

A policy is TOML; each user names sources (all their compartments) and/or compartments,
and, for `cdm serve`, the SHA-256 of each API key they may use (`cdm key` makes one):

    [users.alice]
    sources = ["digits"]
    compartments = ["museum"]
    keys = ["<sha256 of alice's key>"]
    routers = ["ito", "uniform"]   # optional: the routers alice may use (default: all)
    admin = false                  # true: may forget within this rule; "store": anywhere

A user's composition is exactly the allowed compartments that exist now, and only those
models are opened. A name that does not exist (a forgotten source, say) grants nothing and
changes no other user's rights; `Policy.missing` reports it (docs/security.md).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import tomllib
from dataclasses import dataclass
from pathlib import Path


from .router_specs import ROUTERS
from ..store.data import read_text
from ..store.registry import Store
from ..errors import DataError, Forbidden, NotFound, StoreError

RULE_FIELDS = ("sources", "compartments", "keys", "routers", "admin")


@dataclass(frozen=True)
class UserRule:
    sources: tuple[str, ...] = ()
    compartments: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()  # sha256 hex of API keys
    admin: bool | str = False  # True: may forget within this rule; "store": anywhere in the store
    routers: tuple[str, ...] = ROUTERS  # the routers this user may sample with


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh API key and the hash to put in the policy."""
    key = "cdm_" + secrets.token_urlsafe(24)
    return key, hash_key(key)


def _parse_rule(origin: str, name: str, rule) -> UserRule:
    where = f"{origin}: users.{name}"
    if not isinstance(rule, dict):
        raise DataError(f"{where} must be a table with {', '.join(RULE_FIELDS)}, got {type(rule).__name__}")
    extra = sorted(set(rule) - set(RULE_FIELDS))
    if extra:
        raise DataError(f"{where}: unknown field(s) {', '.join(extra)}; a rule may have {', '.join(RULE_FIELDS)}")
    for key in ("sources", "compartments", "keys", "routers"):
        v = rule.get(key, [])
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise DataError(f"{where}.{key} must be a list of strings")
    if any(not re.fullmatch(r"[0-9a-f]{64}", k) for k in rule.get("keys", [])):
        raise DataError(f"{where}.keys must hold SHA-256 hex digests of keys (`cdm key`), never keys themselves")
    routers = rule.get("routers", list(ROUTERS))
    unknown = sorted(set(routers) - set(ROUTERS))
    if unknown:
        raise DataError(f"{where}.routers: unknown router(s) {', '.join(unknown)}; available: {', '.join(ROUTERS)}")
    admin = rule.get("admin", False)
    if not (admin is False or admin is True or admin == "store"):
        raise DataError(f'{where}.admin must be false, true (forget within this rule) or "store" (anywhere)')
    return UserRule(tuple(rule.get("sources", [])), tuple(rule.get("compartments", [])), tuple(rule.get("keys", [])),
                    admin, tuple(r for r in ROUTERS if r in routers))


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
            raise DataError(f"{origin}: not valid TOML ({e})") from None
        except RecursionError:
            raise DataError(f"{origin}: not valid TOML (nested too deeply)") from None
        extra = set(data) - {"users"}
        if extra:
            raise DataError(f"{origin}: unknown top-level field(s) {', '.join(sorted(extra))}; expected [users.NAME]")
        table = data.get("users", {})
        if not isinstance(table, dict):
            raise DataError(f"{origin}: users must be [users.NAME] tables, got {type(table).__name__}")
        users = {name: _parse_rule(origin, name, rule) for name, rule in table.items()}
        owners: dict[str, str] = {}
        for name, r in users.items():
            for k in r.keys:
                if owners.setdefault(k, name) != name:
                    raise DataError(f"{origin}: one key is listed for users {owners[k]} and {name}")
        if not users:
            raise DataError(f"{origin}: names no users")
        return cls(users, text, origin)

    @classmethod
    def load(cls, path: str | Path) -> "Policy":
        p = Path(path)
        if not p.is_file():
            raise StoreError(f"policy file not found: {p}")
        return cls.parse(read_text(p), str(p))

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

    def missing(self, store: Store) -> dict[str, list[str]]:
        """Per user, the names in their rule that the store does not hold (they grant nothing)."""
        comps, sources = store.compartments(), store.sources()
        out: dict[str, list[str]] = {}
        for u, r in self.users.items():
            gone = [f"users.{u}.sources: {s}" for s in r.sources if s not in sources]
            gone += [f"users.{u}.compartments: {c}" for c in r.compartments if c not in comps]
            if gone:
                out[u] = gone
        return out

    def check(self, store: Store) -> None:
        """Refuse a policy that names sources or compartments the store does not hold (typos)."""
        bad = [m for ms in self.missing(store).values() for m in ms]
        if bad:
            raise DataError(f"{self.origin} names source(s)/compartment(s) the store does not hold: {'; '.join(bad)}. "
                             "Such names grant nothing; pass --allow-missing to set it anyway")

    def rule(self, user: str) -> UserRule:
        if user not in self.users:
            raise NotFound(f"unknown user {user!r} in {self.origin}; known: {', '.join(sorted(self.users))}")
        return self.users[user]

    def allowed(self, store: Store, user: str) -> list[str]:
        """The compartments `user` may compose now: those of their sources, and those they name
        that exist. Empty when nothing they name exists; never affected by other users' rules."""
        r = self.rule(user)
        comps = store.compartments()
        return sorted(c for c, s in comps.items() if s in r.sources or c in r.compartments)

    def check_router(self, user: str, router: str, reveal: bool = True) -> None:
        r = self.rule(user)
        if router not in r.routers:
            raise Forbidden(f"{_who(user, reveal)} may not use the {router} router"
                            + (f" (policy allows: {', '.join(r.routers)})" if reveal else ""))

    def resolve(self, store: Store, user: str, router: str, want: list[str] | None = None,
                reveal: bool = True) -> list[str]:
        """The compartments a request of `user` composes: `want` (default: all they may use now),
        with `router`; `Forbidden` otherwise. This is where access is decided, for the CLI and
        the HTTP service alike. With `reveal` False (a client over HTTP) the message names no
        compartment, so it reads the same whether a refused one exists or not."""
        self.check_router(user, router, reveal)
        mine = self.allowed(store, user)
        if not mine:
            raise Forbidden(f"{_who(user, reveal)} may use no compartment at present"
                            + (": " + "; ".join(self.missing(store).get(user, ["their rule names none"]))
                               + " (not in the store)" if reveal else ""))
        refused = sorted(set(want or ()) - set(mine))
        if refused:
            raise Forbidden(f"{_who(user, reveal)} may not use: {', '.join(refused)}" if reveal else
                            f"{_who(user, reveal)} may not use the requested compartment(s)")
        return sorted(set(want)) if want else mine

    def may_forget(self, store: Store, user: str, items: list[str] | None = None, source: str | None = None,
                   compartment: str | None = None) -> bool:
        """Admin scope: "store" admins may forget anything; `admin = true` only existing data within
        their own rule (a source they name, a compartment or items inside what they may use)."""
        r = self.rule(user)
        if r.admin == "store":
            return True
        if r.admin is not True:
            return False
        mine = set(self.allowed(store, user))
        if source is not None and not items:
            return source in r.sources and source in store.sources()
        if compartment is not None:
            return compartment in mine
        if source is not None and source not in r.sources:  # items of a source: that source must be theirs
            return False
        held = {row.hash for row in store.item_rows(items or [], source) if row.compartment in mine}
        return bool(items) and held == set(items)


def _who(user: str, reveal: bool) -> str:
    return f"user {user!r}" if reveal else "this key"


def store_policy(store: Store) -> Policy | None:
    text = store.get_meta("policy")
    return None if text is None else Policy.parse(text, "the store's default policy")


def set_store_policy(store: Store, policy: Policy, actor: str | None = None, allow_missing: bool = False) -> None:
    """Make `policy` the store's default. Names the store does not hold are refused (typos) unless
    `allow_missing`; a stored policy whose names are later forgotten stays valid."""
    with store.writing("policy"), store.tx() as db:
        if not allow_missing:
            policy.check(store)
        store.set_meta(db, "policy", policy.text)
        store.log(db, "policy", {"users": {u: dict(sources=list(r.sources), compartments=list(r.compartments),
                                                   routers=list(r.routers), admin=r.admin)
                                           for u, r in policy.users.items()}, "origin": policy.origin}, actor)
