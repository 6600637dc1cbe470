"""`cdm serve`: an HTTP service that composes, per API key, exactly the compartments its
user may use (the CDM paper's "customized model serving based on the user's access rights").

A composition is loaded once and reused while the registry is unchanged (`PipelineCache`,
keyed by the registry's generation), and each request reads the generation under one
registry snapshot, so a forget or a new compartment swaps in atomically: a request sees
the old models or the new ones, never a mix. Admission is bounded
(503 when full, 429 past a key's share), slots go round-robin over keys, a request's
deadline is honoured while queued and while sampling (504), and a client that hangs up
frees its slot. Requests sampling at the same time share their model calls (cdm.sampling.batching):
each keeps its own seed, router state, guidance, deadline and attribution, and its images
are the same bytes as when it runs alone. What the service promises and how it is tested:
docs/security.md.
"""


import asyncio
import base64
import contextlib
import dataclasses
import functools
import io
import logging
import re
import threading
import time
import typing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader
from PIL import Image
from pydantic import BaseModel, Field, StringConstraints, create_model, field_validator

from ..errors import CdmError, DataError, StoreError
from ..models.precision import resolve
from ..sampling.batching import Batcher, sampler_thread
from ..sampling.pipeline import PipelineCache
from ..sampling.policy import Policy, hash_key
from ..sampling.router_specs import DEFAULT_ROUTER, ROUTER_SPECS, ROUTERS
from ..sampling.settings import SERVED, SamplingSettings
from ..store.data import CAPTION_MAX, LABEL_MAX, NAME_RE, check_label
from ..store.recipes import text_config, train_config
from ..store.registry import Store
from ..training.forget import forget
from .admission import Admission, Caller, Deadline, Gone
from .config import ServeConfig
from .middleware import BodyLimit, SecurityHeaders

KEY_HEADER = "X-API-Key"
SERVED_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingSettings) if f.metadata["http"])  # a client sets
STATIC = Path(__file__).parent / "static"  # the web page: no inline script or style (the CSP forbids both)
log = logging.getLogger("cdm.serving.routes")


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
    source: Name | None = Field(None, description="a whole source; with items, that source's copies of them")
    compartment: Name | None = None
    retrain: bool = True


def _clean(x: object, limit: int = 300) -> str:
    """Text safe to put in a JSON answer: lone surrogates replaced, length capped."""
    return str(x).encode("utf-8", "replace").decode("utf-8")[:limit]


def scrub_paths(msg: str, *roots: Path) -> str:
    """Never echo where the store lives (or any other absolute path) to a client. The store's
    path is replaced only where it stands as a path (a short relative name like `art` is left
    alone inside a word such as "compartment")."""
    for r in roots:
        for form in sorted({str(r.resolve()), str(r.absolute()), str(r)}, key=len, reverse=True):
            msg = re.sub(r"(?<![\w./~-])" + re.escape(form) + r"(?![\w~-])", "<store>", msg)
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
    app.state.config = cfg  # `serving.http.server_config` runs it with these timeouts
    key_header = APIKeyHeader(name=KEY_HEADER, auto_error=False, description="your API key")
    sched = Admission(cfg.workers, cfg.queue, cfg.per_key, cfg.rate, cfg.burst)
    pipes = PipelineCache()
    reported: set[str] = set()
    with Store.open(store_path) as s:
        timesteps = train_config(s).num_train_timesteps
        if cfg.grouped and text_config(s) is not None:
            raise StoreError("--grouped needs class-conditional models; this store is text-conditioned")
    if not 1 <= cfg.max_steps <= timesteps:
        raise DataError(f"max_steps {cfg.max_steps} must be in 1..{timesteps}, the store's diffusion steps")
    # Sampling runs on `workers` long-lived threads whose model calls run on the batcher's one
    # thread, the only one that computes on several cores: the samplers run on one each and the
    # main thread computes nothing (sampler_thread says why it matters). Both stop at shutdown.
    batcher = Batcher(cfg.chunk, cfg.group_chunk, precision=resolve(cfg.precision, cfg.device))  # the compute
    # thread, with torch's count now; every model call of every request runs at the server's precision
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
    page_html = (STATIC / "index.html").read_text().replace(
        "<!-- routers -->", "".join(f"<option>{r}</option>" for r in ROUTER_SPECS))

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
        **request_fields(cfg),
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
        429: {"description": "this key is over its rate, or has its share of requests admitted"},
        503: {"description": "queue full, or a model is being (re)trained"}, 504: {"description": "deadline passed"}})
    async def generate(req: GenerateIn, request: Request, who: Caller = Depends(caller)):  # type: ignore[valid-type]
        policy.check_router(who.user, req.router, reveal=False)  # 403 before admission: it costs nothing
        await sched.limit_rate(who.key)  # 429 over the key's rate (a token bucket)
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
        given = [x for x in (req.items, req.source if not req.items else None, req.compartment) if x]
        if len(given) != 1:
            raise HTTPException(422, "give exactly one of: items (and optionally their source), source, compartment")

        def run() -> dict | None:
            with Store.open(store_path) as s:
                if not policy.may_forget(s, who.user, req.items, req.source, req.compartment):
                    return None
                scoped = policy.users[who.user].admin is True  # items are looked up within its scope only
                r = forget(s, req.items, req.source, req.compartment, req.retrain, cfg.device, actor=f"api:{who.user}",
                           among=policy.allowed(s, who.user) if scoped and req.items else None)
            report_missing()
            return asdict(r)

        out = await run_in_threadpool(run)
        if out is None:  # the same answer whether or not the data exists
            raise HTTPException(403, "this key may not forget the requested data")
        return out

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return page_html

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/app.js", include_in_schema=False)
    def script() -> Response:
        return Response((STATIC / "app.js").read_bytes(), media_type="text/javascript")

    @app.get("/app.css", include_in_schema=False)
    def style() -> Response:
        return Response((STATIC / "app.css").read_bytes(), media_type="text/css")

    app.add_middleware(BodyLimit, limit=cfg.max_body, timeout=cfg.body_timeout)
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


def request_fields(cfg: ServeConfig) -> dict:
    """A request's sampling options, made from the `SamplingSettings` fields the service offers:
    their type and help, their bounds tightened by the field's `cap` and the server's limits,
    and the service's defaults (`SERVED`, its one override of SamplingSettings' defaults)."""
    hints, limits = typing.get_type_hints(SamplingSettings), {"steps": cfg.max_steps, "subset": cfg.max_list}
    out = {}
    for f in dataclasses.fields(SamplingSettings):
        m = f.metadata
        if f.name not in SERVED_FIELDS:
            continue
        lo = _tightest(max, m["ge"], m["cap"][0])
        hi = _tightest(min, m["le"], m["cap"][1], limits.get(f.name))
        default = getattr(SERVED, f.name)
        if default is not None and hi is not None:
            default = min(default, hi)  # a server with max_steps under the default defaults to its max
        floats = {} if int in typing.get_args(hints[f.name]) or hints[f.name] is int else {"allow_inf_nan": False}
        out[f.name] = (hints[f.name], Field(default, ge=lo, le=hi, description=m["help"], **floats))
    return out


def _tightest(pick, *bounds):
    given = [b for b in bounds if b is not None]
    return pick(given) if given else None


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
    settings = dataclasses.replace(SERVED, **{k: getattr(req, k) for k in SERVED_FIELDS}, batch_size=cfg.max_n)
    with batcher.session():
        g = pipe(req.n, req.label, settings, callback=check, batcher=batcher, prompt=req.prompt)
    out = []
    for i in range(req.n):
        img = g.images[i]
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[2] == 1 else img).save(buf, format="PNG")
        att = None if g.attribution is None else g.weights(g.attribution, i)
        out.append(SampleOut(png_base64=base64.b64encode(buf.getvalue()).decode(), label=req.label,
                             prompt=None if g.prompts is None else g.prompts[i], attribution=att))
    return GenerateOut(compartments=g.compartments, router=req.router, seconds=round(time.perf_counter() - t0, 3),
                       samples=out)
