"""Emoji by vendor, one captioned imagefolder per vendor: owners whose images differ in style.

The npm packages `emoji-datasource-<vendor>` each ship 64x64 PNGs under `img/<vendor>/64/`
and `emoji.json` (names, categories, which vendor has which image). This script fetches
them with the ordinary npm client (`npm pack --ignore-scripts`: a tarball, no Node code
runs), reads each tarball, and writes

    OUT/<vendor>/metadata.jsonl      file_name, text (the emoji's name), label (its category)
    OUT/<vendor>/<code>.png          64x64 RGBA, as shipped
    OUT/<vendor>/LICENCE.md          the image licence and the package's LICENSE

    python bench/emoji.py --out bench-work/emoji                      # google, twitter
    python bench/emoji.py --out bench-work/emoji --include-unlicensed  # also apple, facebook
    cdm ingest art --source google --folder bench-work/emoji/google --split one --resize --label-column label

Image licences (the packages' own LICENSE covers their code and data files):
google: Apache-2.0 (Noto Emoji); twitter: CC-BY-4.0 (Twemoji, attribution required);
apple and facebook: no licence is granted for reuse, so they are opt-in only
(`--include-unlicensed`, for research on your own machine), and their notice is printed.
With --common (the default) a vendor's folder holds only emoji every chosen vendor has,
so the owners differ in style, not in content. Nothing fetched is committed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
from pathlib import Path

LICENSED = {"google": "Apache-2.0 (Noto Emoji images, https://github.com/googlefonts/noto-emoji)",
            "twitter": "CC-BY-4.0 (Twemoji images, (c) Twitter, Inc. and other contributors; credit them)"}
UNLICENSED = {"apple": "Apple's emoji images: (c) Apple Inc.; no licence for reuse is granted",
              "facebook": "Facebook's emoji images: (c) Meta Platforms, Inc.; no licence for reuse is granted"}
SKIN = {"1F3FB": "light skin tone", "1F3FC": "medium-light skin tone", "1F3FD": "medium skin tone",
        "1F3FE": "medium-dark skin tone", "1F3FF": "dark skin tone"}


def label_of(category: str) -> str:
    """A cdm label for an emoji category ('Smileys & Emotion' -> 'Smileys and Emotion')."""
    return category.replace("&", "and")


def entries(emoji: list[dict], vendor: str) -> list[dict]:
    """One record per image the vendor ships: image file name, caption and label; skin-tone
    variants are items of their own, their tone named in the caption."""
    out = []
    for e in emoji:
        name = (e.get("name") or e.get("short_name") or e["unified"]).lower()
        label = label_of(e["category"])
        if e.get(f"has_img_{vendor}"):
            out.append(dict(image=e["image"], text=name, label=label))
        for tones, v in sorted((e.get("skin_variations") or {}).items()):
            if v.get(f"has_img_{vendor}"):
                words = ", ".join(SKIN.get(t.upper(), t) for t in tones.split("-"))
                out.append(dict(image=v["image"], text=f"{name}, {words}", label=label))
    return out


def read_package(tarball: Path, vendor: str) -> tuple[list[dict], dict[str, bytes], str]:
    """(records, PNG bytes by image name, the package's LICENSE text) from an npm tarball."""
    prefix = f"package/img/{vendor}/64/"
    images, emoji, licence = {}, None, ""
    with tarfile.open(tarball, "r:gz") as tar:
        for m in tar:
            if not m.isfile():
                continue
            if m.name == "package/emoji.json":
                emoji = json.load(tar.extractfile(m))
            elif m.name == "package/LICENSE":
                licence = tar.extractfile(m).read().decode("utf-8", "replace")
            elif m.name.startswith(prefix) and m.name.endswith(".png") and "/" not in m.name[len(prefix):]:
                images[m.name[len(prefix):]] = tar.extractfile(m).read()
    if emoji is None:
        raise SystemExit(f"{tarball}: no package/emoji.json; not an emoji-datasource package")
    recs = [r for r in entries(emoji, vendor) if r["image"] in images]
    return recs, images, licence


def write_imagefolder(out: Path, vendor: str, recs: list[dict], images: dict[str, bytes], licence: str) -> int:
    folder = out / vendor
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as f:
        for r in recs:
            (folder / r["image"]).write_bytes(images[r["image"]])
            f.write(json.dumps(dict(file_name=r["image"], text=r["text"], label=r["label"])) + "\n")
    terms = LICENSED.get(vendor) or UNLICENSED[vendor]
    (folder / "LICENCE.md").write_text(f"# {vendor} emoji images\n\nImages: {terms}.\n\n"
                                       f"## LICENSE of the npm package emoji-datasource-{vendor}\n\n{licence}")
    return len(recs)


def fetch(vendor: str, cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob(f"emoji-datasource-{vendor}-*.tgz"))
    if found:
        return found[-1]
    r = subprocess.run(["npm", "pack", f"emoji-datasource-{vendor}", "--ignore-scripts", "--silent",
                        "--pack-destination", str(cache)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"npm pack emoji-datasource-{vendor} failed: {r.stderr.strip()[-500:]}")
    return cache / r.stdout.strip().splitlines()[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cache", type=Path, default=None, help="where the npm tarballs are kept (default OUT/.npm)")
    ap.add_argument("--vendors", default=None, help="comma-separated (default: google,twitter, and apple,facebook "
                                                    "with --include-unlicensed)")
    ap.add_argument("--include-unlicensed", action="store_true", help="also the vendors whose images carry no licence")
    ap.add_argument("--no-common", dest="common", action="store_false", help="keep emoji only some vendors have")
    args = ap.parse_args()
    vendors = (args.vendors.split(",") if args.vendors else
               [*LICENSED, *(UNLICENSED if args.include_unlicensed else [])])
    bad = [v for v in vendors if v not in LICENSED and v not in UNLICENSED]
    if bad:
        raise SystemExit(f"unknown vendor(s) {', '.join(bad)}; known: {', '.join([*LICENSED, *UNLICENSED])}")
    blocked = [v for v in vendors if v in UNLICENSED and not args.include_unlicensed]
    if blocked:
        raise SystemExit(f"{', '.join(blocked)}: no licence for reuse; pass --include-unlicensed to fetch anyway")
    for v in vendors:
        if v in UNLICENSED:
            print(f"note: {UNLICENSED[v]} (fetched for research on this machine only)", file=sys.stderr)
    packs = {v: read_package(fetch(v, args.cache or args.out / ".npm"), v) for v in vendors}
    keep = set.intersection(*({r["image"] for r in recs} for recs, _, _ in packs.values())) if args.common else None
    counts = {}
    for v, (recs, images, licence) in packs.items():
        recs = [r for r in recs if keep is None or r["image"] in keep]
        counts[v] = write_imagefolder(args.out, v, recs, images, licence)
    print(json.dumps(dict(out=str(args.out), images=counts, common=args.common), indent=2))


if __name__ == "__main__":
    main()
