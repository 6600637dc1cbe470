"""Hardening of the store and `cdm serve` (docs/security.md): policies that survive
forgetting, labels that cannot carry markup, no existence leaks, admin scope, fair queueing,
bad input as 4xx, no symlinks followed at ingest, owner-only files, clear policy errors."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import shutil
import socket
import sqlite3
import stat
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cdm.app import api
from cdm.store import data as cdm_data
from cdm.app.cli import app as cli_app
from cdm.errors import DataError
from cdm.store.data import Item, load_builtin
from cdm.ingest.folders import load_folder
from cdm.training.forget import forget
from cdm.sampling.policy import Policy, new_key
from cdm.serving.admission import Admission, Deadline, TokenBucket
from cdm.serving.config import ServeConfig
from cdm.serving.routes import create_app
from cdm.store.registry import Store

from .conftest import make_store
from .test_serve import Server

USERS = ("alice", "bob", "root", "ops", "carol", "dave")
KEYS = {u: new_key() for u in USERS}
POLICY = f"""
[users.alice]
compartments = ["digits-1"]
keys = ["{KEYS['alice'][1]}"]
[users.bob]
sources = ["museum"]
keys = ["{KEYS['bob'][1]}"]
[users.root]
sources = ["digits"]
keys = ["{KEYS['root'][1]}"]
admin = true
[users.ops]
sources = ["digits", "museum"]
keys = ["{KEYS['ops'][1]}"]
admin = "store"
[users.carol]
sources = ["digits"]
routers = ["ito", "uniform"]
keys = ["{KEYS['carol'][1]}"]
[users.dave]
sources = ["digits"]
keys = ["{KEYS['dave'][1]}"]
"""
SLOW = {"n": 8, "steps": 1000, "guidance": 2.0, "label": "1"}


def H(user: str) -> dict:
    return {"X-API-Key": KEYS[user][0]}


@pytest.fixture(scope="module")
def template(tmp_path_factory, digits):
    """digits (iid:2) and a museum whose only label, 'cat', is in no digits compartment."""
    path = tmp_path_factory.mktemp("hard") / "s"
    s = make_store(path, digits[:60], "iid:2")
    api.ingest(s, "museum", [Item(it.pixels, "cat", it.origin) for it in load_builtin("digits", "test")[:20]], "one")
    api.train(s)
    s.close()
    return path


@pytest.fixture
def served(tmp_path, template):
    def start(policy: str = POLICY, **cfg):
        shutil.copytree(template, tmp_path / "s", dirs_exist_ok=True)
        return Server(create_app(tmp_path / "s", Policy.parse(policy),
                                 ServeConfig(**{"max_n": 8, "max_steps": 40, **cfg})))
    return start


# 1. forgetting never locks anyone else out -----------------------------------------------


def test_forgetting_a_source_leaves_every_other_user_served(served, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="cdm")
    req = {"n": 1, "steps": 3}
    with served() as url, httpx.Client(base_url=url, timeout=120) as c:
        r = c.post("/v1/admin/forget", json={"source": "museum"}, headers=H("ops"))
        assert r.status_code == 200, r.text
        assert c.get("/v1/compartments", headers=H("alice")).json()["compartments"] == ["digits-1"]
        assert c.get("/v1/compartments", headers=H("root")).json()["compartments"] == ["digits-0", "digits-1"]
        for user in ("alice", "root", "ops"):
            r = c.post("/v1/generate", json=req, headers=H(user))
            assert r.status_code == 200, (user, r.text)
        assert c.get("/v1/compartments", headers=H("bob")).json()["compartments"] == []
        r = c.post("/v1/generate", json=req, headers=H("bob"))
        assert r.status_code == 403 and "no compartment" in r.json()["detail"]
    assert any("users.bob.sources: museum" in rec.getMessage() for rec in caplog.records)
    # a restart with the same policy is not refused, and serves the others as before
    with Server(create_app(tmp_path / "s", Policy.parse(POLICY), ServeConfig(max_steps=40))) as url:
        assert httpx.post(url + "/v1/generate", json=req, headers=H("alice"), timeout=120).status_code == 200


def test_policy_names_that_grant_nothing_are_reported_not_fatal(tmp_path, digits):
    s = make_store(tmp_path / "s", digits[:30], "iid:2")
    pol = Policy.parse(POLICY.replace('sources = ["museum"]', 'sources = ["museum"]\ncompartments = ["digits-0"]'))
    assert pol.allowed(s, "alice") == ["digits-1"]  # bob's rule names a missing source: alice is unaffected
    assert pol.allowed(s, "bob") == ["digits-0"]
    assert pol.missing(s)["bob"] == ["users.bob.sources: museum"]
    assert pol.missing(s)["ops"] == ["users.ops.sources: museum"] and "alice" not in pol.missing(s)
    s.close()
    runner = CliRunner()
    (tmp_path / "p.toml").write_text(POLICY)
    r = runner.invoke(cli_app, ["policy", str(tmp_path / "s"), "--set", str(tmp_path / "p.toml")])
    assert r.exit_code == 2 and "users.bob.sources: museum" in r.output and "--allow-missing" in r.output
    with Store.open(tmp_path / "s") as s2:
        assert s2.get_meta("policy") is None  # nothing was set
    r = runner.invoke(cli_app, ["policy", str(tmp_path / "s"), "--set", str(tmp_path / "p.toml"), "--allow-missing"])
    assert r.exit_code == 0, r.output
    st = json.loads(runner.invoke(cli_app, ["status", str(tmp_path / "s"), "--json"]).stdout)
    assert st["policy"]["bob"] == {"compartments": [], "restricted": True, "missing": ["users.bob.sources: museum"]}
    assert st["policy"]["alice"]["compartments"] == ["digits-1"]
    r = runner.invoke(cli_app, ["sample", str(tmp_path / "s"), "--user", "bob", "-n", "1"])
    assert r.exit_code == 2 and "no compartment" in r.output and "museum" in r.output


# 2. labels cannot carry markup ----------------------------------------------------------


def _png(path, value=0, size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8)).save(path)


def test_labels_are_validated_at_ingest(tmp_path, digits):
    LABEL_MAX = getattr(cdm_data, "LABEL_MAX", 64)
    bad = ["<img src=x onerror=alert(1)>", "a" * (LABEL_MAX + 1), " padded", "tab\there"]
    folder = tmp_path / "in"
    for i, name in enumerate(bad + ["café", "T-shirt (v2)", "x" * LABEL_MAX]):
        _png(folder / name / "a.png", i * 20)
    s = make_store(tmp_path / "s", digits[:10], "one")
    before = sorted(p.relative_to(s.root) for p in s.root.rglob("*"))
    with pytest.raises(DataError) as e:
        api.ingest(s, "shop", load_folder(folder, 8, 1), "one")
    for name in bad:
        assert repr(name) in str(e.value)
    assert "café" not in str(e.value)
    assert sorted(p.relative_to(s.root) for p in s.root.rglob("*")) == before and len(s.items()) == 10
    for good in ("café", "T-shirt (v2)", "x" * LABEL_MAX, "7"):
        assert cdm_data.check_label(good) == good


def test_the_api_accepts_every_label_ingest_accepts(served):
    with served() as url:
        schema = httpx.get(url + "/openapi.json").json()
    label = schema["components"]["schemas"]["GenerateIn"]["properties"]["label"]
    assert cdm_data.LABEL_MAX in [x.get("maxLength") for x in label.get("anyOf", [label])]


def test_page_renders_markup_labels_as_text_under_a_strict_csp(served, tmp_path):
    from playwright.sync_api import sync_playwright

    evil = '<img src=x onerror="window.pwned=1">'
    with served() as url, sync_playwright() as p:
        with sqlite3.connect(tmp_path / "s" / "registry.sqlite") as db:  # a label left by an older cdm
            db.execute("UPDATE labels SET name=? WHERE name='2'", (evil,))
        r = httpx.get(url + "/")
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
        assert r.headers["x-frame-options"] == "DENY" and "<script>" not in r.text
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.goto(url + "/")
        page.fill("#key", KEYS["dave"][0])
        page.click("#connect")
        page.wait_for_selector("text=dave may use: digits-0, digits-1")
        assert evil in page.locator("#label option").all_text_contents()
        assert page.locator("img").count() == 0 and page.evaluate("window.pwned") is None
        browser.close()


# 3. no existence leaks ------------------------------------------------------------------


def test_unknown_and_foreign_labels_get_the_same_answer(served, tmp_path):
    with served() as url, httpx.Client(base_url=url, timeout=60) as c:
        answers = [c.post("/v1/generate", json={"n": 1, "label": lab}, headers=H(user))
                   for user, lab in [("alice", "cat"), ("alice", "zebra"), ("bob", "3"), ("bob", "zebra")]]
        assert {r.status_code for r in answers} == {422}
        assert len({r.text for r in answers}) == 1, [r.text for r in answers]
        assert "cat" not in answers[0].text and "'0'" not in answers[0].text
        mine = c.get("/v1/compartments", headers=H("alice")).json()["labels"]
        assert mine and set(mine) <= {str(d) for d in range(10)}
        assert "museum" not in c.get("/openapi.json").text and "digits-" not in c.get("/openapi.json").text


def test_errors_do_not_echo_store_paths(served, tmp_path):
    with served() as url, httpx.Client(base_url=url, timeout=60) as c:
        s = Store.open(tmp_path / "s")
        (s.model_dir("digits-1") / "diffusion_pytorch_model.safetensors").write_bytes(b"corrupted")
        r = c.post("/v1/generate", json={"n": 1, "steps": 2}, headers=H("alice"))
        assert r.status_code == 503 and "digits-1" in r.text
        assert str(tmp_path) not in r.text and "/models/" not in r.text


def test_a_short_store_name_is_scrubbed_as_a_path_never_inside_words(tmp_path, monkeypatch):
    """`cdm serve art` (a relative name that is also part of words): error text keeps its words,
    and the store's path is still never echoed."""
    from cdm.serving.routes import scrub_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "art").mkdir()
    art = Path("art")
    assert scrub_paths("this key may not use the requested compartment(s)", art) == \
        "this key may not use the requested compartment(s)"
    assert scrub_paths("a party started", art) == "a party started"
    out = scrub_paths(f"files of x (art/models/x in the store) at {tmp_path}/art/models/y; the store art.", art)
    assert "art" not in out.replace("<store>", "") and str(tmp_path) not in out


# 4. admin scope ---------------------------------------------------------------------------


def test_admins_forget_only_within_their_scope(served, tmp_path):
    with served() as url, httpx.Client(base_url=url, timeout=120) as c:
        s = Store.open(tmp_path / "s")
        museum_item = s.items("museum")[0].hash
        digits_item = s.items("digits-0")[0].hash
        denied = [c.post("/v1/admin/forget", json=body, headers=H("root")) for body in (
            {"source": "museum"}, {"source": "no-such-source"}, {"compartment": "museum"},
            {"compartment": "nothing-here"}, {"items": [museum_item]}, {"items": ["0" * 64]},
            {"items": [digits_item, museum_item]})]
        assert {r.status_code for r in denied} == {403} and len({r.text for r in denied}) == 1
        assert len(s.items("museum")) == 20 and s.items("digits-0")[0].hash == digits_item
        r = c.post("/v1/admin/forget", json={"items": [digits_item], "retrain": False}, headers=H("root"))
        assert r.status_code == 200 and r.json()["items"] == [digits_item]
        assert c.post("/v1/admin/forget", json={"compartment": "museum", "retrain": False},
                      headers=H("ops")).status_code == 200
        assert "museum" not in s.compartments()


def test_an_admin_forgets_its_own_copy_of_an_image_another_source_also_holds(served, tmp_path):
    with served() as url, httpx.Client(base_url=url, timeout=120) as c:
        s = Store.open(tmp_path / "s")
        row = s.items("digits-0")[0]
        got = api.ingest(s, "museum", [Item(s.read_item(row.hash), "cat", "museum's copy")], "one")
        assert (got.added, got.duplicates) == (1, 0)  # no word of digits holding the same pixels
        r = c.post("/v1/admin/forget", json={"items": [row.hash], "retrain": False}, headers=H("root"))
        assert r.status_code == 200 and r.json()["items"] == [row.hash]  # root's scope holds one copy: no ambiguity
        assert [x.source for x in s.item_rows([row.hash])] == ["museum"] and s.item_path(row.hash).is_file()
        # an admin forgets a copy only of a source it names (ops may name either)
        assert c.post("/v1/admin/forget", json={"items": [row.hash], "source": "digits"},
                      headers=H("root")).status_code == 403
        r = c.post("/v1/admin/forget", json={"items": [row.hash], "source": "museum", "retrain": False},
                   headers=H("ops"))
        assert r.status_code == 200 and s.item_rows([row.hash]) == [] and not s.item_path(row.hash).exists()


# 5. fairness ------------------------------------------------------------------------------


def test_a_key_cannot_fill_the_queue(served):
    with served(workers=1, queue=4, per_key=2, max_steps=1000) as url:
        codes = []

        def post(user, body):
            with httpx.Client(base_url=url, timeout=120) as cc:
                codes.append((user, cc.post("/v1/generate", json={**body, "deadline_s": 8}, headers=H(user)).status_code))

        flood = [threading.Thread(target=post, args=("dave", SLOW)) for _ in range(4)]
        for t in flood:
            t.start()
        time.sleep(1.0)
        with httpx.Client(base_url=url, timeout=120) as c:
            r = c.post("/v1/generate", json={"n": 1, "steps": 2}, headers=H("alice"))
        for t in flood:
            t.join()
        assert sorted(c for u, c in codes).count(429) == 2  # two of dave's four were turned away
        assert r.status_code in (200, 504)  # alice was admitted although dave flooded


def test_the_serve_deadline_is_an_option_the_default_and_the_cap(served):
    """Issue 29 row 14: no hidden 120 s: `cdm serve --deadline` sets a request's default
    deadline and its cap (504 past it), and the command lists it."""
    r = CliRunner().invoke(cli_app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert "--deadline" in r.output and "504 past it" in " ".join(r.output.split())
    with served(deadline=1.0, max_steps=1000) as url, httpx.Client(base_url=url, timeout=120) as c:
        t = time.perf_counter()
        r = c.post("/v1/generate", json=SLOW, headers=H("carol"))  # no deadline given: the server's
        assert r.status_code == 504 and time.perf_counter() - t < 30, r.text
        r = c.post("/v1/generate", json={**SLOW, "deadline_s": 600}, headers=H("alice"))  # past the cap
        assert r.status_code == 422 and "less than or equal to 1" in r.text


def test_token_bucket_gives_a_burst_then_the_rate():
    b = TokenBucket(rate=2.0, burst=3, at=100.0)
    assert [b.take(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]  # the burst
    assert b.take(100.0) == pytest.approx(0.5)  # empty: a token in 1/rate s, and nothing spent
    assert b.take(100.25) == pytest.approx(0.25)
    assert b.take(100.5) == 0.0 and b.take(100.5) == pytest.approx(0.5)
    assert [b.take(110.0) for _ in range(4)][:3] == [0.0] * 3  # refills to the burst, not beyond


def test_a_key_over_its_rate_gets_429_with_retry_after_and_others_are_unaffected(served):
    body = {"n": 1, "steps": 2}
    with served(rate=0.2, burst=2) as url, httpx.Client(base_url=url, timeout=120) as c:
        codes = [c.post("/v1/generate", json=body, headers=H("alice")).status_code for _ in range(2)]
        t = time.perf_counter()
        r = c.post("/v1/generate", json=body, headers=H("alice"))
        held = time.perf_counter() - t
        assert codes == [200, 200] and r.status_code == 429 and "rate" in r.json()["detail"]
        assert held >= 0.9 and int(r.headers["Retry-After"]) >= 3  # held back 1 s, then told to wait out the rest
        assert c.post("/v1/generate", json=body, headers=H("carol")).status_code == 200  # another key: its own bucket


def _raw(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    t, data = time.perf_counter(), b""
    while chunk := sock.recv(4096):
        data += chunk
    return data, time.perf_counter() - t


def test_slow_headers_and_slow_bodies_are_cut_off(served):
    with served(header_timeout=1.0, body_timeout=1.0, idle_timeout=1.0) as url:
        slow = _raw(url)  # headers that never end: closed after header_timeout
        slow.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\n")
        data, took = _until_closed(slow)
        assert data == b"" and 0.8 < took < 5
        trickle = _raw(url)  # a byte now and then does not keep a connection open
        t, closed = time.perf_counter(), False
        for ch in b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 30:
            try:
                trickle.sendall(bytes([ch]))
            except OSError:
                closed = True
                break
            time.sleep(0.1)
            if select.select([trickle], [], [], 0)[0] and trickle.recv(1) == b"":
                closed = True
                break
        assert closed and time.perf_counter() - t < 4
        body = _raw(url)  # a body that stops halfway: 408, then closed
        body.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nX-API-Key: " + KEYS["alice"][0].encode()
                     + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"n\": 1")
        data, took = _until_closed(body)
        assert data.startswith(b"HTTP/1.1 408") and b"not received within 1 s" in data and 0.8 < took < 5
        idle = _raw(url)  # a finished request's connection, then silence: closed after idle_timeout
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        data, took = _until_closed(idle)
        assert data.startswith(b"HTTP/1.1 200") and took < 5
        with httpx.Client(base_url=url, timeout=30) as c:  # and a normal client is served throughout
            assert c.post("/v1/generate", json={"n": 1, "steps": 2}, headers=H("alice")).status_code == 200


def test_scheduler_serves_keys_round_robin_and_never_loses_a_slot():
    async def main():
        s, order, never = Admission(1, 8, 4), [], threading.Event()
        far = time.monotonic() + 60

        async def waiter(key, deadline=far):
            await s.acquire(key, deadline, never)
            order.append(key)

        for k in "AAABC":
            s.admit(k)
        await s.acquire("A", far, never)  # A runs; A, A, then B, then C (late, short deadline) wait
        tasks = [asyncio.create_task(waiter(k)) for k in "AAB"]
        late = asyncio.create_task(waiter("C", time.monotonic() + 0.3))
        await asyncio.sleep(0.05)
        with pytest.raises(Deadline):
            await late  # gave up while queued: no slot taken
        for _ in range(3):
            s.release()
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        assert order == ["B", "A", "A"]  # B, served least recently, went before A's second request
        s.release()
        assert s.free == 1 and not s.waiting
        with pytest.raises(Exception) as e:
            s.admit("A")  # A holds 3 places (no leave() yet): a fourth is admitted,
            s.admit("A")  # a fifth is not
        assert e.value.status_code == 429

    asyncio.run(main())


def test_max_steps_beyond_the_schedule_is_refused_at_start(tmp_path, template):
    with pytest.raises(DataError, match="max_steps 5000 must be in 1..1000"):
        create_app(template, Policy.parse(POLICY), ServeConfig(max_steps=5000))


def test_a_disconnected_client_frees_its_slot(served):
    with served(workers=1, queue=0, max_steps=1000) as url:
        with httpx.Client(base_url=url, timeout=1.0) as c, pytest.raises(httpx.ReadTimeout):
            c.post("/v1/generate", json=SLOW, headers=H("dave"))  # gives up after 1 s and hangs up
        t0 = time.monotonic()
        with httpx.Client(base_url=url, timeout=60) as c:
            while True:
                r = c.post("/v1/generate", json={"n": 1, "steps": 2}, headers=H("alice"))
                if r.status_code != 503 or time.monotonic() - t0 > 10:
                    break
                time.sleep(0.2)
        assert r.status_code == 200 and time.monotonic() - t0 < 10


def test_store_access_runs_off_the_event_loop(served, tmp_path):
    with served() as url:
        db = sqlite3.connect(tmp_path / "s" / "registry.sqlite", isolation_level=None)
        db.execute("BEGIN EXCLUSIVE")  # a writer holds the registry: reads wait for it
        t = threading.Thread(target=lambda: httpx.post(url + "/v1/generate", json={"n": 1, "steps": 2},
                                                       headers=H("alice"), timeout=60))
        t.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        waited = time.monotonic() - t0
        db.execute("COMMIT")
        t.join()
        assert waited < 1.0, waited


# 6. bad input is a 4xx, never a 500 --------------------------------------------------------


BAD_BODIES = [b'{"guidance": NaN}', b'{"guidance": Infinity}', b'{"deadline_s": -Infinity}', b'{"deadline_s": NaN}',
              b'{"label": "\\ud800"}', b'{"compartments": ["\\udfff"]}', b'{"n": 1e400}', b'{"seed": 1e308}',
              b'{"n": -99999999999999999999999999}', b'{"steps": "NaN"}', b'{"label": "\xff\xfe"}',
              '{"label": "%s"}'.encode() % ("\u00e9" * 300).encode(), b'[]', b'null', b'{"router": 7}',
              '{"label": "\u202e\u0000"}'.encode()]


def test_bad_input_gets_4xx_and_a_serializable_answer(served):
    with served() as url, httpx.Client(base_url=url, timeout=60) as c:
        for body in BAD_BODIES:
            r = c.post("/v1/generate", content=body, headers={**H("dave"), "Content-Type": "application/json"})
            assert 400 <= r.status_code < 500, (body, r.status_code, r.text)
            assert r.json()["detail"], body
        for body in (b'{"source": "\\ud800"}', b'{"items": ["\\ud800"]}', b'{"items": [NaN]}', b'{"retrain": NaN}'):
            r = c.post("/v1/admin/forget", content=body, headers={**H("root"), "Content-Type": "application/json"})
            assert 400 <= r.status_code < 500, (body, r.status_code, r.text)


# 7. ingest does not follow symlinks ----------------------------------------------------------


def test_ingest_refuses_symlinks_unless_asked(tmp_path, digits):
    outside = tmp_path / "outside"
    _png(outside / "secret.png", 200)
    _png(outside / "dir" / "other.png", 100)
    folder = tmp_path / "in"
    _png(folder / "3" / "real.png", 50)
    (folder / "3" / "link.png").symlink_to(outside / "secret.png")
    (folder / "4").symlink_to(outside / "dir")
    with pytest.raises(DataError) as e:
        load_folder(folder, 8, 1)
    assert str(folder / "3" / "link.png") in str(e.value) and str(folder / "4") in str(e.value)
    assert "--follow-symlinks" in str(e.value)
    assert len(load_folder(folder, 8, 1, follow_symlinks=True)) == 3
    s = make_store(tmp_path / "s", digits[:5], "one")
    r = CliRunner().invoke(cli_app, ["ingest", str(tmp_path / "s"), "--source", "shop", "--folder", str(folder)])
    assert r.exit_code == 2 and "link.png" in r.output
    assert "shop" not in s.sources() and len(s.items()) == 5


# 8. owner-only files ------------------------------------------------------------------------


def test_store_files_are_owner_only(tmp_path, digits):
    old = os.umask(0o022)
    try:
        s = make_store(tmp_path / "s", digits[:40], "iid:2")
        api.train(s, paragon=True)
        forget(s, [s.items("digits-0")[0].hash])
        api.sample(s, 2, "1", steps=2)
        from cdm.evaluation.evaluate import ExtractorConfig, feature_extractor

        feature_extractor(s, ExtractorConfig(steps=2))
        assert os.umask(0o022) == 0o022  # the library did not leave the process's umask changed
    finally:
        os.umask(old)
    loose = [f"{p} {oct(p.stat().st_mode & 0o777)}" for p in [s.root, *s.root.rglob("*")]
             if p.stat().st_mode & 0o077]
    assert not loose
    assert stat.S_IMODE(s.root.stat().st_mode) == 0o700


# 9. small ones --------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["users = 1", "users = []", "[users]\nalice = 1", "[users]\nalice = []",
                                  '[users.alice]\nsources = "digits"', '[users.alice]\nadmin = "yes"',
                                  '[users.alice]\nrouters = ["nope"]', '[users.alice]\nrouters = "ito"'])
def test_malformed_policies_are_clear_errors(text):
    with pytest.raises(DataError) as e:  # bad input data (cdm.errors): exit 2, HTTP 422
        Policy.parse(text, "p.toml")
    assert str(e.value).startswith("p.toml: ") and "users" in str(e.value)


@pytest.mark.parametrize("raw, message", [
    (b"\xff\xfe[\x00u\x00", "p.toml line 1: UTF-16 text"),
    (b"[users.alice]\nkeys = ['caf\xe9']\n", "p.toml line 2: not UTF-8 text"),
    (b"a = " + b"[" * 100_000, "p.toml: not valid TOML (nested too deeply)"),
])
def test_malformed_policy_files_name_the_file_and_line(tmp_path, raw, message):
    (tmp_path / "p.toml").write_bytes(raw)
    with pytest.raises(DataError) as e:
        Policy.load(tmp_path / "p.toml")
    assert message in str(e.value)


def test_retraining_after_an_api_forget_is_audited_under_the_api_user(served, tmp_path):
    with served() as url, httpx.Client(base_url=url, timeout=120) as c:
        victim = Store.open(tmp_path / "s").items("digits-0")[0].hash
        last = Store.open(tmp_path / "s").events()[-1]["id"]
        assert c.post("/v1/admin/forget", json={"items": [victim]}, headers=H("root")).status_code == 200
    new = [e for e in Store.open(tmp_path / "s").events() if e["id"] > last]
    assert {e["kind"] for e in new} >= {"forget", "train"}
    assert {e["actor"] for e in new} == {"api:root"}


def test_a_policy_may_forbid_the_classifier_router(served, tmp_path):
    with served() as url, httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/generate", json={"n": 1, "steps": 2, "router": "classifier"}, headers=H("carol"))
        assert r.status_code == 403 and "classifier" in r.json()["detail"]
        assert c.post("/v1/generate", json={"n": 1, "steps": 2, "router": "uniform"}, headers=H("carol")).status_code == 200
        assert c.post("/v1/generate", json={"n": 1, "steps": 2, "router": "classifier"}, headers=H("dave")).status_code == 200
        desc = c.get("/openapi.json").json()["components"]["schemas"]["GenerateIn"]["properties"]["router"]
        assert "every compartment" in json.dumps(desc)
    (tmp_path / "p.toml").write_text(POLICY)
    r = CliRunner().invoke(cli_app, ["sample", str(tmp_path / "s"), "--user", "carol", "--policy",
                                     str(tmp_path / "p.toml"), "--router", "classifier", "-n", "1", "--steps", "2"])
    assert r.exit_code == 2 and "classifier" in r.output


# the router registry and the error kinds (one place each) --------------------------------------


def test_router_names_and_needs_come_from_one_registry(served):
    from cdm.sampling.mixture import Mixture
    from cdm.sampling.router_specs import ROUTER_SPECS, ROUTERS
    from cdm.sampling.routers import ItoRouter
    from cdm.sampling.sampler import make_scheduler, sample

    assert set(ROUTERS) == set(ROUTER_SPECS) == {"ito", "classifier", "uniform"}
    assert [n for n, s in ROUTER_SPECS.items() if s.stochastic] == ["ito"]
    assert [n for n, s in ROUTER_SPECS.items() if s.trained] == ["classifier"]
    with served() as url:
        props = httpx.get(url + "/openapi.json").json()["components"]["schemas"]["GenerateIn"]["properties"]
    assert sorted(props["router"]["enum"]) == sorted(ROUTER_SPECS) and props["router"]["default"] == "ito"
    assert Policy.parse("[users.a]\n").users["a"].routers == ROUTERS
    mix = Mixture([lambda x, t, y: x], ItoRouter(), torch.zeros(1, 1))  # a stochastic-only router under DDIM
    with pytest.raises(ValueError, match="needs the stochastic ddpm sampler"):
        sample(mix, make_scheduler({"num_train_timesteps": 10}, "ddim"), torch.zeros(1, 1, 2, 2), torch.zeros(1), 2,
               torch.Generator(), hooks=[mix.on_step])


def test_error_kinds_map_to_http_statuses(served, tmp_path):
    from cdm.errors import Busy, CdmError, DataError, NotFound, NotReady

    assert [e.http_status for e in (CdmError, DataError, NotFound, NotReady, Busy)] == [422, 422, 404, 503, 503]
    with served() as url, httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/admin/forget", json={"source": "no-such-source"}, headers=H("ops"))  # a store-wide admin
        assert r.status_code == 404 and "unknown source" in r.json()["detail"]
        r = c.post("/v1/admin/forget", json={"items": ["0" * 64]}, headers=H("ops"))
        assert r.status_code == 404 and "0" * 64 in r.json()["detail"]
