"""Text conditioning: a frozen CLIP text encoder (Radford et al. 2021) that holds no private data.

A text-conditioned store encodes every caption and prompt with one frozen encoder, kept in
the store as an encoder folder in the transformers / Stable Diffusion layout::

    text_encoder/   CLIPTextModel (config.json, model.safetensors)
    tokenizer/      CLIPTokenizer (vocab.json, merges.txt, ...)

It is either imported from a folder the user has (an SD folder's two parts) or the
embedded default: a byte-level CLIP tokenizer (every UTF-8 byte is a token: no vocabulary
to download) and a small CLIPTextModel whose weights are a function of a seed only. The
default is data-free, so no owner's caption is inside it and forgetting never touches it.
The encoder folder's digest is part of every text-conditioned model's spec: a new encoder
makes every model stale (docs/architecture.md, "Text conditioning").

Prompts are padded to the encoder's full length and the UNet attends to every position,
as Stable Diffusion does; the empty prompt is the null condition of guidance.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import torch

from .denoisers import fixed_chunks
from ..store.recipes import TextConfig
from ..store.registry import owner_only, refuse_links
from ..errors import DataError, StoreError

ENCODER, TOKENIZER = "text_encoder", "tokenizer"
SAFETENSORS = "model.safetensors"  # transformers' weights file: the only one read
PART_FILES = {  # the only files of an encoder folder that cdm digests, copies into a store and reads
    ENCODER: ("config.json", SAFETENSORS),
    TOKENIZER: ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                "tokenizer.json"),
}


def _byte_symbols() -> list[str]:
    """CLIP's reversible map of the 256 bytes onto printable characters (bytes_to_unicode)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def quiet_transformers() -> None:
    """No load reports or progress bars from transformers on every open and save."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def build_default(folder: Path, max_length: int = 77, width: int = 64, layers: int = 2, heads: int = 4,
                  seed: int = 0) -> Path:
    """Write the embedded default encoder folder: byte-level CLIP tokenizer (no merges) and a
    small CLIPTextModel initialised from `seed`. Nothing in it comes from data."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    quiet_transformers()
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    tok_dir, enc_dir = folder / TOKENIZER, folder / ENCODER
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(vocab=str(tok_dir / "vocab.json"), merges=str(tok_dir / "merges.txt"),
                        model_max_length=max_length)
    tok.save_pretrained(tok_dir)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=width, intermediate_size=4 * width,
                            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=max_length,
                            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                            pad_token_id=vocab["<|endoftext|>"], projection_dim=width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(config)
    model.save_pretrained(enc_dir, safe_serialization=True)
    return folder


def part_files(folder: Path) -> list[Path]:
    """The files of an encoder folder that cdm uses (`PART_FILES`, those present), in digest order."""
    return sorted(p for part, names in PART_FILES.items() for n in names if (p := folder / part / n).is_file())


def folder_digest(folder: Path) -> str:
    """Digest of an encoder folder: the files cdm uses of its two parts, by relative path and content."""
    h = hashlib.sha256()
    for p in part_files(folder):
        h.update(p.relative_to(folder).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def check_folder(folder: Path) -> tuple[TextConfig, "TextEncoder"]:
    """Validate an encoder folder (an SD folder, or one holding `text_encoder/` and `tokenizer/`);
    returns its description and the loaded encoder. The error names the part that is missing or
    does not load."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StoreError(f"text encoder folder {folder} does not exist")
    for part in (ENCODER, TOKENIZER):
        if not (folder / part).is_dir():
            raise StoreError(f"text encoder folder {folder} has no {part}/ (a CLIP text encoder needs "
                             f"{ENCODER}/ and {TOKENIZER}/, as in a Stable Diffusion folder)")
    refuse_links(folder / ENCODER, folder / TOKENIZER)
    if not (folder / ENCODER / SAFETENSORS).is_file():
        raise DataError(f"{folder / ENCODER} has no {SAFETENSORS}: cdm reads safetensors weights only, never "
                        "pickled ones (.bin). Convert them once with transformers: CLIPTextModel.from_pretrained(DIR)"
                        ".save_pretrained(DIR, safe_serialization=True)")
    try:
        enc = TextEncoder(folder)
    except StoreError:
        raise
    except Exception as e:
        raise StoreError(f"text encoder folder {folder} does not load: {e}") from e
    return TextConfig(folder_digest(folder), str(folder), enc.max_length, enc.dim), enc


def install(folder: Path, dest_root: Path, digest: str) -> Path:
    """Copy an encoder folder's two parts to dest_root/<digest> (atomically: temporary name, rename)."""
    dest = dest_root / digest
    if dest.exists():
        return dest
    dest_root.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = dest_root.parent / f".tmp-text-{digest[:16]}"
    shutil.rmtree(tmp, ignore_errors=True)
    for p in part_files(folder):  # only what the encoder reads: nothing else in the folder comes along
        (tmp / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, tmp / p.parent.name / p.name)
    owner_only(tmp)  # the store's files are owner-only, whatever the source's modes (docs/security.md)
    if folder_digest(tmp) != digest:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StoreError(f"text encoder folder {folder} changed while it was copied")
    tmp.replace(dest)
    return dest


class TextEncoder:
    """A frozen tokenizer + CLIPTextModel: prompts -> embeddings (B, max_length, dim)."""

    def __init__(self, folder: Path, device: str | torch.device = "cpu"):
        from transformers import CLIPTextModel, CLIPTokenizer

        quiet_transformers()
        folder = Path(folder)
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(folder / TOKENIZER)
        except Exception as e:
            raise StoreError(f"{folder / TOKENIZER}: not a CLIP tokenizer ({e})") from e
        try:
            self.model = CLIPTextModel.from_pretrained(folder / ENCODER, use_safetensors=True).to(device).eval() \
                .requires_grad_(False)
        except Exception as e:
            raise StoreError(f"{folder / ENCODER}: not a CLIPTextModel ({e})") from e
        positions = self.model.config.max_position_embeddings
        self.max_length = min(int(self.tokenizer.model_max_length), positions)
        if len(self.tokenizer) > self.model.config.vocab_size:
            raise StoreError(f"{folder}: the tokenizer has {len(self.tokenizer)} tokens, the text encoder "
                             f"{self.model.config.vocab_size} (the two parts do not belong together)")
        self.dim = self.model.config.hidden_size
        self.device = torch.device(device)
        self._lock = threading.Lock()

    def lengths(self, prompts: list[str]) -> list[int]:
        """Tokens of each prompt, start and end included."""
        if not prompts:  # the fast tokenizer fails on an empty batch
            return []
        return [len(i) for i in self.tokenizer(prompts, truncation=False, verbose=False)["input_ids"]]

    def too_long(self, prompt: str, tokens: int, what: str = "prompt") -> str:
        return (f"{what} {prompt[:60]!r}{'...' if len(prompt) > 60 else ''} is {tokens} tokens; "
                f"the text encoder reads at most {self.max_length}")

    def misfits(self, named: list[tuple[str, str]], what: str = "caption") -> list[str]:
        """'NAME: ...' for each (name, text) longer than the encoder reads."""
        texts = [t for _, t in named]
        return [f"{name}: {self.too_long(t, n, what)}" for (name, t), n in zip(named, self.lengths(texts))
                if n > self.max_length]

    def check_store(self, store) -> None:
        """Refuse an encoder that some stored caption does not fit (the error names each item)."""
        bad = self.misfits([(f"item {h[:12]} of {src}", c) for (src, h), c in store.captions().items()])
        if bad:
            raise StoreError(f"{len(bad)} caption(s) do not fit the text encoder, nothing changed:\n  "
                             + "\n  ".join(bad[:20]))

    def check(self, prompts: list[str]) -> None:
        """Refuse a prompt longer than the encoder reads (it would be cut silently). The error
        does not quote the prompt: it may be a client's secret, and errors travel back."""
        for n in self.lengths(prompts):
            if n > self.max_length:
                raise DataError(f"a prompt of {n} tokens; the text encoder reads at most {self.max_length}")

    @torch.no_grad()
    def encode(self, prompts: list[str], chunk: int = 16) -> torch.Tensor:
        """Embeddings of `prompts` (the last hidden states, every position), float32. Calls run
        on exactly `chunk` prompts (the last one padded), so a prompt's embedding does not depend
        on the prompts encoded with it: forgetting a caption leaves the others' bits alone."""
        self.check(prompts)
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=False,
                             return_tensors="pt")["input_ids"]
        with self._lock:
            return fixed_chunks(lambda rows: self.model(ids[rows].to(self.device)).last_hidden_state.float(),
                                len(ids), chunk)


class Prompts:
    """Conditioning on prompts, under the denoiser convention: cond = {"text": (B, L, D)}.
    The empty prompt is the null condition (caption dropout in training, guidance here)."""

    def __init__(self, encoder: TextEncoder):
        self.encoder = encoder
        self._null = encoder.encode([""])

    def encode(self, prompts: list[str], device: torch.device | str = "cpu") -> dict:
        row = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        emb = self.encoder.encode(list(row))
        index = torch.tensor([row[p] for p in prompts])
        return {"text": emb[index].to(device)}

    def null(self, rows: int, device: torch.device | str = "cpu") -> dict:
        return {"text": self._null.to(device).expand(rows, -1, -1).contiguous()}


def load_encoder(folder: Path, digest: str, device: str | torch.device = "cpu") -> TextEncoder:
    """The encoder in `folder`, checked against `digest` (`cdm.sampling.loading.load_text` keeps it in memory)."""
    if not folder.is_dir() or folder_digest(folder) != digest:
        raise StoreError(f"text encoder files in {folder} are missing or corrupted (expected digest "
                         f"{digest[:12]}); set the encoder again with `cdm text`")
    return TextEncoder(folder, device)
