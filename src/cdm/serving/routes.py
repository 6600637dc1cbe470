"""`cdm serve`: an HTTP service that composes, per API key, exactly the compartments its
user may use (the CDM paper's "customized model serving based on the user's access rights").

A composition is loaded once and reused while the registry is unchanged (`PipelineCache`,
keyed by the registry's generation), and each request reads the generation under one
registry snapshot, so a forget or a new compartment swaps in atomically: a request sees
the old models or the new ones, never a mix. Admission is bounded
(503 when full, 429 past a key's share), slots go round-robin over keys, a request's
deadline is honoured while queued and while sampling (504), and a client that hangs up
frees its slot. Requests sampling at the same time share their model calls (cdm.batching):
each keeps its own seed, router state, guidance, deadline and attribution, and its images
are the same bytes as when it runs alone. What the service promises and how it is tested:
docs/security.md.
"""


import asyncio
import base64
import contextlib
import functools
import io
import logging
import re
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader
from PIL import Image
from pydantic import BaseModel, Field, StringConstraints, create_model, field_validator
from starlette.datastructures import MutableHeaders

from ..sampling.batching import Batcher, sampler_thread
from ..store.data import CAPTION_MAX, LABEL_MAX, NAME_RE, check_label
from ..errors import CdmError, DataError
from ..training.forget import forget
from ..sampling.pipeline import PipelineCache
from ..sampling.settings import SamplingSettings
from ..sampling.policy import Policy, hash_key
from ..store.recipes import text_config, train_config
from ..sampling.routers import DEFAULT_ROUTER, ROUTER_SPECS, ROUTERS
from ..store.registry import Store, StoreError

KEY_HEADER = "X-API-Key"
SERVED = ("steps", "guidance", "seed", "prune", "commit", "subset")  # the SamplingSettings a client may set
log = logging.getLogger("cdm.serve")


@dataclass(frozen=True)
class ServeConfig:
    max_n: int = 16  # images per request
    max_steps: int = 100  # sampler steps per request
    max_body: int = 16_384  # bytes
    max_list: int = 256  # names in one request
    workers: int = 8  # requests sampled at once, their model calls batched together
    queue: int = 8  # requests waiting beyond those; more get 503
    per_key: int = 4  # requests one key may have admitted (running or waiting); more get 429
    deadline: float = 120.0  # seconds: the default and the cap of a request's deadline
    device: str = "cpu"
    chunk: int = 16  # rows of every batched model call (fixed: a request's images do not depend on its company)
    grouped: bool = False  # compositions' model calls in wide calls of all their models (cdm.grouped)
    group_chunk: int = 8  # rows of each slot of a wide call (fixed, like chunk; a slot per model, to the busiest)


class SampleOut(BaseModel):
    png_base64: str
    label: str | None
    prompt: str | None = None
    attribution: dict[str, float] | None = Field(None, description="trajectory-averaged router weight per compartment")


class GenerateOut(BaseModel):
    compartments: list[str]
    router: str
    seconds: float
    samples: list[SampleOut]


class CompartmentsOut(BaseModel):
    user: str
    compartments: list[str]
    labels: list[str]
    text: bool = Field(False, description="the store is text-conditioned: requests give a prompt, not a label")


Name = Annotated[str, StringConstraints(pattern=NAME_RE.pattern)]
ItemHash = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class ForgetIn(BaseModel):
    items: list[ItemHash] | None = Field(None, max_length=256, description="item SHA-256 hashes")
    source: Name | None = None
    compartment: Name | None = None
    retrain: bool = True


class Deadline(Exception):
    pass


class Gone(Exception):
    """The client hung up: its work is abandoned."""


@dataclass(frozen=True)
class Caller:
    user: str
    key: str  # the key's hash: the unit of fairness


class Scheduler:
    """Admission and dispatch of sampling requests; used on the event loop only (no locks).

    At most `workers` requests run and `queue` more wait; one key holds at most `per_key` of
    those places (429 past it). A freed slot goes to the waiting key served least recently,
    so a key that floods waits behind its own requests, not in front of everyone else's."""

    def __init__(self, workers: int, queue: int, per_key: int):
        self.free, self.limit, self.per_key = workers, workers + queue, per_key
        self.admitted, self.held = 0, {}
        self.waiting: dict[str, deque[asyncio.Future]] = {}
        self.last: dict[str, int] = {}  # key -> dispatch number when last given a slot
        self.dispatched = 0

    def admit(self, key: str) -> None:
        if self.admitted >= self.limit:
            raise HTTPException(503, f"server busy ({self.admitted} requests admitted); retry later",
                                headers={"Retry-After": "1"})
        if self.held.get(key, 0) >= self.per_key:
            raise HTTPException(429, f"this key already has {self.per_key} requests admitted; wait for one to end",
                                headers={"Retry-After": "1"})
        self.admitted += 1
        self.held[key] = self.held.get(key, 0) + 1

    def leave(self, key: str) -> None:
        self.admitted -= 1
        self.held[key] -= 1
        if not self.held[key]:
            del self.held[key]

    def _give(self, key: str) -> None:
        self.dispatched += 1
        self.last[key] = self.dispatched

    async def acquire(self, key: str, deadline: float, cancel: threading.Event) -> None:
        """Wait for a slot until `deadline` (Deadline) or until the client hangs up (Gone)."""
        if self.free and not self.waiting:
            self.free -= 1
            self._give(key)
            return
        fut = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(key, deque()).append(fut)
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Deadline("deadline passed while queued")
                if cancel.is_set():
                    raise Gone()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(fut), min(0.2, left))
                    return
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release()  # a slot was handed over as we gave up: pass it on
            fut.cancel()
            q = self.waiting.get(key)
            if q is not None and fut in q:
                q.remove(fut)
                if not q:
                    del self.waiting[key]
            raise

    def release(self) -> None:
        while self.waiting:
            key = min(self.waiting, key=lambda k: self.last.get(k, 0))
            q = self.waiting[key]
            fut = q.popleft()
            if not q:
                del self.waiting[key]
            if not fut.done():
                fut.set_result(None)
                self._give(key)
                return
        self.free += 1


class BodyLimit:
    """ASGI middleware: bodies over `limit` bytes get a 422 naming the limit (before parsing)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            size += len(body)
            if size > self.limit:
                resp = JSONResponse({"detail": [{"loc": ["body"], "msg": f"request body is larger than "
                                                 f"{self.limit} bytes", "type": "body_too_large"}]}, 422)
                return await resp(scope, receive, send)
            chunks.append(body)
            more = msg.get("more_body", False)
        done = False

        async def replay():
            nonlocal done
            if not done:
                done = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc")  # FastAPI's pages load their own inline script


class SecurityHeaders:
    """ASGI middleware: no framing, no sniffing, no referrer; a strict CSP except on the API docs."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(msg):
            if msg["type"] == "http.response.start":
                h = MutableHeaders(scope=msg)
                h["X-Frame-Options"] = "DENY"
                h["X-Content-Type-Options"] = "nosniff"
                h["Referrer-Policy"] = "no-referrer"
                h["Content-Security-Policy"] = "frame-ancestors 'none'" if scope["path"] in DOCS_PATHS else CSP
                if scope["path"].startswith("/v1/"):
                    h["Cache-Control"] = "no-store"
            await send(msg)

        return await self.app(scope, receive, send_with_headers)


def _clean(x: object, limit: int = 300) -> str:
    """Text safe to put in a JSON answer: lone surrogates replaced, length capped."""
    return str(x).encode("utf-8", "replace").decode("utf-8")[:limit]


def scrub_paths(msg: str, *roots: Path) -> str:
    """Never echo where the store lives (or any other absolute path) to a client."""
    for r in roots:
        for form in {str(r.resolve()), str(r.absolute()), str(r)}:
            msg = msg.replace(form, "<store>")
    return re.sub(r"(?<![\w<])/(?:[^\s'\"(),:;]+/)+[^\s'\"(),:;]*", "<path>", msg)


def create_app(store_path: str | Path, policy: Policy, cfg: ServeConfig = ServeConfig()) -> FastAPI:
    store_path = Path(store_path)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        samplers.shutdown(wait=False, cancel_futures=True)
        batcher.close()  # a sampler still waiting for its calls gets an error, not a hang

    app = FastAPI(title="cdm", version="1", description="Compartmentalized diffusion: each API key samples from "
                  "the composition of exactly the compartments its user may use.", lifespan=lifespan)
    key_header = APIKeyHeader(name=KEY_HEADER, auto_error=False, description="your API key")
    sched = Scheduler(cfg.workers, cfg.queue, cfg.per_key)
    pipes = PipelineCache()
    reported: set[str] = set()
    with Store.open(store_path) as s:
        timesteps = train_config(s).num_train_timesteps
        if cfg.grouped and text_config(s) is not None:
            raise StoreError("--grouped needs class-conditional models; this store is text-conditioned")
    if not 1 <= cfg.max_steps <= timesteps:
        raise StoreError(f"max_steps {cfg.max_steps} must be in 1..{timesteps}, the store's diffusion steps")
    # Sampling runs on `workers` long-lived threads whose model calls run on the batcher's one
    # thread, the only one that computes on several cores: the samplers run on one each and the
    # main thread computes nothing (sampler_thread says why it matters). Both stop at shutdown.
    batcher = Batcher(cfg.chunk, cfg.group_chunk)  # the compute thread, with torch's count now
    samplers = ThreadPoolExecutor(cfg.workers, thread_name_prefix="cdm-sample", initializer=sampler_thread)

    def report_missing() -> None:
        """Log, once each, policy names that grant nothing (a forgotten source, a typo)."""
        with Store.open(store_path) as s:
            names = [m for ms in policy.missing(s).values() for m in ms]
        for m in names:
            if m not in reported:
                log.warning("policy %s: %s names nothing in the store and grants nothing", policy.origin, m)
        reported.clear()
        reported.update(names)

    report_missing()

    def check_label_field(v: str | None) -> str | None:
        if v is None:
            return v
        try:
            return check_label(v)
        except DataError:
            raise ValueError(f"a label is 1-{LABEL_MAX} letters, digits, spaces and _ - . , + ( ), "
                             "not starting or ending with a space") from None

    GenerateIn = create_model(  # noqa: N806 - the limits come from the server's config
        "GenerateIn",
        n=(int, Field(4, ge=1, le=cfg.max_n, description="number of images")),
        label=(str | None, Field(None, max_length=LABEL_MAX, description="class label (default: unconditional)")),
        prompt=(str | None, Field(None, max_length=CAPTION_MAX, description=(
            "text-conditioned stores: the prompt of every image (default: the empty prompt, unconditional)"))),
        steps=(int, Field(min(25, cfg.max_steps), ge=1, le=cfg.max_steps, description="sampler steps")),
        guidance=(float, Field(1.0, ge=0, le=20, allow_inf_nan=False, description="classifier-free guidance scale")),
        seed=(int, Field(0, ge=0, le=2 ** 31 - 1)),
        prune=(float | None, Field(None, ge=0, le=1000, allow_inf_nan=False, description=_help("prune"))),
        commit=(float | None, Field(None, ge=0, le=1, allow_inf_nan=False, description=_help("commit"))),
        subset=(int | None, Field(None, ge=1, le=cfg.max_list, description=_help("subset"))),
        router=(Literal[ROUTERS], Field(DEFAULT_ROUTER, description=(
            "how compartments are weighted: " + "; ".join(f"{s.name}: {s.summary}" for s in ROUTER_SPECS.values())
            + ". A policy may withhold a router"))),
        compartments=(list[str] | None, Field(None, max_length=cfg.max_list,
                                              description="a subset of your compartments (default: all of them)")),
        deadline_s=(float | None, Field(None, ge=1, le=cfg.deadline, allow_inf_nan=False,
                                        description="give up after this many seconds (504)")),
        __validators__={"label_chars": field_validator("label")(check_label_field)},
    )

    async def caller(key: str | None = Depends(key_header)) -> Caller:  # hashes only, no I/O: on the loop
        user = policy.user_for_key(key)
        if user is None:
            raise HTTPException(401, "missing or unknown API key", headers={"WWW-Authenticate": KEY_HEADER})
        return Caller(user, hash_key(key))

    def view(user: str, router: str | None = None, want: list[str] | None = None) -> tuple[list[str], list[str], bool]:
        """(the compartments a request composes, or all the user's without a router; labels in
        those; whether the store is text-conditioned)."""
        with Store.open(store_path) as s:
            names = policy.allowed(s, user) if router is None else policy.resolve(s, user, router, want, reveal=False)
            hist, label_names, text = s.label_counts(), s.label_names(), text_config(s) is not None
        return names, sorted({label_names[lid] for c in names for lid, k in hist.get(c, {}).items()
                              if k and lid is not None}), text

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/compartments", response_model=CompartmentsOut)
    def compartments(who: Caller = Depends(caller)) -> CompartmentsOut:
        mine, labels, text = view(who.user)
        return CompartmentsOut(user=who.user, compartments=mine, labels=[] if text else labels, text=text)

    @app.post("/v1/generate", response_model=GenerateOut, responses={
        401: {"description": "missing or unknown key"}, 403: {"description": "a compartment or router you may not use"},
        429: {"description": "this key has its share of requests admitted"},
        503: {"description": "queue full, or a model is being (re)trained"}, 504: {"description": "deadline passed"}})
    async def generate(req: GenerateIn, request: Request, who: Caller = Depends(caller)):  # type: ignore[valid-type]
        policy.check_router(who.user, req.router, reveal=False)  # 403 before admission: it costs nothing
        sched.admit(who.key)  # first, before any store access: turning a flood away costs little
        deadline = time.monotonic() + (req.deadline_s or cfg.deadline)
        cancel = threading.Event()
        watcher = asyncio.create_task(_watch(request, cancel))
        try:
            want, labels, _ = await run_in_threadpool(view, who.user, req.router, req.compartments)  # 403 if not theirs
            if req.label is not None and req.label not in labels:  # the same whether it exists elsewhere or not
                return JSONResponse({"detail": [{"loc": ["body", "label"], "type": "value_error", "msg":
                                                 "no compartment composed for this request holds that label"}]}, 422)
            await sched.acquire(who.key, deadline, cancel)
            try:
                return await asyncio.get_running_loop().run_in_executor(
                    samplers, functools.partial(_generate, store_path, pipes, batcher, req, want, deadline, cancel, cfg))
            finally:
                sched.release()
        finally:
            watcher.cancel()
            sched.leave(who.key)

    @app.post("/v1/admin/forget", responses={403: {"description": "not an admin, or outside this admin's scope"}})
    async def admin_forget(req: ForgetIn, who: Caller = Depends(caller)) -> dict:
        if not policy.users[who.user].admin:
            raise HTTPException(403, "only admin keys may forget")
        given = [x for x in (req.items, req.source, req.compartment) if x]
        if len(given) != 1:
            raise HTTPException(422, "give exactly one of: items, source, compartment")

        def run() -> dict | None:
            with Store.open(store_path) as s:
                if not policy.may_forget(s, who.user, req.items, req.source, req.compartment):
                    return None
                r = forget(s, req.items, req.source, req.compartment, req.retrain, cfg.device, actor=f"api:{who.user}")
            report_missing()
            return asdict(r)

        out = await run_in_threadpool(run)
        if out is None:  # the same answer whether or not the data exists
            raise HTTPException(403, "this key may not forget the requested data")
        return out

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return PAGE

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/app.js", include_in_schema=False)
    def script() -> Response:
        return Response(APP_JS, media_type="text/javascript")

    @app.get("/app.css", include_in_schema=False)
    def style() -> Response:
        return Response(APP_CSS, media_type="text/css")

    app.add_middleware(BodyLimit, limit=cfg.max_body)
    app.add_middleware(SecurityHeaders)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):  # never echo the input back
        detail = [{"loc": [x if isinstance(x, int) else _clean(x, 64) for x in e.get("loc", ())],
                   "msg": _clean(e.get("msg", "invalid")), "type": _clean(e.get("type", "value_error"), 64)}
                  for e in exc.errors()]
        return JSONResponse({"detail": detail}, 422)

    @app.exception_handler(CdmError)
    async def cdm_error(request: Request, exc: CdmError):  # each kind's status is set in cdm/errors.py
        retry = {"Retry-After": "5"} if exc.http_status == 503 else None
        return JSONResponse({"detail": _clean(scrub_paths(str(exc), store_path), 1000)}, exc.http_status, headers=retry)

    @app.exception_handler(Deadline)
    async def deadline_error(request: Request, exc: Deadline):
        return JSONResponse({"detail": str(exc) or "deadline passed while sampling"}, 504)

    @app.exception_handler(Gone)
    async def gone(request: Request, exc: Gone):
        return JSONResponse({"detail": "client closed the request"}, 499)

    return app


def _help(name: str) -> str:
    return SamplingSettings.__dataclass_fields__[name].metadata["help"]


async def _watch(request: Request, cancel: threading.Event) -> None:
    """Set `cancel` when the client disconnects (queued or sampling, its work is then dropped)."""
    while not cancel.is_set():
        if await request.is_disconnected():
            cancel.set()
            return
        await asyncio.sleep(0.2)


def _generate(store_path: Path, pipes: PipelineCache, batcher: Batcher, req, names: list[str], deadline: float,
              cancel: threading.Event, cfg: ServeConfig) -> GenerateOut:
    def check(step: int, total: int) -> None:
        if cancel.is_set():
            raise Gone()
        if time.monotonic() > deadline:
            raise Deadline()

    t0 = time.perf_counter()
    with Store.open(store_path) as s:
        pipe = pipes.get(s, names, router=req.router, device=cfg.device, grouped=cfg.grouped)
    settings = SamplingSettings(**{k: getattr(req, k) for k in SERVED}, batch_size=cfg.max_n)
    with batcher.session():
        g = pipe(req.n, req.label, settings, callback=check, batcher=batcher, prompt=req.prompt)
    out = []
    for i in range(req.n):
        img = g.images[i]
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[2] == 1 else img).save(buf, format="PNG")
        att = None if g.attribution is None else {c: round(float(w), 6) for c, w in zip(g.compartments, g.attribution[i])}
        out.append(SampleOut(png_base64=base64.b64encode(buf.getvalue()).decode(), label=req.label,
                             prompt=None if g.prompts is None else g.prompts[i], attribution=att))
    return GenerateOut(compartments=g.compartments, router=req.router, seconds=round(time.perf_counter() - t0, 3),
                       samples=out)


# The page holds no inline script or style (the CSP forbids both) and builds every piece of
# server data into the DOM as text (textContent, Option), never as HTML.
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cdm</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/app.css"><script src="/app.js" defer></script>
</head><body>
<h1>cdm</h1>
<p>Samples from the composition of the compartments your key may use, with each image's attribution.</p>
<fieldset>
 <label>API key <input id="key" type="password" size="30" autocomplete="off"></label>
 <button id="connect">Connect</button>
 <label id="label-box">Label <select id="label"><option value="">(any)</option></select></label>
 <label id="prompt-box" hidden>Prompt <input id="prompt" type="text" size="30" maxlength="1000"></label>
 <label>Count <input id="n" type="number" min="1" value="4"></label>
 <label>Router <select id="router">""" + "".join(f"<option>{r}</option>" for r in ROUTER_SPECS) + """</select></label>
 <button id="go">Generate</button>
</fieldset>
<div id="msg"></div><div id="who"></div><div id="out"></div>
</body></html>
"""

APP_CSS = """
body { font: 15px system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; color: #222; }
fieldset { border: 1px solid #ccc; border-radius: 6px; display: flex; gap: 1rem; align-items: end; flex-wrap: wrap; }
label { display: flex; flex-direction: column; font-size: 13px; gap: .2rem; }
input, select, button { font: inherit; padding: .3rem .5rem; }
#n { width: 4rem; }
#out { display: grid; grid-template-columns: repeat(auto-fill, minmax(11rem, 1fr)); gap: 1rem; margin-top: 1rem; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: .5rem; }
.card img { width: 100%; image-rendering: pixelated; background: #000; }
.bar { display: flex; align-items: center; gap: .3rem; font-size: 12px; }
.bar span.name { width: 5.5rem; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.bar div.track { flex: 1; background: #eee; height: .7rem; border-radius: 3px; }
.bar div.fill { background: #3a7bd5; height: 100%; border-radius: 3px; }
[hidden] { display: none !important; }
#msg { color: #b00; min-height: 1.2rem; margin-top: .5rem; }
"""

APP_JS = """"use strict";
const $ = (id) => document.getElementById(id);
const headers = () => ({"X-API-Key": $("key").value, "Content-Type": "application/json"});
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
async function call(path, body) {
  const r = await fetch(path, body ? {method: "POST", headers: headers(), body: JSON.stringify(body)} : {headers: headers()});
  const j = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(r.status + ": " + (typeof j.detail === "string" ? j.detail : JSON.stringify(j.detail)));
  return j;
}
function card(s) {
  const c = el("div", "card");
  const img = el("img");
  img.alt = "sample";
  img.src = "data:image/png;base64," + s.png_base64;
  c.append(img);
  for (const [name, w] of Object.entries(s.attribution || {})) {
    const bar = el("div", "bar"), track = el("div", "track"), fill = el("div", "fill");
    bar.dataset.compartment = name;
    fill.style.width = (100 * w).toFixed(1) + "%";
    track.append(fill);
    bar.append(el("span", "name", name), track, el("span", "", w.toFixed(2)));
    c.append(bar);
  }
  return c;
}
document.addEventListener("DOMContentLoaded", () => {
  $("connect").addEventListener("click", async () => {
    $("msg").textContent = "";
    try {
      const c = await call("/v1/compartments");
      $("who").textContent = c.user + " may use: " + (c.compartments.join(", ") || "nothing at present");
      $("label").replaceChildren(new Option("(any)", ""), ...c.labels.map((l) => new Option(l, l)));
      $("label-box").hidden = c.text;
      $("prompt-box").hidden = !c.text;
    } catch (e) { $("msg").textContent = e.message; }
  });
  $("go").addEventListener("click", async () => {
    $("msg").textContent = "generating...";
    $("out").replaceChildren();
    try {
      const body = {n: parseInt($("n").value), router: $("router").value, steps: 25};
      if ($("label").value && $("prompt-box").hidden) body.label = $("label").value;
      if ($("prompt").value && !$("prompt-box").hidden) body.prompt = $("prompt").value;
      const g = await call("/v1/generate", body);
      $("msg").textContent = "";
      $("out").replaceChildren(...g.samples.map(card));
    } catch (e) { $("msg").textContent = e.message; }
  });
});
"""
