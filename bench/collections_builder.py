"""Build the benchmark collections (chunked HDF5), streaming so memory stays small.

    python bench/collections_builder.py planted --K 1000000 -o bench/data/planted_1m.h5
    python bench/collections_builder.py patches -o bench/data/patches_rgb.h5
    python bench/collections_builder.py rgb -o bench/data/rgb_patches.h5
    python bench/collections_builder.py columns -o bench/data/columns_384.h5
    python bench/collections_builder.py gray -o bench/data/gray_patches.h5
    python bench/collections_builder.py pde -o bench/data/pde_trajectories.h5

planted: K matrices of 32 x 16 float32 from 500 random rank-6 subspaces plus 1% noise (the
scale target of the out-of-core issue); the planted labels are stored as `planted_labels`.
patches: 14,158 RGB patches of 8 x 8 pixels (64 x 3) cut from a synthetic image with a
natural-image-like 1/f spectrum and correlated colour channels.
rgb: the 14,158 non-overlapping 8 x 8 RGB patches (64 x 3) of four photographs shipped with
scikit-image (needs `pip install scikit-image`).
columns: 10,000 one-column blocks of 384 rows, columns of a weight-like matrix with a
power-law spectrum (like a transformer layer's weights).
gray: the 9,589 non-overlapping 16 x 16 grayscale patches (float32 in [0, 1]) of twelve
photographs shipped with scikit-image (needs scikit-image; ~1 s).
pde: 550 trajectories of 128 grid points x 48 time steps (float64) of advection, diffusion
and viscous Burgers equations with random initial conditions and parameters (numpy only; ~7 s).

Times are on the 2-core benchmark VM of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import time

import h5py
import numpy as np


def planted(path: str, K: int, m: int = 32, n: int = 16, subspaces: int = 500, rank: int = 6,
            noise: float = 0.01, seed: int = 0, chunk: int = 4096) -> None:
    rng = np.random.default_rng(seed)
    bases = np.stack([np.linalg.qr(rng.standard_normal((m, rank)))[0] for _ in range(subspaces)])
    with h5py.File(path, "w") as f:
        data = f.create_dataset("matrices", shape=(K, m, n), dtype="f4", chunks=(chunk, m, n))
        labels = f.create_dataset("planted_labels", shape=(K,), dtype="i8")
        for start in range(0, K, chunk):
            b = min(chunk, K - start)
            lab = rng.integers(0, subspaces, size=b)
            clean = np.einsum("bmr,brn->bmn", bases[lab], rng.standard_normal((b, rank, n)))
            norms = np.linalg.norm(clean, axis=(1, 2), keepdims=True)
            mats = clean + noise * norms / np.sqrt(m * n) * rng.standard_normal((b, m, n))
            data[start : start + b] = mats.astype("f4")
            labels[start : start + b] = lab


def _pink_field(rng, size: int, channels: int) -> np.ndarray:
    fx = np.fft.fftfreq(size)[:, None]
    fy = np.fft.fftfreq(size)[None, :]
    amp = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / size)
    base = np.real(np.fft.ifft2(amp * np.exp(2j * np.pi * rng.random((size, size)))))
    mix = np.array([[1.0, 0.9, 0.8], [0.0, 0.3, 0.2], [0.0, 0.0, 0.3]])[:channels]
    extra = [np.real(np.fft.ifft2(amp * np.exp(2j * np.pi * rng.random((size, size))))) for _ in range(2)]
    layers = np.stack([base, *extra])  # (3, size, size)
    return np.einsum("cl,lxy->xyc", mix.T[:, :3], layers) + 0.05 * rng.standard_normal((size, size, 3))


def patches(path: str, K: int = 14158, side: int = 8, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    image = _pink_field(rng, 1024, 3)
    ys = rng.integers(0, image.shape[0] - side, size=K)
    xs = rng.integers(0, image.shape[1] - side, size=K)
    out = np.stack([image[y : y + side, x : x + side].reshape(side * side, 3) for y, x in zip(ys, xs)])
    with h5py.File(path, "w") as f:
        f.create_dataset("patches", data=out.astype("f4"), chunks=(min(K, 4096), side * side, 3))


def rgb_patches(path: str, side: int = 8, seed: int = 0) -> None:
    """Non-overlapping 8 x 8 RGB patches (64 x 3) of four photographs shipped with
    scikit-image (astronaut, coffee, chelsea, rocket): 4096 + 3750 + 2072 + 4240 = 14,158."""
    try:
        import skimage.data
    except ImportError:
        raise SystemExit("the rgb collection needs scikit-image: pip install scikit-image") from None
    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        image = getattr(skimage.data, name)().astype(np.float32) / 255.0
        rows, cols = image.shape[0] // side, image.shape[1] // side
        tiles = image[: rows * side, : cols * side].reshape(rows, side, cols, side, 3)
        out.append(tiles.transpose(0, 2, 1, 3, 4).reshape(rows * cols, side * side, 3))
    data = np.concatenate(out)
    with h5py.File(path, "w") as f:
        f.create_dataset("patches", data=data, chunks=(min(len(data), 4096), side * side, 3))


#: (name, grayscale?) of the photographs cut into grayscale patches; the colour ones are
#: converted with scikit-image's luminance weights.
GRAY_PHOTOS = (("camera", True), ("astronaut", False), ("coffee", False), ("chelsea", False),
               ("rocket", False), ("brick", True), ("grass", True), ("gravel", True),
               ("moon", True), ("coins", True), ("page", True), ("text", True))


def gray_patches(path: str, side: int = 16, seed: int = 0) -> None:
    """Non-overlapping 16 x 16 grayscale patches of twelve photographs shipped with
    scikit-image: 6 x 1024 (the 512 x 512 ones) + 925 + 504 + 1040 + 432 + 264 + 280 = 9,589.
    ``seed`` is unused (the patches are fixed); it is accepted like the other builders'."""
    try:
        import skimage.color
        import skimage.data
    except ImportError:
        raise SystemExit("the gray collection needs scikit-image: pip install scikit-image") from None
    out = []
    for name, is_gray in GRAY_PHOTOS:
        image = getattr(skimage.data, name)()
        image = image.astype(np.float32) / 255.0 if is_gray else skimage.color.rgb2gray(image).astype(np.float32)
        rows, cols = image.shape[0] // side, image.shape[1] // side
        tiles = image[: rows * side, : cols * side].reshape(rows, side, cols, side)
        out.append(tiles.transpose(0, 2, 1, 3).reshape(rows * cols, side, side))
    data = np.concatenate(out)
    with h5py.File(path, "w") as f:
        f.create_dataset("patches", data=data, chunks=(min(len(data), 4096), side, side))


def pde_trajectories(path: str, K: int = 550, points: int = 128, steps: int = 48, seed: int = 0,
                     duration: float = 2.0, dt: float = 1e-3) -> None:
    """K trajectories u(x, t) on a periodic grid of ``points`` over [0, 2 pi), sampled at
    ``steps`` equally spaced times in [0, duration] (column j is time j), one matrix each.

    Every trajectory solves u_t = -c u_x - b (u^2 / 2)_x + D u_xx: a third advection (b = 0,
    c in [0.5, 2], a little diffusion), a third diffusion (c = b = 0, D in [0.02, 0.5]), a third
    viscous Burgers (c = 0, b = 1, D in [0.02, 0.1]). Initial conditions are random Fourier
    series (modes 1..6, amplitudes ~ k^-1.5, random overall scale in [0.5, 2]).

    Central differences in space and classical Runge-Kutta in time, all K trajectories stepped
    together. py-pde solves the same equations but took ~1 s per trajectory here (it sets up a
    solver for each), ~9 minutes for 550; this takes ~7 s."""
    rng = np.random.default_rng(seed)
    x = np.arange(points) * (2 * np.pi / points)
    dx = x[1]
    kind = np.arange(K) % 3
    c = np.where(kind == 0, rng.uniform(0.5, 2.0, K), 0.0)[:, None]
    b = (kind == 2).astype(float)[:, None]
    D = np.select([kind == 0, kind == 1], [rng.uniform(0.005, 0.02, K), rng.uniform(0.02, 0.5, K)],
                  rng.uniform(0.02, 0.1, K))[:, None]
    modes = np.arange(1, 7)
    amp = rng.standard_normal((K, modes.size)) * modes ** -1.5 * rng.uniform(0.5, 2.0, (K, 1))
    phase = rng.uniform(0, 2 * np.pi, (K, modes.size))
    u = np.einsum("km,kmx->kx", amp, np.sin(modes[None, :, None] * x[None, None, :] + phase[:, :, None]))

    def ddx(v):
        return (np.roll(v, -1, axis=1) - np.roll(v, 1, axis=1)) / (2 * dx)

    def rhs(v):
        lap = (np.roll(v, -1, axis=1) - 2 * v + np.roll(v, 1, axis=1)) / dx**2
        return -c * ddx(v) - b * ddx(0.5 * v * v) + D * lap

    out = np.empty((K, points, steps))
    per_snapshot = int(round(duration / (steps - 1) / dt))
    out[:, :, 0] = u
    for j in range(1, steps):
        for _ in range(per_snapshot):
            k1 = rhs(u)
            k2 = rhs(u + 0.5 * dt * k1)
            k3 = rhs(u + 0.5 * dt * k2)
            k4 = rhs(u + dt * k3)
            u = u + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        out[:, :, j] = u
    if not np.isfinite(out).all():
        raise SystemExit("the PDE solver diverged: lower dt")
    with h5py.File(path, "w") as f:
        f.create_dataset("trajectories", data=out, chunks=(min(K, 256), points, steps))


def columns(path: str, K: int = 10000, rows: int = 384, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.standard_normal((rows, rows)))[0]
    spectrum = (1.0 + np.arange(rows)) ** -0.8
    w = (u * spectrum) @ rng.standard_normal((rows, K)) / np.sqrt(rows)
    with h5py.File(path, "w") as f:
        f.create_dataset("columns", data=w.T[:, :, None].astype("f4"), chunks=(min(K, 4096), rows, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["planted", "patches", "rgb", "columns", "gray", "pde"])
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--K", type=int)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    started = time.perf_counter()
    kwargs = {"seed": args.seed} | ({"K": args.K} if args.K else {})
    builders = {"planted": planted, "patches": patches, "rgb": rgb_patches, "columns": columns,
                "gray": gray_patches, "pde": pde_trajectories}
    builders[args.kind](args.output, **kwargs)
    print(f"wrote {args.output} in {time.perf_counter() - started:.1f} s "
          f"({os.path.getsize(args.output) / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
