"""A deterministic synthetic multi-category dataset in MVTec AD layout: the embedded default.

Two textures (``fabric``, ``wood``) and two objects (``washer``, ``chip``). Normal images vary in
position, phase, rotation, illumination and sensor noise, so a per-pixel statistic of the training set is
a weak detector while local-structure features are not. Defects (scratch, hole, contamination, crack,
missing material, deformed or misplaced parts) are composited into a clean image through their mask, so
the mask is exact: pixels outside it equal the clean image bit for bit. Everything derives from the seed
through stable hashes, and PNGs are written with fixed settings, so two runs are byte-identical.
"""

from __future__ import annotations

import copy
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from tqdm import tqdm

from ..io import atomic_dir

Array = np.ndarray


@dataclass
class Scene:
    """The parameters of one normal image; object defects re-render a modified copy."""

    params: dict = field(default_factory=dict)


def _rng(seed: int, *keys: object) -> np.random.Generator:
    key = "/".join(str(k) for k in (seed, *keys)).encode()
    return np.random.default_rng(zlib.crc32(key))


DESIGN_SIZE = 256  # geometry is written in pixels of a 256 px image and scaled to the requested size


def _grid(size: int) -> tuple[Array, Array]:
    """Pixel-centre coordinates in design units, so every size shows the same scene."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    scale = DESIGN_SIZE / size
    return x * scale, y * scale


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> Array:
    """Unit-variance smooth noise; ``sigma`` is in design pixels."""
    noise = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma * size / DESIGN_SIZE, mode="wrap")
    return noise / (noise.std() + 1e-12)


def _rotate(x: Array, y: Array, cx: float, cy: float, angle: float) -> tuple[Array, Array]:
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = x - cx, y - cy
    return c * dx + s * dy, -s * dx + c * dy


def _colorize(value: Array, dark: tuple[float, float, float], light: tuple[float, float, float]) -> Array:
    v = np.clip(value, 0, 1)[..., None]
    return (1 - v) * np.asarray(dark) + v * np.asarray(light)


# ---------------------------------------------------------------------------------------------- scenes


def _fabric_scene(rng: np.random.Generator, size: int) -> Scene:
    return Scene(
        {
            "angle": np.deg2rad(rng.uniform(-3, 3)),
            "shift": rng.uniform(0, 16, 2),
            "period": rng.uniform(15.0, 17.0),
            "gain": rng.uniform(0.92, 1.08),
            "fibre": _smooth_noise(rng, size, 1.2),
        }
    )


def _fabric(scene: Scene, size: int) -> Array:
    p = scene.params
    x, y = _grid(size)
    u, v = _rotate(x, y, DESIGN_SIZE / 2, DESIGN_SIZE / 2, p["angle"])
    u, v = u + p["shift"][0], v + p["shift"][1]
    period = p["period"]
    over = np.sin(np.pi * u / period) * np.sin(np.pi * v / period) > 0
    warp = 0.5 + 0.35 * np.abs(np.cos(np.pi * v / period))
    weft = 0.5 + 0.35 * np.abs(np.cos(np.pi * u / period))
    value = np.where(over, warp, weft) + 0.06 * p["fibre"]
    return _colorize(value * p["gain"], (0.10, 0.14, 0.30), (0.45, 0.55, 0.85))


def _wood_scene(rng: np.random.Generator, size: int) -> Scene:
    return Scene(
        {
            "offset": rng.uniform(0, 40),
            "spacing": rng.uniform(18, 24),
            "warp": _smooth_noise(rng, size, 18.0),
            "pores": _smooth_noise(rng, size, 0.8),
            "gain": rng.uniform(0.92, 1.08),
        }
    )


def _wood(scene: Scene, size: int) -> Array:
    p = scene.params
    x, _ = _grid(size)
    phase = (x + p["offset"] + 9.0 * p["warp"]) / p["spacing"]
    rings = 0.5 + 0.5 * np.cos(2 * np.pi * phase) ** 3
    value = 0.35 + 0.4 * rings + 0.05 * p["pores"]
    return _colorize(value * p["gain"], (0.30, 0.16, 0.06), (0.85, 0.62, 0.38))


def _washer_scene(rng: np.random.Generator, size: int) -> Scene:
    return Scene(
        {
            "center": DESIGN_SIZE / 2 + rng.uniform(-10, 10, 2),
            "r_in": DESIGN_SIZE * rng.uniform(0.21, 0.23),
            "r_out": DESIGN_SIZE * rng.uniform(0.38, 0.40),
            "light": rng.uniform(0, 2 * np.pi),
            "gain": rng.uniform(0.9, 1.1),
            "background": _smooth_noise(rng, size, 6.0),
            "bump": None,
        }
    )


def _washer(scene: Scene, size: int) -> Array:
    p = scene.params
    x, y = _grid(size)
    dx, dy = x - p["center"][0], y - p["center"][1]
    r, theta = np.hypot(dx, dy), np.arctan2(dy, dx)
    r_out = np.full_like(r, p["r_out"])
    if p["bump"] is not None:
        angle, height = p["bump"]
        delta = np.angle(np.exp(1j * (theta - angle)))
        r_out = r_out + height * np.exp(-((delta / 0.25) ** 2))
    ring = (r >= p["r_in"]) & (r <= r_out)
    for bx, by, br in p.get("bites", []):
        ring &= np.hypot(x - bx, y - by) > br
    shade = 0.55 + 0.25 * np.cos(theta - p["light"]) + 0.05 * np.sin(r * 0.9)
    metal = _colorize(shade * p["gain"], (0.25, 0.25, 0.27), (0.92, 0.92, 0.95))
    background = _colorize(0.15 + 0.04 * p["background"], (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    return np.where(ring[..., None], metal, background)


_CHIP_PARTS = ((-70, -60, 0.0), (70, -60, 0.0), (-70, 60, np.pi / 2), (70, 60, np.pi / 2), (0, 85, 0.0))


def _chip_scene(rng: np.random.Generator, size: int) -> Scene:
    return Scene(
        {
            "center": DESIGN_SIZE / 2 + rng.uniform(-6, 6, 2),
            "board": _smooth_noise(rng, size, 1.5),
            "gain": rng.uniform(0.92, 1.08),
            "parts": [list(part) for part in _CHIP_PARTS],
            "present": [True] * len(_CHIP_PARTS),
        }
    )


def _box(x: Array, y: Array, cx: float, cy: float, w: float, h: float, angle: float = 0.0) -> Array:
    u, v = _rotate(x, y, cx, cy, angle)
    return (np.abs(u) <= w / 2) & (np.abs(v) <= h / 2)


def _chip(scene: Scene, size: int) -> Array:
    p = scene.params
    x, y = _grid(size)
    cx, cy = p["center"]
    img = _colorize(0.45 + 0.05 * p["board"], (0.02, 0.18, 0.08), (0.10, 0.60, 0.25)) * p["gain"]
    for i in range(7):
        for side in (-1, 1):
            pin = _box(x, y, cx + side * 42, cy - 36 + 12 * i, 14, 5)
            img[pin] = (0.78, 0.78, 0.80)
    img[_box(x, y, cx, cy, 72, 90)] = (0.08, 0.08, 0.09)
    img[_box(x, y, cx - 24, cy - 33, 7, 7)] = (0.3, 0.3, 0.32)
    for home_x, home_y, home_angle in _CHIP_PARTS:
        for pad in (-1, 1):
            du, dv = pad * 11 * np.cos(home_angle), pad * 11 * np.sin(home_angle)
            img[_box(x, y, cx + home_x + du, cy + home_y + dv, 8, 12, home_angle)] = (0.72, 0.70, 0.62)
    for (px, py, angle), present in zip(p["parts"], p["present"]):
        if not present:
            continue
        body = _box(x, y, cx + px, cy + py, 26, 12, angle)
        img[body] = (0.62, 0.45, 0.22)
        for end in (-1, 1):
            du, dv = end * 11 * np.cos(angle), end * 11 * np.sin(angle)
            img[_box(x, y, cx + px + du, cy + py + dv, 4, 12, angle)] = (0.85, 0.85, 0.86)
    return img


# --------------------------------------------------------------------------------------------- defects


def _draw(size: int, paint: Callable[[ImageDraw.ImageDraw], None]) -> Array:
    """A binary shape drawn in design units, sampled (nearest) at the requested size."""
    canvas = Image.new("L", (DESIGN_SIZE, DESIGN_SIZE), 0)
    paint(ImageDraw.Draw(canvas))
    if size != DESIGN_SIZE:
        canvas = canvas.resize((size, size), Image.NEAREST)
    return np.asarray(canvas) > 0


def _anchor(scene: Scene, rng: np.random.Generator, size: int) -> Array:
    """A point on the product: on the washer ring or the chip board, anywhere away from edges otherwise."""
    if "r_in" in scene.params:
        radius = rng.uniform(scene.params["r_in"] + 8, scene.params["r_out"] - 8)
        angle = rng.uniform(0, 2 * np.pi)
        return scene.params["center"] + radius * np.array([np.cos(angle), np.sin(angle)])
    return rng.uniform(0.2 * DESIGN_SIZE, 0.8 * DESIGN_SIZE, 2)


def _scratch(scene: Scene, clean: Array, rng: np.random.Generator, size: int) -> tuple[Array, Array]:
    start = _anchor(scene, rng, size)
    angle = rng.uniform(0, 2 * np.pi)
    length = rng.uniform(35, 70)
    end = start + length * np.array([np.cos(angle), np.sin(angle)])
    bend = (start + end) / 2 + rng.uniform(-12, 12, 2)
    t = np.linspace(0, 1, 40)[:, None]
    points = (1 - t) ** 2 * start + 2 * (1 - t) * t * bend + t**2 * end
    width = int(rng.integers(2, 4))
    mask = _draw(size, lambda d: d.line([tuple(p) for p in points], fill=255, width=width))
    altered = 0.45 * clean + 0.55 * np.array([0.95, 0.95, 0.92])
    return altered, mask


def _hole(scene: Scene, clean: Array, rng: np.random.Generator, size: int) -> tuple[Array, Array]:
    cx, cy = _anchor(scene, rng, size)
    rx, ry = rng.uniform(6, 14, 2)
    mask = _draw(size, lambda d: d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255))
    x, y = _grid(size)
    depth = np.clip(np.hypot((x - cx) / rx, (y - cy) / ry), 0, 1)[..., None]
    altered = (0.04 + 0.12 * depth) * np.ones(3) + 0.2 * depth * clean
    return altered, mask


def _contamination(scene: Scene, clean: Array, rng: np.random.Generator, size: int) -> tuple[Array, Array]:
    centre = _anchor(scene, rng, size)
    blobs = [(centre + rng.normal(0, 5, 2), rng.uniform(3, 8)) for _ in range(int(rng.integers(3, 7)))]
    mask = _draw(size, lambda d: [d.ellipse([x - r, y - r, x + r, y + r], fill=255) for (x, y), r in blobs])
    tint = np.array(rng.choice([[0.35, 0.25, 0.12], [0.55, 0.55, 0.50], [0.20, 0.22, 0.18]]))
    grain = 0.08 * _smooth_noise(rng, size, 1.0)[..., None]
    altered = 0.35 * clean + 0.65 * tint + grain
    return altered, mask


def _crack(scene: Scene, clean: Array, rng: np.random.Generator, size: int) -> tuple[Array, Array]:
    def walk(start: Array, heading: float, steps: int) -> list[tuple[float, float]]:
        points, position = [tuple(start)], start.copy()
        for _ in range(steps):
            heading += rng.normal(0, 0.35)
            position = position + 2.5 * np.array([np.cos(heading), np.sin(heading)])
            points.append(tuple(position))
        return points

    start = _anchor(scene, rng, size)
    heading = rng.uniform(0, 2 * np.pi)
    trunk = walk(start, heading, int(rng.integers(18, 30)))
    branch = walk(np.array(trunk[len(trunk) // 2]), heading + rng.choice([-1, 1]) * 0.9, int(rng.integers(6, 12)))
    mask = _draw(size, lambda d: (d.line(trunk, fill=255, width=2), d.line(branch, fill=255, width=1)))
    return 0.2 * clean, mask


def _rerender(change: Callable[[Scene, np.random.Generator], None], render: Callable[[Scene, int], Array]):
    def defect(scene: Scene, clean: Array, rng: np.random.Generator, size: int) -> tuple[Array, Array]:
        altered_scene = copy.deepcopy(scene)
        change(altered_scene, rng)
        altered = render(altered_scene, size)
        return altered, np.abs(altered - clean).max(axis=-1) > 1e-9

    return defect


def _bite(scene: Scene, rng: np.random.Generator) -> None:
    angle = rng.uniform(0, 2 * np.pi)
    radius = scene.params["r_out"]
    centre = scene.params["center"] + radius * np.array([np.cos(angle), np.sin(angle)])
    scene.params["bites"] = [(centre[0], centre[1], rng.uniform(10, 18))]


def _bulge(scene: Scene, rng: np.random.Generator) -> None:
    scene.params["bump"] = (rng.uniform(0, 2 * np.pi), rng.uniform(8, 14) * rng.choice([-1, 1]))


def _drop_part(scene: Scene, rng: np.random.Generator) -> None:
    scene.params["present"][int(rng.integers(len(_CHIP_PARTS)))] = False


def _shift_part(scene: Scene, rng: np.random.Generator) -> None:
    part = scene.params["parts"][int(rng.integers(len(_CHIP_PARTS)))]
    angle = rng.uniform(0, 2 * np.pi)
    distance = rng.uniform(7, 12)
    part[0] += distance * np.cos(angle)
    part[1] += distance * np.sin(angle)
    part[2] += np.deg2rad(rng.uniform(15, 35)) * rng.choice([-1, 1])


@dataclass(frozen=True)
class Category:
    """How to draw one product type: its scene sampler, its renderer and its defect types."""

    kind: str
    scene: Callable[[np.random.Generator, int], Scene]
    render: Callable[[Scene, int], Array]
    defects: dict[str, Callable]


CATEGORIES: dict[str, Category] = {
    "fabric": Category(
        "texture",
        _fabric_scene,
        _fabric,
        {"scratch": _scratch, "hole": _hole, "contamination": _contamination, "crack": _crack},
    ),
    "wood": Category(
        "texture",
        _wood_scene,
        _wood,
        {"scratch": _scratch, "hole": _hole, "contamination": _contamination, "crack": _crack},
    ),
    "washer": Category(
        "object",
        _washer_scene,
        _washer,
        {
            "scratch": _scratch,
            "missing": _rerender(_bite, _washer),
            "contamination": _contamination,
            "deformed": _rerender(_bulge, _washer),
        },
    ),
    "chip": Category(
        "object",
        _chip_scene,
        _chip,
        {
            "missing_part": _rerender(_drop_part, _chip),
            "misplaced_part": _rerender(_shift_part, _chip),
            "scratch": _scratch,
            "contamination": _contamination,
        },
    ),
}

NOISE_STD = 0.02
MIN_DEFECT_PIXELS = 12


def _to_uint8(img: Array) -> Array:
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


def render_sample(
    category: str, split: str, index: int, defect: str | None = None, seed: int = 0, size: int = 256
) -> tuple[Array, Array, Array]:
    """Render one image. Returns (image uint8 HxWx3, mask bool HxW, the clean image it was made from).

    The defect is composited through its mask, so ``image`` equals the clean image outside the mask.
    """
    spec = CATEGORIES[category]
    rng = _rng(seed, category, split, defect or "good", index)
    scene = spec.scene(rng, size)
    clean = spec.render(scene, size)
    noise = NOISE_STD * rng.standard_normal(clean.shape)
    clean_u8 = _to_uint8(clean + noise)
    if defect is None:
        return clean_u8, np.zeros((size, size), dtype=bool), clean_u8
    for _ in range(20):
        altered, mask = spec.defects[defect](scene, clean, rng, size)
        image = _to_uint8(np.where(mask[..., None], altered + noise, clean + noise))
        visible = (image != clean_u8).any(axis=-1) & mask
        if visible.sum() >= max(4, MIN_DEFECT_PIXELS * size * size // DESIGN_SIZE**2):
            return image, mask, clean_u8
    raise RuntimeError(f"could not place a visible {defect} defect on {category} #{index}")


def _save_png(array: Array, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG", compress_level=6)


def generate(
    root: str | Path,
    categories: list[str] | None = None,
    train_per_category: int = 60,
    test_good_per_category: int = 12,
    test_per_defect: int = 5,
    size: int = 256,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write the dataset in MVTec AD layout under ``root`` (replaced atomically). Returns ``root``."""
    names = list(categories or CATEGORIES)
    unknown = sorted(set(names) - set(CATEGORIES))
    if unknown:
        raise ValueError(f"unknown synthetic categories {unknown}; available: {sorted(CATEGORIES)}")
    jobs: list[tuple[str, str, int, str | None]] = []
    for category in names:
        jobs += [(category, "train", i, None) for i in range(train_per_category)]
        jobs += [(category, "test", i, None) for i in range(test_good_per_category)]
        for defect in CATEGORIES[category].defects:
            jobs += [(category, "test", i, defect) for i in range(test_per_defect)]
    root = Path(root)
    with atomic_dir(root) as out:
        for category, split, index, defect in tqdm(jobs, desc="synthetic", disable=not progress, unit="img"):
            image, mask, _ = render_sample(category, split, index, defect, seed, size)
            folder = defect or "good"
            _save_png(image, out / category / split / folder / f"{index:03d}.png")
            if defect:
                _save_png(
                    mask.astype(np.uint8) * 255, out / category / "ground_truth" / defect / f"{index:03d}_mask.png"
                )
    return root
