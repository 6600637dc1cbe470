"""`cdm serve`: an HTTP service that composes, per API key, exactly the compartments its
user may use (the CDM paper's "customized model serving based on the user's access rights").

Each request opens the store afresh and samples under one registry snapshot, so a forget or
a new compartment swaps in atomically: a request sees the old models or the new ones, never
a mix. Models stay in memory across requests (`api.load_unet`). A bounded queue answers 503
when full; a request's deadline is honoured while queued and while sampling (504).
"""

import asyncio
import base64
import io
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import APIKeyHeader
from PIL import Image
from pydantic import BaseModel, Field, create_model

from . import api
from .policy import Policy
from .store import Store, StoreError

KEY_HEADER = "X-API-Key"


@dataclass(frozen=True)
class ServeConfig:
    max_n: int = 16  # images per request
    max_steps: int = 100  # sampler steps per request
    max_body: int = 16_384  # bytes
    max_list: int = 256  # names in one request
    workers: int = 1  # requests sampled at once
    queue: int = 8  # requests waiting beyond those; more get 503
    deadline: float = 120.0  # seconds: the default and the cap of a request's deadline
    device: str = "cpu"


class SampleOut(BaseModel):
    png_base64: str
    label: str | None
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


class ForgetIn(BaseModel):
    items: list[str] | None = Field(None, max_length=256, description="item SHA-256 hashes")
    source: str | None = Field(None, max_length=128)
    compartment: str | None = Field(None, max_length=128)
    retrain: bool = True


class Deadline(Exception):
    pass


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


def create_app(store_path: str | Path, policy: Policy, cfg: ServeConfig = ServeConfig()) -> FastAPI:
    store_path = Path(store_path)
    with Store.open(store_path) as s:
        policy.check(s)
    app = FastAPI(title="cdm", version="1", description="Compartmentalized diffusion: each API key samples from "
                  "the composition of exactly the compartments its user may use.")
    key_header = APIKeyHeader(name=KEY_HEADER, auto_error=False, description="your API key")
    slots = asyncio.Semaphore(cfg.workers)
    state = {"admitted": 0}

    GenerateIn = create_model(  # noqa: N806 - the limits come from the server's config
        "GenerateIn",
        n=(int, Field(4, ge=1, le=cfg.max_n, description="number of images")),
        label=(str | None, Field(None, max_length=64, description="class label (default: unconditional)")),
        steps=(int, Field(25, ge=1, le=cfg.max_steps, description="sampler steps")),
        guidance=(float, Field(1.0, ge=0, le=20, description="classifier-free guidance scale")),
        seed=(int, Field(0, ge=0, le=2 ** 31 - 1)),
        router=(Literal["ito", "classifier", "uniform"], "ito"),
        compartments=(list[str] | None, Field(None, max_length=cfg.max_list,
                                              description="a subset of your compartments (default: all of them)")),
        deadline_s=(float | None, Field(None, ge=1, le=cfg.deadline, description="give up after this many seconds "
                                                                                "(504)")),
    )

    def user_of(key: str | None = Depends(key_header)) -> str:
        user = policy.user_for_key(key)
        if user is None:
            raise HTTPException(401, "missing or unknown API key", headers={"WWW-Authenticate": KEY_HEADER})
        return user

    def allowed(user: str) -> list[str]:
        with Store.open(store_path) as s:
            try:
                return policy.allowed(s, user)
            except StoreError:
                return []

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/compartments", response_model=CompartmentsOut)
    def compartments(user: str = Depends(user_of)) -> CompartmentsOut:
        names = allowed(user)
        with Store.open(store_path) as s:
            hist, label_names = s.label_counts(), s.label_names()
        labels = sorted({label_names[lid] for c in names for lid, k in hist.get(c, {}).items() if k and lid is not None})
        return CompartmentsOut(user=user, compartments=names, labels=labels)

    @app.post("/v1/generate", response_model=GenerateOut, responses={
        401: {"description": "missing or unknown key"}, 403: {"description": "a compartment you may not use"},
        503: {"description": "queue full, or a model is being (re)trained"}, 504: {"description": "deadline passed"}})
    async def generate(req: GenerateIn, user: str = Depends(user_of)) -> GenerateOut:  # type: ignore[valid-type]
        mine = allowed(user)
        want = sorted(set(req.compartments)) if req.compartments else mine
        if not want or set(want) - set(mine):  # same answer whether or not the compartment exists
            raise HTTPException(403, "this key may not use the requested compartment(s)")
        if state["admitted"] >= cfg.workers + cfg.queue:
            raise HTTPException(503, f"server busy ({state['admitted']} requests admitted); retry later",
                                headers={"Retry-After": "1"})
        deadline = time.monotonic() + (req.deadline_s or cfg.deadline)
        state["admitted"] += 1
        try:
            try:
                await asyncio.wait_for(slots.acquire(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise HTTPException(504, "deadline passed while queued") from None
            try:
                return await run_in_threadpool(_generate, store_path, req, want, deadline, cfg)
            finally:
                slots.release()
        finally:
            state["admitted"] -= 1

    @app.post("/v1/admin/forget")
    async def admin_forget(req: ForgetIn, user: str = Depends(user_of)) -> dict:
        if not policy.users[user].admin:
            raise HTTPException(403, "only admin keys may forget")
        given = [x for x in (req.items, req.source, req.compartment) if x]
        if len(given) != 1:
            raise HTTPException(422, "give exactly one of: items, source, compartment")
        return await run_in_threadpool(_forget, store_path, req, user, cfg)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return PAGE

    app.add_middleware(BodyLimit, limit=cfg.max_body)

    @app.exception_handler(StoreError)
    async def store_error(request: Request, exc: StoreError):
        busy = any(w in str(exc) for w in ("not trained", "out of date", "missing or corrupted", "busy"))
        return JSONResponse({"detail": str(exc)}, 503 if busy else 422)

    @app.exception_handler(Deadline)
    async def deadline_error(request: Request, exc: Deadline):
        return JSONResponse({"detail": "deadline passed while sampling"}, 504)

    return app


def _generate(store_path: Path, req, names: list[str], deadline: float, cfg: ServeConfig) -> GenerateOut:
    def check(step: int, total: int) -> None:
        if time.monotonic() > deadline:
            raise Deadline()

    t0 = time.perf_counter()
    with Store.open(store_path) as s:
        g = api.sample(s, req.n, req.label, names, req.router, req.steps, req.guidance, req.seed,
                       device=cfg.device, batch_size=cfg.max_n, callback=check)
    out = []
    for i in range(req.n):
        img = g.images[i]
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[2] == 1 else img).save(buf, format="PNG")
        att = None if g.attribution is None else {c: round(float(w), 6) for c, w in zip(g.compartments, g.attribution[i])}
        out.append(SampleOut(png_base64=base64.b64encode(buf.getvalue()).decode(), label=req.label, attribution=att))
    return GenerateOut(compartments=g.compartments, router=req.router, seconds=round(time.perf_counter() - t0, 3),
                       samples=out)


def _forget(store_path: Path, req: ForgetIn, user: str, cfg: ServeConfig) -> dict:
    from .protect import forget

    with Store.open(store_path) as s:
        r = forget(s, req.items, req.source, req.compartment, req.retrain, cfg.device, actor=f"api:{user}")
    return asdict(r)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cdm</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font: 15px system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; color: #222; }
 fieldset { border: 1px solid #ccc; border-radius: 6px; display: flex; gap: 1rem; align-items: end; flex-wrap: wrap; }
 label { display: flex; flex-direction: column; font-size: 13px; gap: .2rem; }
 input, select, button { font: inherit; padding: .3rem .5rem; }
 #out { display: grid; grid-template-columns: repeat(auto-fill, minmax(11rem, 1fr)); gap: 1rem; margin-top: 1rem; }
 .card { border: 1px solid #ddd; border-radius: 6px; padding: .5rem; }
 .card img { width: 100%; image-rendering: pixelated; background: #000; }
 .bar { display: flex; align-items: center; gap: .3rem; font-size: 12px; }
 .bar span.name { width: 5.5rem; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
 .bar div.track { flex: 1; background: #eee; height: .7rem; border-radius: 3px; }
 .bar div.fill { background: #3a7bd5; height: 100%; border-radius: 3px; }
 #msg { color: #b00; min-height: 1.2rem; margin-top: .5rem; }
</style></head><body>
<h1>cdm</h1>
<p>Samples from the composition of the compartments your key may use, with each image's attribution.</p>
<fieldset>
 <label>API key <input id="key" type="password" size="30" autocomplete="off"></label>
 <button id="connect">Connect</button>
 <label>Label <select id="label"><option value="">(any)</option></select></label>
 <label>Count <input id="n" type="number" min="1" value="4" style="width:4rem"></label>
 <label>Router <select id="router"><option>ito</option><option>classifier</option><option>uniform</option></select></label>
 <button id="go">Generate</button>
</fieldset>
<div id="msg"></div><div id="who"></div><div id="out"></div>
<script>
const $ = (id) => document.getElementById(id);
const headers = () => ({"X-API-Key": $("key").value, "Content-Type": "application/json"});
async function call(path, body) {
  const r = await fetch(path, body ? {method: "POST", headers: headers(), body: JSON.stringify(body)} : {headers: headers()});
  const j = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(r.status + ": " + (typeof j.detail === "string" ? j.detail : JSON.stringify(j.detail)));
  return j;
}
$("connect").onclick = async () => {
  $("msg").textContent = "";
  try {
    const c = await call("/v1/compartments");
    $("who").textContent = c.user + " may use: " + c.compartments.join(", ");
    $("label").innerHTML = '<option value="">(any)</option>' + c.labels.map(l => `<option>${l}</option>`).join("");
  } catch (e) { $("msg").textContent = e.message; }
};
$("go").onclick = async () => {
  $("msg").textContent = "generating..."; $("out").innerHTML = "";
  try {
    const body = {n: parseInt($("n").value), router: $("router").value, steps: 25};
    if ($("label").value) body.label = $("label").value;
    const g = await call("/v1/generate", body);
    $("msg").textContent = "";
    for (const s of g.samples) {
      const card = document.createElement("div"); card.className = "card";
      card.innerHTML = `<img alt="sample" src="data:image/png;base64,${s.png_base64}">`;
      for (const [c, w] of Object.entries(s.attribution || {})) {
        card.innerHTML += `<div class="bar" data-compartment="${c}"><span class="name">${c}</span>` +
          `<div class="track"><div class="fill" style="width:${(100 * w).toFixed(1)}%"></div></div>` +
          `<span>${w.toFixed(2)}</span></div>`;
      }
      $("out").appendChild(card);
    }
  } catch (e) { $("msg").textContent = e.message; }
};
</script></body></html>
"""
