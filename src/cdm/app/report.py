"""Pictures for people: image grids, per-sample PNGs, and the router-weight plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def to_pil(img: np.ndarray, scale: int = 1) -> Image.Image:
    """uint8 (H, W, C) -> PIL image, upscaled with nearest neighbour so pixels stay crisp."""
    im = Image.fromarray(img[..., 0] if img.shape[2] == 1 else img)
    return im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST) if scale > 1 else im


def grid(images: np.ndarray, ncol: int | None = None, pad: int = 1) -> np.ndarray:
    """uint8 (N, H, W, C) -> one uint8 image with the samples in rows of `ncol`."""
    n, h, w, c = images.shape
    ncol = ncol or int(np.ceil(np.sqrt(n)))
    nrow = int(np.ceil(n / ncol))
    out = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, k = divmod(i, ncol)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = images[i]
    return out


def default_scale(image_size: int) -> int:
    return max(1, 64 // image_size)


def write_samples(images: np.ndarray, out: Path, ncol: int | None = None, scale: int | None = None) -> tuple[list[str], str]:
    """One PNG per sample at native resolution, and an upscaled grid.png. Returns the file names."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, img in enumerate(images):
        p = out / f"sample-{i:04d}.png"
        to_pil(img).save(p)
        files.append(str(p))
    g = out / "grid.png"
    to_pil(grid(images, ncol), scale or default_scale(images.shape[1])).save(g)
    return files, str(g)


def plot_weights(trace: np.ndarray, compartments: list[str], path: Path, title: str, samples: int = 4) -> None:
    """Router weights over the sampling steps: the mean over samples, and a few single trajectories."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(1, trace.shape[0] + 1)
    fig, axes = plt.subplots(1, 1 + samples, figsize=(3.2 * (1 + samples), 3), sharey=True)
    for k, c in enumerate(compartments):
        axes[0].plot(steps, trace[:, :, k].mean(1), label=c)
    axes[0].set_title("mean over samples")
    axes[0].set_xlabel("sampling step")
    axes[0].set_ylabel("weight")
    for j in range(samples):
        ax = axes[1 + j]
        for k in range(len(compartments)):
            ax.plot(steps, trace[:, j, k])
        ax.set_title(f"sample {j}")
        ax.set_xlabel("sampling step")
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
