"""The `cdm` command: thin wrappers over `cdm.app.api` that print with rich, or JSON with --json."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import sys
import typing
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import CdmError, NotFound
from ..ingest.folders import MAX_PIXELS, file_item_id, load_folder
from ..models.presets import default_preset
from ..sampling.policy import Policy, new_key, set_store_policy, store_policy
from ..sampling.router_specs import DEFAULT_ROUTER, ROUTER_SPECS, router_help
from ..sampling.settings import EVALUATION, SamplingSettings
from ..serving.config import ServeConfig
from ..store.data import BUILTINS, load_builtin
from ..store.recipes import TrainConfig
from ..store.registry import Store
from . import api
from .progress import training_progress
from .report import write_samples

# Only modules that do not import torch or diffusers are imported above (tests/test_imports.py);
# the rest is reached through `api`, which imports a name's layer when a command first uses it.

app = typer.Typer(help="Compartmentalized Diffusion Models: one diffusion model per data compartment, "
                       "composed at sampling time.", no_args_is_help=True, pretty_exceptions_enable=False)
out = Console()
err = Console(stderr=True)


def _fail(msg: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)  # names stay whole
    raise typer.Exit(code)


@contextmanager
def _errors():
    try:
        yield
    except CdmError as e:  # each kind's exit code is set in cdm/errors.py
        _fail(str(e), e.exit_code)
    except ValueError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        err.print("[yellow]interrupted; run the same command again to resume[/]")
        raise typer.Exit(130)


@contextmanager
def _open(path: Path):
    with _errors():
        store = Store.open(path)
    try:
        with _errors():
            yield store
    finally:
        store.close()


def _emit(obj, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


@app.command()
def init(store: Path, image_size: int = typer.Option(8, help="Image side in pixels."),
         channels: int = typer.Option(1, help="1 (grey) or 3 (RGB)."),
         seed: int = typer.Option(0, help="Store seed: fixes assignment, slices and every model's seed."),
         slices: int = typer.Option(4, help="SISA slices per compartment (checkpoints for fast forgetting)."),
         max_labels: int = typer.Option(16, help="Largest number of distinct labels the store will hold."),
         preset: Optional[str] = typer.Option(None, help="Denoiser preset: tiny, small, base (default by size)."),
         batch_size: int = typer.Option(TrainConfig.batch_size, help="Training batch of every denoiser (lower it "
                                                                     "for large images or a Stable Diffusion base)."),
         lr: float = typer.Option(TrainConfig.lr, help="Learning rate of every denoiser (fine-tuning a pretrained "
                                                       "base wants less, e.g. 1e-4 for LoRA, 1e-5 for full)."),
         json_out: bool = typer.Option(False, "--json")) -> None:
    """Create an empty store."""
    with _errors():
        if batch_size < 1 or not lr > 0:
            _fail(f"--batch-size must be >= 1 and --lr > 0, got {batch_size} and {lr}")
        s = api.init_store(store, image_size, channels, seed, slices, max_labels,
                           TrainConfig(preset=preset or default_preset(image_size), batch_size=batch_size, lr=lr))
        st = api.status(s)
        s.close()
    _emit({"store": str(store), "config": st["config"], "train": st["train"]}, json_out)
    if not json_out:
        out.print(f"created store [bold]{store}[/] ({image_size}x{image_size}x{channels}, seed {seed}, "
                  f"{slices} slices, preset {st['train']['preset']})")


@app.command()
def ingest(store: Path, source: str = typer.Option(..., help="Name of the data owner's collection."),
           builtin: Optional[str] = typer.Option(None, help=f"Embedded dataset: {', '.join(BUILTINS)}."),
           folder: Optional[Path] = typer.Option(None, help="Folder of images: label sub-folders, flat, a Hugging "
                                                            "Face imagefolder (metadata.jsonl/csv) or .txt captions."),
           path: Optional[Path] = typer.Option(None, help="With --builtin fashion-mnist: the folder of its IDX files "
                                                          "(default: Debian's /usr/share/datasets/fashion-mnist)."),
           caption_column: Optional[str] = typer.Option(None, help="Metadata column of captions (default: text)."),
           label_column: Optional[str] = typer.Option(None, help="Metadata column of labels (default: the "
                                                                 "sub-folder of each file)."),
           split: str = typer.Option("iid:4", help="iid:K, by-class:K or one."),
           resize: bool = typer.Option(False, help="Convert images of another size or mode (bicubic)."),
           follow_symlinks: bool = typer.Option(False, help="Read what symbolic links in the folder point to "
                                                            "(refused by default)."),
           max_pixels: int = typer.Option(MAX_PIXELS, help="Largest image read, width x height (checked before "
                                                           "decoding)."),
           json_out: bool = typer.Option(False, "--json")) -> None:
    """Add a source's items to the store, assigning each to a compartment and a slice.
    A builtin's training split is ingested; its test split stays held out for `cdm eval`."""
    with _open(store) as s:
        if (builtin is None) == (folder is None):
            _fail("give exactly one of --builtin NAME or --folder DIR")
        cfg = s.config
        if builtin is not None:
            items = load_builtin(builtin, "train", path)
            if resize:
                items = api.resize_items(items, cfg.image_size, cfg.channels)
        else:
            items = load_folder(folder, cfg.image_size, cfg.channels, resize, follow_symlinks, caption_column,
                                label_column, max_pixels)
        r = api.ingest(s, source, items, split)
    _emit({"added": r.added, "duplicates": r.duplicates, "compartments": r.compartments}, json_out)
    if not json_out:
        out.print(f"added {r.added} item(s), skipped {r.duplicates} duplicate(s)")
        for c, n in r.compartments.items():
            out.print(f"  {c}: {n} items")


@app.command()
def train(store: Path, compartment: Optional[list[str]] = typer.Option(None, help="Only these (repeatable)."),
          paragon: bool = typer.Option(False, help="Also train the monolithic baseline on all items."),
          router: Optional[bool] = typer.Option(None, "--router/--no-router",
                                                help="Train the classifier router (default: when training all)."),
          steps: Optional[int] = typer.Option(None, help="Training steps of every denoiser (compartments, paragon, "
                                                         "base). Changes the store's recipe: models trained with "
                                                         "other steps become stale."),
          router_steps: Optional[int] = typer.Option(None, help="Training steps of the classifier router (its own "
                                                                "recipe; --steps does not apply to it)."),
          epochs: Optional[float] = typer.Option(None, help="Budget each denoiser in passes over its own items "
                                                            "(steps = epochs x items / batch, at least 100, at most "
                                                            "--steps); 0: a fixed step count again. Saved in the "
                                                            "recipe."),
          precision: Optional[str] = typer.Option(None, help="Training arithmetic: fp32, tf32 (CUDA) or bf16 "
                                                             "(autocast). Saved in the recipe (it changes the weights); "
                                                             "a new store's first run picks bf16 on CUDA, else fp32."),
          device: str = typer.Option("cpu", help="torch device, e.g. cpu, cuda, cuda:1."),
          executor: str = typer.Option("local", help="local (this process) or ray (one task per model)."),
          address: Optional[str] = typer.Option(None, help="Ray cluster address (default: start a local Ray)."),
          gpus_per_job: float = typer.Option(0, help="Ray: GPUs per job (> 0 trains on CUDA)."),
          threads: Optional[int] = typer.Option(None, help="torch threads per job (Ray: CPUs per job, default 1). "
                                                           "Same threads => bit-identical weights."),
          json_out: bool = typer.Option(False, "--json")) -> None:
    """Train every compartment without an up-to-date model; resumes interrupted work."""
    with _open(store) as s:
        ex = api.make_executor(executor, device, threads, address, gpus_per_job)
        knobs = lambda: (api.train_config(s).steps, api.router_config(s).steps, api.train_config(s).epochs,  # noqa: E731
                         api.train_config(s).precision)
        before = knobs()
        prog, cb = training_progress(err)
        with prog:
            results = api.train(s, compartment or None, paragon, router, steps, device, cb, executor=ex,
                                router_steps=router_steps, epochs=epochs, precision=precision)
        after = knobs()
        for what, old, new in zip(("denoiser steps", "classifier router steps", "denoiser epochs", "precision"),
                                  before, after):
            if old == "auto" and new == "fp32":
                continue  # what auto already meant: nothing changes
            if old == "auto":
                err.print(f"recipe: precision {new}, the first training on this device (saved in the store)")
            elif old != new:
                err.print(f"recipe changed: {what} {old} -> {new} (saved in the store; models trained "
                          f"with {old} are stale until retrained)")
        recipe = api.train_config(s)
        rows = [dict(name=r.name, kind=r.kind, items=r.items, steps=r.steps, seconds=round(r.seconds, 2),
                     steps_per_s=round(r.steps / r.seconds, 2) if r.seconds else None,
                     final_loss=r.final_loss, resumed_from=r.resumed_from, digest=s.model(r.name).digest,
                     **_explained(recipe, r)) for r in results]
    _emit(rows, json_out)
    if not json_out:
        if not rows:
            out.print("everything is up to date")
        t = Table("model", "items", "steps run", "seconds", "steps/s", "final loss", "from", "digest")
        for r in rows:
            run = str(r["steps"]) if "planned" not in r else (
                f"{r['steps']} *" if r["steps"] == r["planned"] else f"{r['steps']} of {r['planned']} *")
            t.add_row(r["name"], str(r["items"]), run, f"{r['seconds']:.1f}", str(r["steps_per_s"]),
                      f"{r['final_loss']:.4f}" if r["final_loss"] is not None else "-", r["resumed_from"],
                      r["digest"][:12])
        if rows:
            out.print(t)
        for r in rows:  # every step count that is not the recipe's, explained
            for note in r.get("notes", []):
                out.print(f"* {escape(r['name'])}: {escape(note)}")


def _explained(recipe, r) -> dict:
    """For a model whose steps are not its recipe's: `planned` (the recipe's) and `notes` (why);
    nothing when they agree."""
    notes = [*_budget_note(recipe, r), *r.notes]
    return dict(planned=r.planned, notes=notes) if notes or r.steps != r.planned else {}


def _budget_note(recipe, r) -> list[str]:
    """A denoiser whose epoch budget (`--epochs`) gave it fewer steps than the recipe's `--steps`."""
    if r.kind == "router" or recipe.epochs is None or r.planned == recipe.steps:
        return []
    return [f"{r.planned} steps, not {recipe.steps}: the recipe budgets {recipe.epochs:g} epoch(s) over its "
            f"{r.items} items at batch {recipe.batch_size} (at least {recipe.min_steps}, at most --steps)"]


@app.command()
def adapters(store: Path, public: Optional[list[str]] = typer.Option(None, help="Source the base model trains on "
                                                                            "(repeatable): marks it public."),
             base_from: Optional[Path] = typer.Option(None, help="Import the base from a diffusers UNet folder, or a "
                                                                 "Stable Diffusion folder (its UNet, text encoder, "
                                                                 "VAE and schedule)."),
             kind: str = typer.Option("lora", help="lora (a LoRA adapter per compartment), prompt (a learned "
                                                   "prompt per compartment; text-conditioned stores) or full (a full "
                                                   "fine-tune of the base per compartment)."),
             rank: int = typer.Option(4, help="LoRA rank of each compartment's adapter."),
             alpha: Optional[float] = typer.Option(None, help="LoRA alpha (scale = alpha / rank; default 4 x rank)."),
             tokens: int = typer.Option(4, help="Vectors of each compartment's learned prompt (--kind prompt)."),
             off: bool = typer.Option(False, "--off", help="Back to full-model compartments."),
             json_out: bool = typer.Option(False, "--json")) -> None:
    """Make compartments LoRA adapters on a shared base model trained only on public sources."""
    with _open(store) as s:
        if not off and not public and base_from is None:
            a = api.adapter_config(s)
        elif off and (public or base_from):
            _fail("--off takes no --public or --base-from")
        else:
            a = api.set_adapters(s, public, base_from, rank, alpha, off, kind=kind, tokens=tokens)
    _emit(None if a is None else asdict(a), json_out)
    if not json_out:
        if a is None:
            out.print("compartments are full models")
        else:
            base = f"trained on public source(s) {', '.join(a.public)}" if a.public else f"imported ({a.base_from[:12]})"
            what = {"prompt": f"learned prompts ({a.tokens} vectors)", "full": "full fine-tunes"}.get(
                a.kind, f"LoRA adapters (rank {a.rank}, alpha {a.alpha:g})")
            out.print(f"compartments are {what} on a base model {base}")


@app.command()
def text(store: Path, encoder: Optional[Path] = typer.Option(None, help="Folder with text_encoder/ and tokenizer/ "
                                                                      "(CLIPTextModel + CLIPTokenizer, e.g. a Stable "
                                                                      "Diffusion folder); default: the embedded "
                                                                      "data-free encoder."),
         train_on: Optional[list[str]] = typer.Option(None, "--train-on", help="Train the encoder here, "
                                                      "contrastively, on this source's captioned items (repeatable): "
                                                      "marks it public, every composition reads the encoder."),
         encoder_steps: Optional[int] = typer.Option(None, min=1, help="With --train-on: the encoder's training "
                                                                        "steps (default 1500)."),
         off: bool = typer.Option(False, "--off", help="Back to class-label conditioning."),
         show: bool = typer.Option(False, "--show", help="Only print the current setting."),
         json_out: bool = typer.Option(False, "--json")) -> None:
    """Condition every denoiser on its items' captions through a frozen text encoder (sample with
    --prompt). Every model becomes stale; `cdm train` rebuilds them."""
    with _open(store) as s:
        if off and encoder is not None:
            _fail("--off takes no --encoder")
        if encoder_steps is not None and not train_on:
            _fail("--encoder-steps goes with --train-on")
        recipe = None if encoder_steps is None else api.EncoderConfig(steps=encoder_steps)
        t = api.text_config(s) if show else api.set_text(s, encoder, off, train_on=train_on, recipe=recipe)
    _emit(None if t is None else asdict(t), json_out)
    if not json_out:
        if t is None:
            out.print("denoisers are conditioned on class labels")
        elif t.public:
            out.print(f"denoisers are conditioned on captions: a text encoder trained here on public source(s) "
                      f"{escape(', '.join(t.public))} (from the data-free {t.digest[:12]}, {t.max_length} tokens, "
                      f"width {t.dim}); `cdm train` trains it first")
        else:
            out.print(f"denoisers are conditioned on captions: text encoder {escape(t.source)} ({t.digest[:12]}, "
                      f"{t.max_length} tokens, width {t.dim})")


def options(cls, param: str, only: tuple[str, ...] | None = None, base=None):
    """Give a command one --option per field of the dataclass `cls` (type, default and help come
    from the field; defaults from `base` where given); the command receives the instance as
    `param`. Fields whose metadata says `cli: False`, or not in `only`, are left out."""
    hints = typing.get_type_hints(cls)
    base = base or cls()
    extra = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                               annotation=Optional[typing.get_args(hints[f.name])[0]] if getattr(base, f.name) is None
                               else hints[f.name],
                               default=typer.Option(getattr(base, f.name), help=f.metadata.get("help")))
             for f in dataclasses.fields(cls) if f.metadata.get("cli", True) and (only is None or f.name in only)]

    def decorate(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def command(**kwargs):
            with _errors():  # bad values are reported like every other error
                made = dataclasses.replace(base, **{p.name: kwargs.pop(p.name) for p in extra})
            return fn(**kwargs, **{param: made})

        command.__signature__ = sig.replace(parameters=[p for p in sig.parameters.values() if p.name != param]
                                            + extra)
        return command

    return decorate


@app.command()
@options(SamplingSettings, "settings")
def sample(store: Path, n: int = typer.Option(8, "-n", help="Number of samples."),
           label: Optional[str] = typer.Option(None, help="Class label (default: unconditional)."),
           prompt: Optional[str] = typer.Option(None, help="Prompt of every sample (text-conditioned stores)."),
           prompts: Optional[Path] = typer.Option(None, help="File of prompts, one per line: -n of each "
                                                           "(text-conditioned stores)."),
           allow: Optional[str] = typer.Option(None, help="Comma-separated compartments to compose (default: all)."),
           router: str = typer.Option(DEFAULT_ROUTER, help=f"Router: {router_help()}."),
           paragon: bool = typer.Option(False, help="Sample the paragon instead."),
           user: Optional[str] = typer.Option(None, help="Compose exactly what this user may use."),
           policy: Optional[Path] = typer.Option(None, help="Policy TOML (default: the store's policy)."),
           adapter_mode: str = typer.Option("merged", help="Adapter compartments: merged (fastest on CPU), loop "
                                                           "(one base in memory) or joint (one batched call)."),
           grouped: bool = typer.Option(False, help="All compartments in one wide call per step: faster for "
                                                    "small batches, equal to the default within float rounding."),
           out_dir: Path = typer.Option(Path("samples"), "--out", help="Where the PNGs go."),
           device: str = typer.Option("cpu"), json_out: bool = typer.Option(False, "--json"),
           settings: SamplingSettings = SamplingSettings()) -> None:
    """Sample from a composition of compartments, with per-sample attribution."""
    with _open(store) as s:
        allowed = None if allow is None else [a.strip() for a in allow.split(",") if a.strip()]
        if prompt is not None and prompts is not None:
            _fail("give --prompt or --prompts, not both")
        asked = prompt
        if prompts is not None:
            try:
                lines = [ln.strip() for ln in prompts.read_text(encoding="utf-8").splitlines() if ln.strip()]
            except (OSError, UnicodeDecodeError) as e:
                _fail(f"cannot read prompts file {prompts}: {e}")
            if not lines:
                _fail(f"prompts file {prompts} holds no prompt")
            asked = [p for p in lines for _ in range(n)]
        pipe = api.CDMPipeline.from_store(s, allowed, user=user, policy=Policy.load(policy) if policy else None,
                                      router=router, paragon=paragon, adapter_mode=adapter_mode, grouped=grouped,
                                      device=device)
        g = pipe(len(asked) if isinstance(asked, list) else n, label, settings, prompt=asked)
        if not pipe.text and label is None and s.captions():  # a captioned store sampled unconditionally
            err.print("[yellow]note:[/] this store's items have captions, but its models are conditioned on class "
                      "labels, so these samples follow no text. `cdm text STORE` conditions them on the captions "
                      "(then `cdm train`, and sample with --prompt).")
        files, grid = write_samples(g.images, out_dir)
        recs = g.records(files)
    _emit({"grid": grid, "compartments": g.compartments, "router": g.router, "samples": recs}, json_out)
    if not json_out:
        out.print(f"wrote {len(g.images)} sample(s) and {grid}")
        if g.attribution is not None:
            what = "prompt" if g.prompts is not None else "label"
            t = Table("sample", what, *g.compartments, title="attribution (trajectory-averaged weights)")
            for r in recs[:20]:
                t.add_row(str(r["index"]), escape(str(r[what])), *[f"{w:.3f}" for w in r["attribution"].values()])
            out.print(t)


@app.command()
def status(store: Path, json_out: bool = typer.Option(False, "--json")) -> None:
    """Sources, compartments, labels, models and router state."""
    with _open(store) as s:
        st = api.status(s)
    _emit(st, json_out)
    if json_out:
        return
    c = st["config"]
    out.print(f"[bold]{st['store']}[/]: {c['image_size']}x{c['image_size']}x{c['channels']}, seed {c['seed']}, "
              f"{c['slices']} slices, {st['items']} items, recipe {st['train']['preset']} x {st['train']['steps']} steps")
    out.print("sources: " + (", ".join(f"{k} ({v})" for k, v in st["sources"].items()) or "none"))
    out.print("labels: " + (", ".join(f"{k}:{v}" for k, v in st["labels"].items()) or "none"))
    t = Table("compartment", "source", "items", "model", "digest", "labels")
    for name, r in st["compartments"].items():
        t.add_row(name, r["source"], str(r["items"]), r["model"], (r["digest"] or "-")[:12],
                  " ".join(f"{k}:{v}" for k, v in r["labels"].items()))
    out.print(t)
    out.print(f"paragon: {st['paragon']['state']}   classifier router: {st['router']['state']}")
    if st["adapters"]:
        a = st["adapters"]
        out.print(f"adapters: rank {a['rank']} on a base model "
                  + (f"trained on public source(s) {', '.join(a['public'])}" if a["public"] else "imported")
                  + f": {a['base']}")
    if st["text"]:
        t = st["text"]
        out.print(f"conditioned on captions: text encoder {escape(t['source'])} ({t['digest'][:12]})" + (
            f", trained on public source(s) {escape(', '.join(t['public']))}: {t['encoder']}" if t["public"] else ""))
    if st["latent"]:
        out.print(f"latent space: VAE {escape(st['latent']['source'])} ({st['latent']['digest'][:12]}, "
                  f"{st['latent']['factor']}x smaller, {st['latent']['channels']} channels)")
    if st["policy"]:
        out.print("store policy: " + escape("; ".join(f"{u}: {', '.join(r['compartments']) or '(nothing)'}"
                                                      for u, r in st["policy"].items())))
        for u, r in st["policy"].items():
            if r.get("missing"):
                out.print(f"[yellow]warning:[/] {escape('; '.join(r['missing']))}: not in the store, grants nothing")
    out.print(f"[dim]note: {st['router']['note']}[/]")


@app.command("eval")
@options(SamplingSettings, "sampling", only=("steps", "guidance", "seed"), base=EVALUATION)
def eval_cmd(store: Path, samples: int = typer.Option(1000, help="Samples per model (1000+ separates models)."),
             router: list[str] = typer.Option([DEFAULT_ROUTER], help=f"Routers to score (repeatable): {', '.join(ROUTER_SPECS)}."),
             allow: Optional[str] = typer.Option(None, help="Comma-separated compartments (default: all)."),
             paragon: Optional[bool] = typer.Option(None, "--paragon/--no-paragon", help="Score the paragon (default: when trained)."),
             real: str = typer.Option("digits", help="Held-out real images: a builtin's test split or a folder."),
             inception: Optional[Path] = typer.Option(None, help="TorchScript Inception file for Inception-FID."),
             clip: Optional[Path] = typer.Option(None, help="Text stores: a local CLIPModel folder (with its tokenizer) "
                                                            "for R-precision and CLIP score (default: cdm's own "
                                                            "alignment model, trained on the held-out pairs)."),
             attribution: int = typer.Option(0, help="Unconditional samples for attribution accuracy (by-class splits)."),
             device: str = typer.Option("cpu"), json_out: bool = typer.Option(False, "--json"),
             sampling: SamplingSettings = EVALUATION) -> None:
    """FID against held-out images (beside the real-vs-real floor), conditional accuracy, memorization."""
    with _open(store) as s:
        if samples < 2:
            _fail("--samples must be >= 2")
        allowed = None if allow is None else [a.strip() for a in allow.split(",") if a.strip()]
        cfg = api.EvalConfig(samples=samples, sampling=sampling, attribution_samples=attribution)
        with err.status("evaluating") as st:
            rep = api.evaluate_store(s, router, paragon, allowed, cfg, real, inception, device,
                                 log=lambda m: st.update(m), clip=clip)
    _emit(rep.to_dict(), json_out)
    if not json_out:
        out.print(f"reference: {rep.reference} (held-out), features: {rep.features}, {samples} samples, "
                  f"{sampling.steps} steps, guidance {sampling.guidance}")
        out.print(rep.table(), soft_wrap=True)


@app.command()
def key(user: str = typer.Option(..., help="Whose key (for the hint printed)."),
        json_out: bool = typer.Option(False, "--json")) -> None:
    """Make a new API key for `cdm serve`: give the key to the user, put its hash in the policy."""
    k, h = new_key()
    _emit({"user": user, "key": k, "sha256": h}, json_out)
    if not json_out:
        out.print(f"key for {user}: {k}\nadd to the policy:\n  [users.{user}]\n  keys = [\"{h}\"]")


@app.command()
@options(ServeConfig, "config")
def serve(store: Path, policy: Path = typer.Option(..., help="Policy TOML: users, their compartments, key hashes."),
          host: str = typer.Option("127.0.0.1"), port: int = typer.Option(8000),
          config: ServeConfig = ServeConfig()) -> None:
    """Serve compositions over HTTP, each API key limited to its user's compartments (docs at /docs)."""
    import uvicorn  # the HTTP stack (FastAPI, uvicorn) loads for `cdm serve` only: +0.7 s on every other command

    with _errors():
        app_ = api.create_app(store, Policy.load(policy), config)
    uvicorn.Server(api.server_config(app_, config, host, port)).run()


@app.command()
def forget(store: Path, item: Optional[list[str]] = typer.Option(None, help="Item id (repeatable; see `cdm items`)."),
           file: Optional[list[Path]] = typer.Option(None, help="The item with this file's pixels (repeatable): "
                                                                "the image an owner hands over."),
           source: Optional[str] = typer.Option(None, help="Drop a whole source; with --item/--file, forget only "
                                                            "this source's copies of those items."),
           compartment: Optional[str] = typer.Option(None, help="Drop a whole compartment."),
           retrain: bool = typer.Option(True, help="Retrain affected models now (else they stay missing)."),
           device: str = typer.Option("cpu"),
           executor: str = typer.Option("local", help="Where retraining runs: local or ray (as in `cdm train`)."),
           address: Optional[str] = typer.Option(None, help="Ray cluster address (default: start a local Ray)."),
           gpus_per_job: float = typer.Option(0, help="Ray: GPUs per job."),
           threads: Optional[int] = typer.Option(None, help="torch threads per job (Ray: CPUs per job)."),
           json_out: bool = typer.Option(False, "--json")) -> None:
    """Forget items, a source or a compartment exactly: retrain only what saw them, from the slice before."""
    with _open(store) as s:
        items = [*(item or []), *(_item_of_file(s, f, source) for f in file or [])]
        ex = api.make_executor(executor, device, threads, address, gpus_per_job)
        prog, cb = training_progress(err)
        with prog:
            r = api.forget(s, items or None, source, compartment, retrain, device, cb, executor=ex)
    _emit(asdict(r), json_out)
    if not json_out:
        out.print(f"forgot {len(r.items)} item(s)" + (f", dropped {', '.join(r.dropped)}" if r.dropped else ""))
        for x in r.retrained:
            out.print(f"  retrained {x['name']} from {x['resumed_from']}: {x['steps']} steps, {x['seconds']:.1f} s")
        out.print(f"  classifier router: {r.router}; took {r.seconds:.1f} s")


def _item_of_file(s: Store, path: Path, source: str | None = None) -> str:
    h = file_item_id(path, s.config.image_size, s.config.channels)
    if not s.has_items([h], source):
        raise NotFound(f"no item {f'of source {source!r}' if source else 'of this store'} has the pixels of "
                       f"{path} (its id here would be {h})")
    return h


@app.command()
def items(store: Path, source: Optional[str] = typer.Option(None, help="Only this source's items."),
          compartment: Optional[str] = typer.Option(None, help="Only this compartment's items."),
          file: Optional[list[Path]] = typer.Option(None, help="Look up the item of this image file (repeatable)."),
          json_out: bool = typer.Option(False, "--json")) -> None:
    """List items (id, source, compartment, slice, label, caption), or find the item of a file."""
    with _open(store) as s:
        if compartment is not None:
            s.require_compartments([compartment])
        if source is not None:
            s.require_source(source)
        if file:  # each source's copy of the file's pixels (of --source only, if given)
            rows = [r for f in file for r in s.item_rows([_item_of_file(s, f, source)], source)]
        else:
            rows = [r for r in s.items(compartment) if source is None or r.source == source]
        rows = [r for r in rows if compartment is None or r.compartment == compartment]
        names, caps = s.label_names(), s.captions(rows)
        recs = [dict(id=r.hash, source=r.source, compartment=r.compartment, slice=r.slice,
                     label=None if r.label is None else names[r.label], caption=caps.get((r.source, r.hash)))
                for r in rows]
    _emit(recs, json_out)
    if not json_out:
        t = Table("id", "source", "compartment", "slice", "label", "caption")
        for r in recs:
            t.add_row(r["id"], r["source"], r["compartment"], str(r["slice"]), r["label"] or "-", escape(r["caption"] or ""))
        out.print(t)


@app.command("policy")
def policy_cmd(store: Path, set_file: Optional[Path] = typer.Option(None, "--set", help="Make this TOML the store's policy."),
               allow_missing: bool = typer.Option(False, help="With --set: accept names the store does not hold "
                                                              "(they grant nothing until such data is ingested)."),
               json_out: bool = typer.Option(False, "--json")) -> None:
    """Show or set the store's default access policy (users -> sources/compartments)."""
    with _open(store) as s:
        if set_file is not None:
            set_store_policy(s, Policy.load(set_file), allow_missing=allow_missing)
        pol = store_policy(s)
        view = {} if pol is None else {u: pol.allowed(s, u) for u in sorted(pol.users)}
        missing = {} if pol is None else pol.missing(s)
    _emit(view, json_out)
    if not json_out:
        if not view:
            out.print("no store policy")
        for u, comps in view.items():
            out.print(escape(f"{u}: {', '.join(comps) or '(nothing at present)'}"))
        for u, names in missing.items():
            err.print(f"[yellow]warning:[/] {escape('; '.join(names))}: not in the store, grants nothing")


@app.command()
def audit(store: Path, json_out: bool = typer.Option(False, "--json")) -> None:
    """The event log: ingest, train, forget and config changes, with item hashes and model digests."""
    with _open(store) as s:
        events = s.events()
    _emit(events, json_out)
    if not json_out:
        t = Table("id", "time", "kind", "actor", "detail")
        for e in events:
            d = e["detail"]
            if e["kind"] == "ingest":
                text = f"{d['source']}: +{d['added']} items ({d['duplicates']} duplicates), split {d['split']}"
            elif e["kind"] == "forget":
                text = (f"{len(d['items'])} item(s) forgotten"
                        + (f", dropped {', '.join(d['dropped'])}" if d["dropped"] else "")
                        + f"; models invalidated: {', '.join(d['models_before']) or 'none'}")
            elif e["kind"] == "train":
                text = f"{d['model']} -> {d['digest'][:12]} ({d['steps_run']} steps from {d['resumed_from']})"
            else:
                text = str(d)
            t.add_row(str(e["id"]), e["time"], e["kind"], e["actor"], text)
        out.print(t)


@app.command()
def demo(out_dir: Path = typer.Option(Path("cdm-demo"), "--out", help="Store, samples and report.md go here."),
         quick: bool = typer.Option(False, help="A ~1 minute smoke run with fewer steps."),
         text: bool = typer.Option(False, help="Also the text-to-image story: the digits captioned with their "
                                               "names, prompts, alignment."),
         device: str = typer.Option("cpu"), steps: Optional[int] = typer.Option(None, hidden=True),
         preset: Optional[str] = typer.Option(None, hidden=True),
         samples_per_label: Optional[int] = typer.Option(None, hidden=True)) -> None:
    """The whole story on the embedded digits: ingest, train, compose, attribute, report."""
    cfg = api.DemoConfig.quick() if quick else api.DemoConfig()
    overrides = {k: v for k, v in dict(steps=steps, preset=preset, samples_per_label=samples_per_label).items()
                 if v is not None}
    overrides["text"] = text
    with _errors():
        report = api.run_demo(out_dir, cfg.replace(**overrides), device, err)
    out.print(f"report: [bold]{report}[/]")


if __name__ == "__main__":
    app()
