"""`cdm serve` against a real uvicorn server on loopback: auth, isolation, limits, the queue,
deadlines, admin forget under load, fuzzing of the OpenAPI spec, and the web page in Chromium."""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from cdm.app import api
from cdm.store.data import load_builtin
from cdm.sampling.policy import Policy, new_key
from cdm.serving.config import ServeConfig
from cdm.serving.http import server_config
from cdm.serving.routes import create_app
from cdm.store.registry import Store

from .conftest import make_store

KEYS = {u: new_key() for u in ("alice", "bob", "root")}
POLICY = f"""
[users.alice]
compartments = ["digits-1"]
keys = ["{KEYS['alice'][1]}"]
[users.bob]
sources = ["digits", "museum"]
keys = ["{KEYS['bob'][1]}"]
[users.root]
sources = ["digits"]
keys = ["{KEYS['root'][1]}"]
admin = true
"""


def H(user: str) -> dict:
    return {"X-API-Key": KEYS[user][0]}


class Server:
    """uvicorn in a thread, on a free loopback port."""

    def __init__(self, app):  # as `cdm serve` runs it, with its config's timeouts
        self.server = uvicorn.Server(server_config(app, app.state.config, port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def template(tmp_path_factory, digits):
    path = tmp_path_factory.mktemp("srv") / "s"
    s = make_store(path, digits[:60], "iid:2")
    api.ingest(s, "museum", load_builtin("digits", "test")[:20], "one")
    api.train(s)
    s.close()
    return path


@pytest.fixture
def served(tmp_path, template):
    def start(**cfg):
        shutil.copytree(template, tmp_path / "s", dirs_exist_ok=True)
        return Server(create_app(tmp_path / "s", Policy.parse(POLICY), ServeConfig(**{"max_n": 8, "max_steps": 40, **cfg})))
    return start


def pngs(resp) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(s["png_base64"])))) for s in resp.json()["samples"]]


def batchers() -> int:
    return sum(th.name == "cdm-batcher" for th in threading.enumerate())


def test_auth_listing_and_generation(served, tmp_path):
    before = batchers()
    with served() as url, httpx.Client(base_url=url, timeout=60) as c:
        assert batchers() == before + 1
        assert c.get("/health").json() == {"status": "ok"}
        assert c.post("/v1/generate", json={"n": 1}).status_code == 401
        assert c.post("/v1/generate", json={"n": 1}, headers={"X-API-Key": "nope"}).status_code == 401
        assert c.get("/v1/compartments", headers=H("alice")).json()["compartments"] == ["digits-1"]
        assert c.get("/v1/compartments", headers=H("bob")).json()["compartments"] == ["digits-0", "digits-1", "museum"]
        r = c.post("/v1/generate", json={"n": 3, "label": "4", "steps": 5, "seed": 2}, headers=H("bob"))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["compartments"] == ["digits-0", "digits-1", "museum"] and len(pngs(r)) == 3
        assert all(pytest.approx(1.0) == sum(s["attribution"].values()) for s in body["samples"])
        assert pngs(r)[0].shape == (8, 8)
        # a compartment outside the user's set, existing or not: the same 403
        for name in ("digits-0", "no-such-compartment"):
            r = c.post("/v1/generate", json={"n": 1, "compartments": [name]}, headers=H("alice"))
            assert r.status_code == 403 and r.json()["detail"] == "this key may not use the requested compartment(s)"
        # non-admins may not forget
        assert c.post("/v1/admin/forget", json={"source": "museum"}, headers=H("bob")).status_code == 403
        assert "cdm" in c.get("/").text and "/v1/generate" in c.get("/openapi.json").text
    assert batchers() == before  # shutdown stops the compute thread (and frees its team of threads)


def test_limits_give_422_naming_the_field(served):
    with served() as url, httpx.Client(base_url=url, timeout=60) as c:
        for body, field in [({"n": 9}, "n"), ({"steps": 41}, "steps"), ({"n": 0}, "n"), ({"router": "x"}, "router"),
                            ({"compartments": ["a"] * 300}, "compartments")]:
            r = c.post("/v1/generate", json=body, headers=H("bob"))
            assert r.status_code == 422 and field in r.json()["detail"][0]["loc"], (body, r.text)
        r = c.post("/v1/generate", content=b"{" + b" " * 20000 + b"}", headers={**H("bob"), "Content-Type": "application/json"})
        assert r.status_code == 422 and "larger than 16384 bytes" in r.text
        r = c.post("/v1/generate", json={"n": 1, "label": "zebra"}, headers=H("bob"))
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "label"]


def test_isolation_outside_compartments_cannot_change_a_users_images(served, tmp_path):
    req = {"n": 2, "label": "3", "steps": 6, "seed": 5}
    with served() as url, httpx.Client(base_url=url, timeout=60) as c:
        before = pngs(c.post("/v1/generate", json=req, headers=H("alice")))
        s = Store.open(tmp_path / "s")
        (s.model_dir("digits-0") / "diffusion_pytorch_model.safetensors").write_bytes(b"corrupted")
        shutil.rmtree(s.model_dir("museum"))
        r = c.post("/v1/generate", json=req, headers=H("alice"))
        assert r.status_code == 200 and all(np.array_equal(a, b) for a, b in zip(before, pngs(r)))
        assert c.post("/v1/generate", json=req, headers=H("bob")).status_code == 503  # bob's set is damaged
    # a new server has no pipeline loaded: alice's composition is opened and checked again, and
    # would fail here (503) if it read anything outside her compartments
    with Server(create_app(tmp_path / "s", Policy.parse(POLICY), ServeConfig(max_n=8, max_steps=40))) as url, \
            httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/generate", json=req, headers=H("alice"))
        assert r.status_code == 200 and all(np.array_equal(a, b) for a, b in zip(before, pngs(r)))


def test_queue_full_is_503_and_deadlines_are_504(served):
    slow = {"n": 8, "steps": 400, "guidance": 2.0, "label": "1"}
    with served(workers=1, queue=0, max_steps=1000) as url, httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/generate", json={**slow, "deadline_s": 1}, headers=H("bob"))
        assert r.status_code == 504 and "deadline" in r.text
        first = {}
        t = threading.Thread(target=lambda: first.update(r=c.post("/v1/generate", json=slow, headers=H("bob"))))
        t.start()
        time.sleep(0.3)
        r = c.post("/v1/generate", json={"n": 1}, headers=H("alice"))
        t.join()
        assert r.status_code == 503 and "busy" in r.text and r.headers["Retry-After"] == "1"
        assert first["r"].status_code == 200  # the slow one was not disturbed


@pytest.mark.parametrize("grouped", [False, True], ids=["separate", "grouped"])
def test_batched_requests_match_requests_alone(served, grouped):
    reqs = [("alice", {"n": 2, "label": "3", "steps": 6, "seed": 1}),
            ("bob", {"n": 3, "label": "4", "steps": 8, "seed": 2, "commit": 0.0}),
            ("bob", {"n": 2, "steps": 5, "seed": 3, "router": "uniform", "guidance": 2.0}),
            ("root", {"n": 1, "label": "7", "steps": 6, "seed": 4, "compartments": ["digits-0"]})]
    slow = {"n": 8, "steps": 1000, "label": "1", "deadline_s": 1}
    with served(workers=5, max_steps=1000, grouped=grouped) as url, httpx.Client(base_url=url, timeout=120) as c:
        alone = [c.post("/v1/generate", json=body, headers=H(user)).json() for user, body in reqs]
        got: dict[int, httpx.Response] = {}

        def send(i, user, body):
            with httpx.Client(base_url=url, timeout=120) as cc:
                got[i] = cc.post("/v1/generate", json=body, headers=H(user))

        threads = [threading.Thread(target=send, args=(i, u, b)) for i, (u, b) in enumerate([*reqs, ("bob", slow)])]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    assert got[len(reqs)].status_code == 504  # a deadline still ends its own request, batched or not
    for i, a in enumerate(alone):
        assert got[i].status_code == 200, got[i].text
        b = got[i].json()
        assert b["compartments"] == a["compartments"]
        assert [s["png_base64"] for s in b["samples"]] == [s["png_base64"] for s in a["samples"]]
        assert [s["attribution"] for s in b["samples"]] == [s["attribution"] for s in a["samples"]]
    assert alone[0]["compartments"] == ["digits-1"]  # alice's rows met only her compartment


def test_forget_under_load_serves_old_or_new_never_a_mix(served, tmp_path):
    req = {"n": 2, "label": "7", "steps": 4, "seed": 1, "compartments": ["digits-0"]}
    with served(workers=2, rate=0) as url, httpx.Client(base_url=url, timeout=120) as c:
        old = c.post("/v1/generate", json=req, headers=H("root")).json()["samples"]  # images and attribution
        victim = Store.open(tmp_path / "s").items("digits-0")[0].hash
        seen, stop = [], threading.Event()

        def load():
            with httpx.Client(base_url=url, timeout=120) as cc:
                while not stop.is_set():
                    r = cc.post("/v1/generate", json=req, headers=H("root"))
                    seen.append((r.status_code, r.json()["samples"] if r.status_code == 200 else r.text))

        workers = [threading.Thread(target=load) for _ in range(2)]
        for w in workers:
            w.start()
        r = c.post("/v1/admin/forget", json={"items": [victim]}, headers=H("root"))
        stop.set()
        for w in workers:
            w.join()
        assert r.status_code == 200 and r.json()["items"] == [victim]
        new = c.post("/v1/generate", json=req, headers=H("root")).json()["samples"]
        assert new != old  # digits-0 was retrained without the item
        assert seen and all(code in (200, 503) for code, _ in seen)
        for code, got in seen:
            if code == 200:
                assert got in (old, new)  # exactly the old state or the new one
            else:
                assert "not trained" in got or "out of date" in got
        events = Store.open(tmp_path / "s").events()
        assert any(e["kind"] == "forget" and e["actor"] == "api:root" for e in events)


@pytest.mark.parametrize("user", ["bob", "root"])  # a user, and an admin (the forget endpoint included)
def test_openapi_fuzzing_finds_no_server_error(served, user):
    st = shutil.which("st") or shutil.which("schemathesis")
    assert st, "schemathesis is a test dependency"
    with served(max_steps=10, max_n=2) as url:  # quick requests: a 1 s deadline never passes on a loaded machine (504)
        r = subprocess.run([st, "run", f"{url}/openapi.json", "--checks", "not_a_server_error", "-H",
                            f"X-API-Key: {KEYS[user][0]}", "--max-examples", "25", "--generation-deterministic"],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:]


def test_web_page_in_chromium(served, tmp_path):
    if not Path("/usr/bin/chromium").exists():
        pytest.fail("Debian's chromium is needed for the end-to-end page test (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with served() as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync"])
        page = browser.new_page()
        page.goto(url + "/")
        page.fill("#key", KEYS["alice"][0])
        page.click("#connect")
        page.wait_for_selector("text=alice may use: digits-1")
        page.select_option("#label", "2")
        page.fill("#n", "3")
        page.click("#go")
        page.wait_for_selector(".card img", timeout=60_000)
        assert page.locator(".card").count() == 3
        assert page.locator(".card .bar[data-compartment='digits-1']").count() == 3
        page.fill("#key", "wrong")
        page.click("#go")
        page.wait_for_selector("text=401")
        browser.close()


def test_a_slow_request_does_not_starve_a_fast_one(served):
    slow = {"n": 8, "steps": 400, "guidance": 2.0, "label": "1"}
    with served(workers=2, max_steps=1000) as url, httpx.Client(base_url=url, timeout=120) as c:
        done = {}

        def run_slow():
            c.post("/v1/generate", json=slow, headers=H("bob"))
            done["slow"] = time.monotonic()

        t = threading.Thread(target=run_slow)
        t.start()
        time.sleep(0.3)
        r = c.post("/v1/generate", json={"n": 1, "steps": 3}, headers=H("alice"))
        fast_done = time.monotonic()
        t.join()
        assert r.status_code == 200 and fast_done < done["slow"]
