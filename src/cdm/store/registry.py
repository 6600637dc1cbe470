"""The store: a directory with a SQLite registry, item files and model folders.

Layout::

    STORE/registry.sqlite          sources, items, compartments, labels, models, events
    STORE/items/ab/<sha256>.png    one lossless file per item (content-addressed)
    STORE/models/<name>/<digest>/  diffusers folders; the registry says which one is live
    STORE/checkpoints/<name>/      SISA slice checkpoints (one per slice stage)
    STORE/work/<name>/             resumable state of an interrupted training job

Every registry write is one transaction; every file is written to a temporary name and
renamed, so a crash leaves the old state or the new one (docs/architecture.md, invariant 5).
Writers hold an exclusive lock (STORE/.lock) for the length of their work. Files that an
operation may leave behind if it is killed (item files of an uncommitted ingest, the data
of a committed forget) are named in a *cleanup intent* in the registry before they can
exist; whoever next takes the lock finishes the intent (`Store.recover`).
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import hashlib
import io
import json
import os
import shutil
import signal
import sqlite3
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from .data import item_hash
from ..errors import Busy, DataError, NotFound, StoreError

SCHEMA_VERSION = 2  # 2: an item is its source's copy, keyed (source, hash); 1 keyed items by hash alone
PARAGON = "paragon"
ROUTER = "router"
BASE = "base"  # shared base model of adapter compartments
ENCODER = "encoder"  # a text encoder trained on public sources (`cdm text --train-on`)
RESERVED = (PARAGON, ROUTER, BASE, ENCODER)  # model names that are not compartments
WEIGHTS = "diffusion_pytorch_model.safetensors"  # a diffusers model folder's weights
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's file name for an adapter's weights

ITEMS = """
CREATE TABLE items(hash TEXT NOT NULL, source TEXT NOT NULL REFERENCES sources(name),
                   compartment TEXT NOT NULL REFERENCES compartments(name),
                   slice INTEGER NOT NULL, label INTEGER REFERENCES labels(id), added TEXT NOT NULL,
                   PRIMARY KEY (source, hash));
CREATE INDEX items_by_compartment ON items(compartment, hash);
CREATE INDEX items_by_hash ON items(hash);
CREATE TABLE captions(source TEXT NOT NULL, hash TEXT NOT NULL, text TEXT NOT NULL, PRIMARY KEY (source, hash),
                      FOREIGN KEY (source, hash) REFERENCES items(source, hash));
"""
SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE labels(id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL);
CREATE TABLE sources(name TEXT PRIMARY KEY, split TEXT NOT NULL, created TEXT NOT NULL);
CREATE TABLE compartments(name TEXT PRIMARY KEY, source TEXT NOT NULL REFERENCES sources(name),
                          created TEXT NOT NULL);
CREATE TABLE models(name TEXT PRIMARY KEY, kind TEXT NOT NULL, spec TEXT NOT NULL,
                    digest TEXT NOT NULL, path TEXT NOT NULL, info TEXT NOT NULL, trained TEXT NOT NULL);
CREATE TABLE events(id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, kind TEXT NOT NULL,
                    actor TEXT NOT NULL, detail TEXT NOT NULL);
"""


@dataclass(frozen=True)
class StoreConfig:
    """Fixed at `cdm init`: what every model in the store is built for."""

    image_size: int = 8
    channels: int = 1
    seed: int = 0
    slices: int = 4
    max_labels: int = 16


@dataclass(frozen=True)
class ItemRow:
    hash: str
    source: str
    compartment: str
    slice: int
    label: int | None


@dataclass(frozen=True)
class ModelRow:
    name: str
    kind: str  # "compartment" | "paragon" | "router"
    spec: str  # digest of everything the model was trained from
    digest: str  # sha256 of the weights file
    path: str  # relative to the store root
    info: dict
    trained: str


def _migrate_v1(db: sqlite3.Connection) -> None:
    """Schema 1 to 2, in one transaction: items keyed (source, hash), captions too (a schema-1
    hash was held by one source only, so every row keeps its meaning; a store made before
    captions gets the table)."""
    db.execute("PRAGMA foreign_keys = OFF")
    try:
        db.execute("BEGIN IMMEDIATE")
        version = json.loads(db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])
        if version == 1:  # else another process migrated it while this one waited
            has_captions = db.execute("SELECT 1 FROM sqlite_master WHERE name='captions'").fetchone() is not None
            db.execute("ALTER TABLE items RENAME TO items_v1")
            if has_captions:
                db.execute("ALTER TABLE captions RENAME TO captions_v1")
            db.execute("DROP INDEX items_by_compartment")
            for stmt in ITEMS.split(";"):
                if stmt.strip():
                    db.execute(stmt)
            db.execute("INSERT INTO items SELECT hash, source, compartment, slice, label, added FROM items_v1")
            if has_captions:
                db.execute("INSERT INTO captions SELECT i.source, c.hash, c.text FROM captions_v1 c "
                           "JOIN items_v1 i ON i.hash = c.hash")
                db.execute("DROP TABLE captions_v1")
            db.execute("DROP TABLE items_v1")
            db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (json.dumps(SCHEMA_VERSION),))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    finally:
        db.execute("PRAGMA foreign_keys = ON")


def crashpoint(name: str) -> None:
    """Crash-safety tests: SIGKILL this process at a named point when CDM_CRASHPOINT names it."""
    if os.environ.get("CDM_CRASHPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def refuse_links(*folders: Path) -> None:
    """A folder imported into the store (an encoder, a UNet, a VAE) may hold no symbolic link:
    a link can point anywhere on the machine, and its target would be read and copied in."""
    links = sorted(str(p) for f in folders for p in [f, *Path(f).rglob("*")] if p.is_symlink())
    if links:
        raise DataError(f"{len(links)} symbolic link(s) in an imported folder, nothing was imported:\n  "
                        + "\n  ".join(links[:20]))


def owner_only(folder: Path) -> None:
    """Make a copied-in folder owner-only (a copy keeps its source's modes)."""
    for p in [folder, *folder.rglob("*")]:
        p.chmod(0o700 if p.is_dir() else 0o600)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def private_files():
    """Files and folders made inside are owner-only (0600/0700), whoever writes them (diffusers,
    torch, SQLite). The umask is per process: writers hold it only while they write, and
    `cdm serve`'s readers create no files (docs/security.md)."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder (owner-only), fsync, rename."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_folder_once(folder: Path, write) -> None:
    """Create a cache folder atomically: `write(tmp)` fills a temporary folder (owner-only),
    which is renamed to `folder`; if another process made it first, theirs is kept."""
    tmp = folder.parent / f".tmp-{uuid.uuid4().hex}"
    with private_files():
        write(tmp)
    try:
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


class Store:
    """Open with `Store.open(path)`; create with `Store.init(path, StoreConfig(...))`."""

    def __init__(self, root: Path, db: sqlite3.Connection, config: StoreConfig):
        self.root, self.db, self.config = root, db, config
        self._lock_fd: int | None = None

    # --- lifecycle -------------------------------------------------------------------

    @classmethod
    def init(cls, root: str | Path, config: StoreConfig) -> "Store":
        root = Path(root)
        if (root / "registry.sqlite").exists():
            raise StoreError(f"{root} is already a store")
        if root.exists() and any(root.iterdir()):
            raise StoreError(f"{root} exists and is not empty")
        if not (2 <= config.image_size <= 512 and config.channels in (1, 3)):
            raise StoreError(f"unsupported image format {config.image_size}px x {config.channels} channel(s)")
        if not 1 <= config.slices <= 64 or not 1 <= config.max_labels <= 4096:
            raise StoreError("slices must be in 1..64 and max_labels in 1..4096")
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        root.chmod(0o700)  # a store holds other people's data: owner-only (docs/security.md)
        tmp = root / f".tmp-{uuid.uuid4().hex}.sqlite"
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        db = sqlite3.connect(tmp, isolation_level=None)
        db.executescript(SCHEMA + ITEMS)
        meta = {"schema_version": SCHEMA_VERSION, "config": asdict(config), "created": now()}
        db.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
        db.execute("INSERT INTO events(time, kind, actor, detail) VALUES (?, 'init', ?, ?)",
                   (now(), _actor(), json.dumps(asdict(config))))
        db.close()
        os.replace(tmp, root / "registry.sqlite")
        return cls.open(root)

    @classmethod
    def open(cls, root: str | Path) -> "Store":
        root = Path(root)
        path = root / "registry.sqlite"
        if not path.exists():
            raise NotFound(f"{root} is not a cdm store (no registry.sqlite); create one with `cdm init`")
        db = sqlite3.connect(path, isolation_level=None, timeout=30)
        db.execute("PRAGMA foreign_keys = ON")
        db.execute("PRAGMA secure_delete = ON")  # deleted rows (a forgotten caption) are overwritten, not left in free pages
        try:
            version = json.loads(db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])
            config = StoreConfig(**json.loads(db.execute("SELECT value FROM meta WHERE key='config'").fetchone()[0]))
        except (sqlite3.DatabaseError, TypeError) as e:
            db.close()
            raise StoreError(f"{path}: not a readable cdm registry ({e})") from None
        if version == 1:
            _migrate_v1(db)
        elif version != SCHEMA_VERSION:
            db.close()
            raise StoreError(f"{path}: schema version {version} is not supported (this cdm reads {SCHEMA_VERSION})")
        store = cls(root, db, config)
        lock = root / ".lock"  # a writer empties it on release: content left means one was killed (or is at work)
        if lock.exists() and lock.stat().st_size:
            with contextlib.suppress(StoreError, OSError):  # finish the interrupted work unless a writer is at it
                with store.writing("recovery", wait=0):
                    pass
        return store

    def close(self) -> None:
        self.db.close()

    # --- the writer lock and crash recovery --------------------------------------------

    @contextlib.contextmanager
    def writing(self, what: str, wait: float = 10.0):
        """Hold the store's writer lock (re-entrant); the first holder finishes interrupted work."""
        if self._lock_fd is not None:
            yield
            return
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                    os.close(fd)
                    raise Busy(f"{self.root} is busy: {holder} holds its writer lock; "
                               "try again when that work ends") from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{what} (pid {os.getpid()}, since {now()})".encode(), 0)
        self._lock_fd = fd
        try:
            with private_files():
                self.recover()
                yield
        finally:
            self._lock_fd = None
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def add_cleanup(self, db: sqlite3.Connection, paths: list[str]) -> str:
        """Record, inside a transaction, files to delete if the operation does not finish.

        Paths are relative to the store root; an item file is spared if its item is registered
        when the intent is finished (so an ingest intent is void once the ingest commits)."""
        key = f"cleanup:{uuid.uuid4().hex}"
        self.set_meta(db, key, {"paths": sorted(set(paths)), "time": now()})
        return key

    def finish_cleanup(self, key: str) -> int:
        """Delete what an intent names, then drop the intent. Idempotent; returns paths removed."""
        spec = self.get_meta(key)
        if spec is None:
            return 0
        items = [p for p in spec["paths"] if p.startswith("items/")]
        keep = self.has_items([Path(p).stem for p in items])
        removed = 0
        for rel in spec["paths"]:
            p = self.root / rel
            if rel.startswith("items/") and Path(rel).stem in keep:
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                removed += 1
            elif p.exists():
                p.unlink(missing_ok=True)
                removed += 1
        with self.tx() as db:
            db.execute("DELETE FROM meta WHERE key=?", (key,))
        return removed

    def pending_cleanups(self) -> list[str]:
        return [k for (k,) in self.db.execute("SELECT key FROM meta WHERE key LIKE 'cleanup:%' ORDER BY key")]

    def recover(self) -> dict:
        """Finish what a killed writer left (call with the writer lock held): cleanup intents,
        temporary files, model folders the registry does not point to."""
        if self._lock_fd is None:
            raise StoreError("recover needs the writer lock")
        keys = self.pending_cleanups()
        removed = sum(self.finish_cleanup(k) for k in keys)
        temps = [p for pattern in (".tmp-*", "items/*/.tmp-*", "checkpoints/*/.tmp-*", "work/*/.tmp-*",
                                                 "eval/*/.tmp-*")
                 for p in self.root.glob(pattern)]
        for p in temps:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        models = self.root / "models"
        for d in sorted(models.iterdir()) if models.is_dir() else []:
            self.gc_model_dirs(d.name)
        if keys:
            with self.tx() as db:
                self.log(db, "recover", {"finished": keys, "removed": removed, "temporary": len(temps)})
        return dict(finished=keys, removed=removed, temporary=len(temps))

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def tx(self):
        """One registry transaction: all of it or none of it. Each one advances the generation."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
            self.db.execute("INSERT INTO meta VALUES ('generation', '1') "
                            "ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def generation(self) -> int:
        """A number that grows with every committed change to the registry: what was read at
        one generation (a loaded pipeline, say) is current while the number stays the same."""
        return self.get_meta("generation", 0)

    @contextlib.contextmanager
    def snapshot(self):
        """A consistent read of the registry: a writer's commit waits until the block ends, and
        files a commit makes obsolete are only deleted after it (docs/architecture.md, invariant 5)."""
        if self.db.in_transaction:
            yield
            return
        self.db.execute("BEGIN")
        try:
            self.db.execute("SELECT 1 FROM meta LIMIT 1").fetchall()  # take the shared lock now
            yield
        finally:
            self.db.execute("COMMIT")

    # --- meta ------------------------------------------------------------------------

    def get_meta(self, key: str, default=None):
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def set_meta(self, db: sqlite3.Connection, key: str, value) -> None:
        db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    # --- labels, sources, compartments ---------------------------------------------------

    def labels(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT name, id FROM labels ORDER BY id"))

    def label_names(self) -> dict[int, str]:
        return {i: n for n, i in self.labels().items()}

    def sources(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT name, split FROM sources ORDER BY name"))

    def compartments(self) -> dict[str, str]:
        """name -> source, in name order (the canonical order of a composition)."""
        return dict(self.db.execute("SELECT name, source FROM compartments ORDER BY name"))

    def require_compartments(self, names: list[str]) -> list[str]:
        known = self.compartments()
        unknown = [n for n in names if n not in known]
        if unknown:
            raise NotFound(f"unknown compartment(s): {', '.join(unknown)}; known: {', '.join(known) or 'none'}")
        return sorted(set(names))

    def require_source(self, name: str) -> str:
        known = self.sources()
        if name not in known:
            raise NotFound(f"unknown source {name!r}; known: {', '.join(known) or 'none'}")
        return name

    # --- items -----------------------------------------------------------------------

    def item_path(self, ihash: str) -> Path:
        return self.root / "items" / ihash[:2] / f"{ihash}.png"

    def write_item_file(self, ihash: str, pixels: np.ndarray) -> None:
        path = self.item_path(ihash)
        if path.exists():
            return
        img = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        write_atomic(path, buf.getvalue())

    def read_item(self, ihash: str) -> np.ndarray:
        path = self.item_path(ihash)
        try:
            with Image.open(path) as im:
                a = np.asarray(im, dtype=np.uint8)
        except (OSError, ValueError) as e:
            raise StoreError(f"item file {path} is unreadable ({e})") from None
        a = a.reshape(a.shape[0], a.shape[1], -1)
        if item_hash(a) != ihash:
            raise StoreError(f"item file {path} does not match its hash {ihash}: the store is damaged")
        return a

    def items(self, compartment: str | None = None) -> list[ItemRow]:
        """Items in canonical (hash, source) order, optionally of one compartment."""
        q = "SELECT hash, source, compartment, slice, label FROM items"
        rows = (self.db.execute(q + " WHERE compartment=? ORDER BY hash", (compartment,)) if compartment
                else self.db.execute(q + " ORDER BY hash, source"))
        return [ItemRow(*r) for r in rows]

    def record_ingest(self, db: sqlite3.Connection, source: str, rule: str | None, compartments: list[str],
                      new_labels: dict[str, int], rows: list[tuple], time_: str,
                      captions: dict[str, str] | None = None) -> None:
        """Inside an ingest transaction: the source (`rule` None if it exists), its compartments,
        new labels, the item rows (hash, source, compartment, slice, label id) and captions (by hash)."""
        if rule is not None:
            db.execute("INSERT INTO sources VALUES (?, ?, ?)", (source, rule, time_))
        db.executemany("INSERT OR IGNORE INTO compartments VALUES (?, ?, ?)", [(c, source, time_) for c in compartments])
        db.executemany("INSERT INTO labels VALUES (?, ?)", [(i, n) for n, i in new_labels.items()])
        db.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?)", [r + (time_,) for r in rows])
        db.executemany("INSERT INTO captions VALUES (?, ?, ?)", [(source, h, t) for h, t in sorted((captions or {}).items())])

    def delete_records(self, db: sqlite3.Connection, items: list[ItemRow], models: list[str], compartments: list[str],
                       source: str | None) -> None:
        """Inside a forget transaction: item rows and their captions, model rows, compartments and a source."""
        keys = [(r.source, r.hash) for r in items]
        db.executemany("DELETE FROM captions WHERE source=? AND hash=?", keys)
        db.executemany("DELETE FROM items WHERE source=? AND hash=?", keys)
        db.executemany("DELETE FROM models WHERE name=?", [(n,) for n in models])
        db.executemany("DELETE FROM compartments WHERE name=?", [(c,) for c in compartments])
        if source is not None:
            db.execute("DELETE FROM sources WHERE name=?", (source,))

    def drop_cleanup(self, db: sqlite3.Connection, key: str) -> None:
        """Void a cleanup intent inside the transaction that made its files live."""
        db.execute("DELETE FROM meta WHERE key=?", (key,))

    def item_rows(self, hashes: list[str], source: str | None = None) -> list[ItemRow]:
        """The registered items with these hashes (of `source`, or each source's copy), in
        canonical order."""
        rows = self._where_hash_in("SELECT hash, source, compartment, slice, label FROM items", hashes)
        return sorted((ItemRow(*r) for r in rows if source is None or r[1] == source), key=lambda r: (r.hash, r.source))

    def captions(self, rows: list[ItemRow] | None = None) -> dict[tuple[str, str], str]:
        """Captions by (source, item hash), of `rows` or of every item."""
        if rows is None:
            return {(s, h): t for s, h, t in self.db.execute("SELECT source, hash, text FROM captions "
                                                             "ORDER BY hash, source")}
        want = {(r.source, r.hash) for r in rows}
        return {(s, h): t for s, h, t in self._where_hash_in("SELECT source, hash, text FROM captions",
                                                             sorted({r.hash for r in rows})) if (s, h) in want}

    def _where_hash_in(self, select: str, hashes: list[str]):
        """Rows of `select ... WHERE hash IN (hashes)`, queried in chunks (SQLite bounds parameters)."""
        for i in range(0, len(hashes), 500):
            chunk = hashes[i:i + 500]
            yield from self.db.execute(f"{select} WHERE hash IN ({','.join('?' * len(chunk))})", chunk)

    def has_items(self, hashes: list[str], source: str | None = None) -> set[str]:
        """The hashes among `hashes` that `source` holds (or that any source holds)."""
        return {r.hash for r in self.item_rows(hashes, source)}

    def counts(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT compartment, COUNT(*) FROM items GROUP BY compartment"))

    def label_counts(self) -> dict[str, dict[int | None, int]]:
        """compartment -> {label id (None = unlabelled): count}."""
        out: dict[str, dict[int | None, int]] = {}
        for c, lab, n in self.db.execute("SELECT compartment, label, COUNT(*) FROM items GROUP BY compartment, label"):
            out.setdefault(c, {})[lab] = n
        return out

    # --- models ----------------------------------------------------------------------

    def model(self, name: str) -> ModelRow | None:
        r = self.db.execute("SELECT name, kind, spec, digest, path, info, trained FROM models WHERE name=?",
                            (name,)).fetchone()
        return None if r is None else ModelRow(*r[:5], json.loads(r[5]), r[6])

    def models(self) -> dict[str, ModelRow]:
        names = [r[0] for r in self.db.execute("SELECT name FROM models ORDER BY name")]
        return {n: self.model(n) for n in names}

    def model_dir(self, name: str) -> Path:
        row = self.model(name)
        if row is None:
            raise StoreError(f"{name!r} has no trained model; run `cdm train`")
        return self.folder(row)

    def folder(self, row: ModelRow) -> Path:
        """The live folder of a model row."""
        return self.root / row.path

    def models_dir(self, name: str) -> Path:
        """Every version of one model lives below this folder."""
        return self.root / "models" / name

    def model_versions(self, name: str) -> list[Path]:
        """Every folder of `name` on disk (the live one, and any the registry no longer points to)."""
        base = self.models_dir(name)
        return sorted(base.iterdir()) if base.is_dir() else []

    def checkpoint_dir(self, name: str) -> Path:
        """SISA slice checkpoints of one model."""
        return self.root / "checkpoints" / name

    def work_dir(self, name: str) -> Path:
        """Resumable state of one model's interrupted training job."""
        return self.root / "work" / name

    def eval_dir(self) -> Path:
        """The evaluation cache (a feature extractor trained on the store's items)."""
        return self.root / "eval"

    def relative(self, path: Path) -> str:
        return str(Path(path).relative_to(self.root))

    def new_model_dir(self, name: str) -> Path:
        """A fresh temporary folder to write a model into; `install_model` makes it live."""
        d = self.models_dir(name) / f".tmp-{uuid.uuid4().hex}"
        d.mkdir(parents=True)
        return d

    def install_model(self, name: str, kind: str, spec: str, tmp_dir: Path, weights_file: str,
                      info: dict, event: dict | None = None, actor: str | None = None, also=None) -> ModelRow:
        """Rename the finished folder to its digest, then swap the registry row in one transaction
        (with `also(db)`, more writes that must commit with it)."""
        with self.writing(f"install {name}"):
            return self._install(name, kind, spec, tmp_dir, weights_file, info, event, actor, also)

    def _install(self, name, kind, spec, tmp_dir, weights_file, info, event, actor, also=None) -> ModelRow:
        digest = file_digest(tmp_dir / weights_file)
        final = tmp_dir.parent / digest[:16]
        if final.exists():
            shutil.rmtree(tmp_dir)
        else:
            os.replace(tmp_dir, final)
        rel = str(final.relative_to(self.root))
        crashpoint("install:renamed")
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO models VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (name, kind, spec, digest, rel, json.dumps(info), now()))
            if event is not None:
                self.log(db, "train", {"model": name, "digest": digest, **event}, actor)
            if also is not None:
                also(db)
        crashpoint("install:committed")
        self.gc_model_dirs(name)
        return self.model(name)

    def gc_model_dirs(self, name: str) -> None:
        """Remove folders of `name` that the registry does not point to (old versions, crashed writes)."""
        base = self.models_dir(name)
        row = self.model(name)
        keep = (self.root / row.path).name if row else None
        if base.is_dir():
            for d in base.iterdir():
                if d.name != keep:
                    shutil.rmtree(d, ignore_errors=True)
            if keep is None:
                shutil.rmtree(base, ignore_errors=True)

    # --- events ----------------------------------------------------------------------

    def log(self, db: sqlite3.Connection, kind: str, detail: dict, actor: str | None = None) -> None:
        db.execute("INSERT INTO events(time, kind, actor, detail) VALUES (?, ?, ?, ?)",
                   (now(), kind, actor or _actor(), json.dumps(detail, sort_keys=True)))

    def events(self) -> list[dict]:
        return [dict(id=i, time=t, kind=k, actor=a, detail=json.loads(d))
                for i, t, k, a, d in self.db.execute("SELECT id, time, kind, actor, detail FROM events ORDER BY id")]


def _actor() -> str:
    try:
        return os.getlogin()
    except OSError:
        try:
            return getpass.getuser()
        except Exception:
            return "unknown"
