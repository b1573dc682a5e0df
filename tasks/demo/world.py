"""A synthetic image–caption world with known ground truth, for the offline demo and tests.

Scenes are drawn procedurally (PIL + numpy): a textured background that is the scene (sky, grass,
sand, water, road) and 1–4 non-overlapping coloured objects (ball, box, star, ...). Every name is a
tag of RAM's tag list, so the demo's label system is a small subset of the real one.

Captions are written like web captions are: they miss objects, drop colours, mention things that
are not there and leave out the scene, with the probabilities given to `generate_world`. With
noise="contextual" (the demo's world) those errors depend on the image, as people's do: objects go
with their scene, small and peripheral objects are left out more, look-alikes are named for one
another and absent mentions are what the scene suggests; noise="independent" (the function's default,
the control) draws them at random. The truth
(tags, boxes from the object masks, what each caption mentions) is written beside the source, in
`truth/`, and is never part of what the pipeline reads.

Output layout under `out_dir`:

    source/        what the pipeline ingests
      fmt="folder":      images/<key>.jpg + captions.jsonl ({"file", "captions"} per line)
      fmt="webdataset":  00000.tar ... as img2dataset writes them (<key>.jpg, <key>.txt, <key>.json)
                         plus 00000.parquet and 00000_stats.json per shard
    tags/          tag_list.txt (the demo's label system, one tag a line), tag_types.txt (object /
                   attribute / scene per tag, declared), tag_groups.json
    truth/         ground_truth.jsonl, noise.json (planted noise, measured)
    world.json     written last: the config and the paths above (WorldInfo)

Every image is drawn from its own generator seeded by (seed, index), so a world is a pure
function of its arguments and any image can be regenerated alone.
"""
from __future__ import annotations

import argparse
import functools
import io
import json
import math
import shutil
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from ram_model.labels import ATTRIBUTE, OBJECT, SCENE, TYPES_FILE
from ram_model.metrics import label_quality

# ---------------------------------------------------------------------------------------------
# The vocabulary. Every name below is a line of RAM's ram_tag_list.txt.

# (name, plural) in the order used when only the first n are wanted.
CATEGORY_CATALOGUE: tuple[tuple[str, str], ...] = (
    ("ball", "balls"), ("box", "boxes"), ("star", "stars"), ("ring", "rings"),
    ("cross", "crosses"), ("heart", "hearts"), ("kite", "kites"), ("flag", "flags"),
    ("moon", "moons"), ("triangle", "triangles"), ("arrow", "arrows"), ("umbrella", "umbrellas"),
    ("house", "houses"), ("mushroom", "mushrooms"), ("cup", "cups"), ("leaf", "leaves"),
)
CATEGORY_NAMES: tuple[str, ...] = tuple(c for c, _ in CATEGORY_CATALOGUE)
PLURALS: dict[str, str] = dict(CATEGORY_CATALOGUE)
# The setting measured in DEMO_FEASIBILITY.md: 12 categories x 6 colours x 5 scenes = 23 tags.
DEFAULT_CATEGORIES: tuple[str, ...] = CATEGORY_NAMES[:12]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "blue": (35, 70, 215), "green": (25, 175, 45),
    "yellow": (245, 215, 25), "purple": (140, 50, 190), "orange": (250, 135, 20),
}
SCENES: tuple[str, ...] = ("sky", "grass", "sand", "water", "road")

# How a caption places objects in a scene, and how it names the scene alone.
_SCENE_PHRASES: dict[str, tuple[str, ...]] = {
    "sky": ("in the sky", "flying in the sky", "floating in the sky", "up in the sky", "against the sky"),
    "grass": ("on the grass", "lying on the grass", "in the grass", "sitting on the grass"),
    "sand": ("on the sand", "lying in the sand", "in the sand"),
    "water": ("in the water", "floating on the water", "on the water"),
    "road": ("on the road", "in the middle of the road", "lying on the road"),
}
_SCENE_NOUNS: dict[str, tuple[str, ...]] = {s: (f"the {s}",) for s in SCENES}
_COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}

# The caption noise models (generate_world's `noise`): "contextual" ties errors to what the image shows (docs/demo.md);
# "independent" is the world as it was first written, each error drawn at random: the control.
NOISE_MODELS: tuple[str, ...] = ("contextual", "independent")

# The contextual world's scenes and what each suggests: objects there are mostly of these categories, and a caption
# that names something absent names one of these (a kite over every sky). Each category belongs to one scene.
SCENE_CATEGORIES: dict[str, tuple[str, ...]] = {
    "sky": ("kite", "moon", "star"),
    "road": ("arrow", "cross", "triangle"),
    "sand": ("umbrella", "box", "cup"),
    "water": ("ring", "ball", "leaf"),
    "grass": ("flag", "heart", "house", "mushroom"),
}
# Omission odds in the contextual world: log-odds per standard deviation of an object's side (smaller: more often
# left out) and of its centre's distance from the image centre (farther: more often left out); the intercept is
# fitted so that the mean rate is p_omit_object. Chosen, not fitted to a study: the smallest objects at the edge are
# left out about ten times as often as the largest central ones (docs/demo.md).
OMIT_LOGIT_PER_SIZE_STD = -0.8
OMIT_LOGIT_PER_EDGE_STD = 0.6


def demo_tag_list(categories: Sequence[str] | None = None, colours: Sequence[str] | None = None,
                  scenes: Sequence[str] | None = None) -> list[str]:
    """The demo's label system: categories, then colours, then scenes."""
    cats, cols, scns = _check_vocabulary(categories, colours, scenes)
    return [*cats, *cols, *scns]


def _check_vocabulary(categories, colours, scenes) -> tuple[list[str], list[str], list[str]]:
    cats = list(DEFAULT_CATEGORIES if categories is None else categories)
    cols = list(COLOURS if colours is None else colours)
    scns = list(SCENES if scenes is None else scenes)
    for what, chosen, known in (("categories", cats, CATEGORY_NAMES), ("colours", cols, tuple(COLOURS)),
                                ("scenes", scns, SCENES)):
        unknown = [c for c in chosen if c not in known]
        if unknown:
            raise ValueError(f"generate_world: unknown {what} {unknown}; choose from {list(known)}")
        if len(set(chosen)) != len(chosen) or not chosen:
            raise ValueError(f"generate_world: {what} must be a non-empty list without repeats, got {chosen}")
    if len(cats) < 2:
        raise ValueError("generate_world: at least 2 categories are needed (absent mentions need another one)")
    return cats, cols, scns


# ---------------------------------------------------------------------------------------------
# Shapes: lists of (kind, polygon) in unit coordinates, y down, inside the unit disc so that a
# rotation keeps them inside their square. kind: fill / cut (object colour) or dark / light details.

def _circle(cx: float, cy: float, r: float, n: int = 40, a0: float = 0.0, a1: float = 2 * math.pi):
    return [(cx + r * math.cos(a0 + (a1 - a0) * i / n), cy + r * math.sin(a0 + (a1 - a0) * i / n))
            for i in range(n + 1)]


def _rect(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _star(r_out=0.95, r_in=0.4, points=5):
    pts = []
    for i in range(2 * points):
        r = r_out if i % 2 == 0 else r_in
        a = -math.pi / 2 + i * math.pi / points
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


def _shape_ops(name: str) -> list[tuple[str, list[tuple[float, float]]]]:
    if name == "ball":
        return [("fill", _circle(0, 0, 0.9)), ("light", _circle(-0.35, -0.35, 0.16))]
    if name == "box":  # an isometric cube: silhouette plus dark edges
        h = 0.85
        hexagon = [(h * math.cos(math.pi / 6 + k * math.pi / 3), h * math.sin(math.pi / 6 + k * math.pi / 3))
                   for k in range(6)]
        ops = [("fill", hexagon)]
        for k in (1, 3, 5):
            x, y = hexagon[k]
            ops.append(("dark", [(-0.04, 0), (0.04, 0), (x + 0.04, y), (x - 0.04, y)]))
        return ops
    if name == "star":
        return [("fill", _star())]
    if name == "ring":
        return [("fill", _circle(0, 0, 0.9)), ("cut", _circle(0, 0, 0.5))]
    if name == "cross":
        return [("fill", _rect(-0.25, -0.85, 0.25, 0.85)), ("fill", _rect(-0.85, -0.25, 0.85, 0.25))]
    if name == "heart":
        return [("fill", _circle(-0.38, -0.25, 0.42)), ("fill", _circle(0.38, -0.25, 0.42)),
                ("fill", [(-0.78, -0.12), (0.78, -0.12), (0, 0.85)])]
    if name == "kite":
        return [("fill", [(0, -0.9), (0.5, -0.2), (0, 0.55), (-0.5, -0.2)]),
                ("dark", _rect(-0.025, -0.85, 0.025, 0.55)), ("dark", _rect(-0.45, -0.225, 0.45, -0.175)),
                ("dark", [(0, 0.55), (0.05, 0.55), (0.2, 0.9), (0.15, 0.9)]),
                ("fill", [(0.02, 0.7), (0.14, 0.64), (0.2, 0.78)])]
    if name == "flag":
        wave = [(-0.55 + 1.35 * t, -0.75 + 0.08 * math.sin(t * 2 * math.pi)) for t in np.linspace(0, 1, 12)]
        lower = [(x, y + 0.8) for x, y in reversed(wave)]
        return [("dark", _rect(-0.7, -0.85, -0.56, 0.9)), ("fill", wave + lower)]
    if name == "moon":
        return [("fill", _circle(0, 0, 0.85)), ("cut", _circle(0.4, -0.2, 0.72))]
    if name == "triangle":
        return [("fill", [(0, -0.9), (0.85, 0.6), (-0.85, 0.6)])]
    if name == "arrow":
        return [("fill", _rect(-0.85, -0.15, 0.2, 0.15)), ("fill", [(0.1, -0.55), (0.9, 0), (0.1, 0.55)])]
    if name == "umbrella":
        canopy = _circle(0, 0, 0.85, n=30, a0=math.pi, a1=2 * math.pi)
        return [("fill", canopy), ("dark", _rect(-0.04, -0.05, 0.04, 0.7)),
                ("dark", [(-0.04, 0.62), (0.04, 0.62), (-0.2, 0.85), (-0.28, 0.78)])]
    if name == "house":
        return [("fill", _rect(-0.6, -0.1, 0.6, 0.8)), ("fill", [(-0.8, -0.05), (0, -0.85), (0.8, -0.05)]),
                ("dark", _rect(-0.15, 0.3, 0.15, 0.8)), ("light", _rect(0.25, 0.1, 0.48, 0.33))]
    if name == "mushroom":
        cap = _circle(0, 0.05, 0.85, n=30, a0=math.pi, a1=2 * math.pi)
        return [("fill", cap), ("light", _rect(-0.22, 0.05, 0.22, 0.85)),
                ("light", _circle(-0.35, -0.35, 0.12)), ("light", _circle(0.3, -0.45, 0.1))]
    if name == "cup":
        return [("fill", [(-0.6, -0.6), (0.45, -0.6), (0.35, 0.75), (-0.5, 0.75)]),
                ("fill", _circle(0.55, 0.0, 0.32)), ("cut", _circle(0.55, 0.0, 0.17))]
    if name == "leaf":
        upper = [(x, -0.45 * math.sin(math.pi * (x + 0.9) / 1.8)) for x in np.linspace(-0.9, 0.9, 20)]
        lower = [(x, 0.45 * math.sin(math.pi * (x + 0.9) / 1.8)) for x in np.linspace(0.9, -0.9, 20)]
        return [("fill", upper + lower), ("dark", _rect(-0.85, -0.03, 0.88, 0.03))]
    raise ValueError(f"no shape is drawn for category {name!r}; known: {list(CATEGORY_NAMES)}")


_SHAPES = {name: _shape_ops(name) for name in CATEGORY_NAMES}
# Shapes that look wrong upside down are only tilted a little.
_UPRIGHT = {"flag", "umbrella", "house", "mushroom", "cup", "kite", "heart", "triangle"}
_SUPERSAMPLE = 4


def _render_shape(name: str, size: int, angle: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Alpha masks (float32, size x size) of the object colour, dark details and light details."""
    big = size * _SUPERSAMPLE
    canvases = {k: Image.new("L", (big, big), 0) for k in ("main", "dark", "light")}
    draws = {k: ImageDraw.Draw(c) for k, c in canvases.items()}
    ca, sa = math.cos(angle), math.sin(angle)
    half = big / 2
    for kind, pts in _SHAPES[name]:
        xy = [(half + half * (x * ca - y * sa), half + half * (x * sa + y * ca)) for x, y in pts]
        if kind == "fill":
            draws["main"].polygon(xy, fill=255)
        elif kind == "cut":
            draws["main"].polygon(xy, fill=0)
        else:
            draws[kind].polygon(xy, fill=255)
            draws["main"].polygon(xy, fill=0)
            for other in ("dark", "light"):
                if other != kind:
                    draws[other].polygon(xy, fill=0)
    out = []
    for k in ("main", "dark", "light"):
        small = canvases[k].resize((size, size), Image.Resampling.BOX)
        out.append(np.asarray(small, dtype=np.float32) / 255.0)
    return out[0], out[1], out[2]


def silhouette_similarity(categories: Sequence[str], size: int = 40, angles: int = 13) -> np.ndarray:
    """How alike two categories look, from the shapes themselves: the IoU of their silhouettes, for each of a
    category's drawn tilts the best over the other's tilts, averaged and made symmetric. [n, n], diagonal 1."""
    tilts = {}
    for c in categories:
        spread = 0.35 if c in _UPRIGHT else math.pi
        masks = [np.maximum.reduce(_render_shape(c, size, float(a))) for a in np.linspace(-spread, spread, angles)]
        tilts[c] = np.stack([m.reshape(-1) > 0.5 for m in masks]).astype(np.float32)
    n = len(categories)
    sim = np.eye(n)
    for i, a in enumerate(categories):
        for j, b in enumerate(categories):
            if i != j:
                inter = tilts[a] @ tilts[b].T
                union = tilts[a].sum(1)[:, None] + tilts[b].sum(1)[None, :] - inter
                sim[i, j] = float((inter / union).max(1).mean())
    return (sim + sim.T) / 2


@functools.lru_cache(maxsize=16)
def look_alikes(categories: tuple[str, ...]) -> dict[str, str]:
    """Pairs of categories a caption names for one another: the most alike silhouettes first, each category in
    at most one pair (a greedy matching on silhouette_similarity). With the 12 default categories: ball-box,
    flag-umbrella, cross-heart, star-triangle, arrow-kite, moon-ring."""
    sim = silhouette_similarity(categories)
    order = sorted(((sim[i, j], i, j) for i in range(len(categories)) for j in range(i + 1, len(categories))),
                   key=lambda t: (-round(t[0], 6), t[1], t[2]))
    pairs: dict[str, str] = {}
    for _, i, j in order:
        a, b = categories[i], categories[j]
        if a not in pairs and b not in pairs:
            pairs[a], pairs[b] = b, a
    return pairs


# ---------------------------------------------------------------------------------------------
# Backgrounds: each scene is a texture, different in colour statistics and structure.

def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells_y: int, cells_x: int) -> np.ndarray:
    grid = rng.random((cells_y, cells_x), dtype=np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((w, h), Image.Resampling.BILINEAR))


def _background(scene: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    yy = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None]
    xx = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :]
    grain = rng.standard_normal((h, w), dtype=np.float32)
    if scene == "sky":
        top, bottom = np.array([80, 145, 225], np.float32), np.array([175, 210, 242], np.float32)
        img = top + (bottom - top) * yy[..., None] + np.zeros((1, w, 1), np.float32)
        cloud = np.clip((_smooth_noise(rng, h, w, 5, 7) - 0.55) * 3.0, 0, 1)[..., None]
        img = img * (1 - cloud) + 245.0 * cloud + 2.0 * grain[..., None]
    elif scene == "grass":
        blades = _smooth_noise(rng, h, w, max(2, h // 16), max(4, w // 2)) - 0.5
        patches = _smooth_noise(rng, h, w, 4, 4) - 0.5
        base = np.array([62, 140, 48], np.float32)
        img = base * (1 + 0.45 * blades[..., None] + 0.25 * patches[..., None]) + 6.0 * grain[..., None]
    elif scene == "sand":
        phase = _smooth_noise(rng, h, w, 3, 3) * 6.0
        ripples = np.sin(yy * h * 0.45 + xx * w * 0.12 + phase)
        base = np.array([218, 192, 140], np.float32)
        img = base + 9.0 * ripples[..., None] + 11.0 * grain[..., None]
    elif scene == "water":
        phase = _smooth_noise(rng, h, w, 3, 4) * 5.0
        waves = np.sin(yy * h * 0.6 + np.sin(xx * w * 0.08) * 2.0 + phase)
        base = np.array([35, 105, 160], np.float32)
        img = base * (1 + 0.12 * waves[..., None]) + 30.0 * np.clip(waves - 0.85, 0, 1)[..., None] * 4
        img = img + 3.0 * grain[..., None]
    elif scene == "road":
        base = np.array([88, 88, 92], np.float32)
        img = base * (1 + 0.1 * (_smooth_noise(rng, h, w, 6, 6)[..., None] - 0.5)) + 13.0 * grain[..., None]
        # A dashed lane line, across or along the image.
        pos = int(rng.uniform(0.3, 0.7) * (h if rng.random() < 0.5 else w))
        dash = max(4, w // 8)
        offset = int(rng.integers(0, dash * 2))
        line_w = max(1, h // 40)
        along = (np.arange(max(h, w)) + offset) % (2 * dash) < dash
        if pos < h and rng.random() < 0.5:
            img[pos:pos + line_w, along[:w]] = 230.0
        else:
            pos = min(pos, w - line_w)
            img[along[:h], pos:pos + line_w] = 230.0
    else:
        raise ValueError(f"no background is drawn for scene {scene!r}; known: {list(SCENES)}")
    return img


# ---------------------------------------------------------------------------------------------
# One image.

@dataclass
class _Object:
    category: str
    colour: str
    box: tuple[int, int, int, int]   # x0, y0, x1, y1 in pixels, x1/y1 exclusive, from the mask
    area: int                        # mask pixels
    side: int = 0                    # the side of the square it was drawn in (what omission depends on)
    centre: tuple[float, float] = (0.0, 0.0)   # that square's centre, pixels


def _free_square(rng: np.random.Generator, size: int, lo: int, hi: int,
                 placed: list[tuple[int, int, int]]) -> tuple[int, int, int] | None:
    """x, y, side of a square of side lo..hi clear of the placed ones, by rejection sampling; None after 30 tries."""
    for _attempt in range(30):
        side = int(rng.integers(lo, hi + 1))
        x = int(rng.integers(0, size - side + 1))
        y = int(rng.integers(0, size - side + 1))
        if all(x + side + 2 <= px or px + ps + 2 <= x or y + side + 2 <= py or py + ps + 2 <= y
               for px, py, ps in placed):
            return x, y, side
    return None


def _draw_image(rng: np.random.Generator, size: int, cats: list[str], cols: list[str], scns: list[str],
                n_objects: tuple[int, int], object_size: tuple[float, float],
                likely: dict[str, list[str]] | None = None, p_scene_object: float = 0.0):
    """`likely` (contextual world): each scene's likely categories; an object is one of them with p_scene_object."""
    scene = scns[int(rng.integers(len(scns)))]
    img = _background(scene, size, size, rng)
    want = int(rng.integers(n_objects[0], n_objects[1] + 1))
    placed: list[tuple[int, int, int]] = []   # x, y, side of each object's square
    objects: list[_Object] = []
    lo, hi = max(6, int(object_size[0] * size)), max(7, int(object_size[1] * size))
    for _ in range(want):
        square = _free_square(rng, size, lo, hi, placed)
        if square is None:   # a crowded image: fewer objects
            break
        x, y, side = square
        placed.append(square)
        if likely is None:
            cat = cats[int(rng.integers(len(cats)))]
        else:
            here = likely[scene]
            pool = here if here and rng.random() < p_scene_object else [c for c in cats if c not in here] or cats
            cat = pool[int(rng.integers(len(pool)))]
        col = cols[int(rng.integers(len(cols)))]
        spread = 0.35 if cat in _UPRIGHT else math.pi
        main, dark, light = _render_shape(cat, side, float(rng.uniform(-spread, spread)))
        silhouette = np.maximum(np.maximum(main, dark), light)
        # A 1-pixel darker outline keeps e.g. a green object visible on grass.
        outline = silhouette.copy()
        outline[1:, :] = np.maximum(outline[1:, :], silhouette[:-1, :])
        outline[:-1, :] = np.maximum(outline[:-1, :], silhouette[1:, :])
        outline[:, 1:] = np.maximum(outline[:, 1:], silhouette[:, :-1])
        outline[:, :-1] = np.maximum(outline[:, :-1], silhouette[:, 1:])
        base = np.array(COLOURS[col], np.float32) * float(rng.uniform(0.9, 1.08))
        shade = (1.1 - 0.2 * np.linspace(0, 1, side, dtype=np.float32))[:, None, None]
        body = np.clip(base * shade, 0, 255)
        patch = img[y:y + side, x:x + side]
        patch = patch * (1 - outline[..., None]) + (base * 0.45) * outline[..., None]
        patch = patch * (1 - main[..., None]) + body * main[..., None]
        patch = patch * (1 - dark[..., None]) + 45.0 * dark[..., None]
        patch = patch * (1 - light[..., None]) + np.array([240, 232, 210], np.float32) * light[..., None]
        img[y:y + side, x:x + side] = patch
        ys, xs = np.nonzero(outline > 0.25)
        objects.append(_Object(cat, col, (x + int(xs.min()), y + int(ys.min()), x + int(xs.max()) + 1,
                                          y + int(ys.max()) + 1), int((outline > 0.25).sum()), side,
                               (x + side / 2, y + side / 2)))
    pixels = np.clip(img, 0, 255).astype(np.uint8)
    return pixels, scene, objects


# ---------------------------------------------------------------------------------------------
# Captions.

@dataclass
class _NoiseCounts:
    captions: int = 0
    object_instances: int = 0
    objects_omitted: int = 0
    colour_mentions: int = 0
    colours_omitted: int = 0
    absent_mentions: int = 0
    scene_omitted: int = 0
    images: int = 0
    images_with_absent: int = 0


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(count: int, colour: str | None, category: str) -> str:
    noun = category if count == 1 else PLURALS[category]
    words = ([colour] if colour else []) + [noun]
    head = _article(words[0]) if count == 1 else _COUNT_WORDS.get(count, str(count))
    return " ".join([head, *words])


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


@dataclass(frozen=True)
class _Context:
    """What the contextual world's captions depend on, fixed for a whole world."""
    likely: dict[str, list[str]]      # scene -> the chosen categories it suggests (SCENE_CATEGORIES)
    look_alike: dict[str, str]        # category -> the one a caption names it as (look_alikes)
    size_mean: float                  # relative side of a drawn object: mean and std over the world's geometry
    size_std: float
    edge_mean: float                  # its centre's distance from the image centre / half the side: mean and std
    edge_std: float
    intercept: float                  # omission log-odds of an average object: the mean rate is p_omit_object
    p_omit: float

    def omission(self, objects: list[_Object], size: int) -> list[float]:
        """Each object's probability of being left out of a caption, from its size and position."""
        if self.p_omit <= 0.0 or self.p_omit >= 1.0:
            return [self.p_omit] * len(objects)
        rel = np.array([o.side / size for o in objects])
        edge = np.array([math.hypot(o.centre[0] - size / 2, o.centre[1] - size / 2) / (size / 2) for o in objects])
        return [float(v) for v in self._rate(rel, edge, self.intercept)]

    def _rate(self, rel: np.ndarray, edge: np.ndarray, intercept: float) -> np.ndarray:
        logit = (intercept + OMIT_LOGIT_PER_SIZE_STD * (rel - self.size_mean) / self.size_std
                 + OMIT_LOGIT_PER_EDGE_STD * (edge - self.edge_mean) / self.edge_std)
        return 1.0 / (1.0 + np.exp(-logit))


def _context(cats: list[str], scns: list[str], size: int, n_objects: tuple[int, int],
             object_size: tuple[float, float], p_omit: float) -> _Context:
    """The contextual world's fixed parts. The omission intercept is fitted on the generator's own geometry
    (2,000 images' objects placed as _draw_image places them, crowding included), sampled with a fixed seed: every
    world of one image size, object count and size has the same omission model."""
    likely = {s: [c for c in SCENE_CATEGORIES.get(s, ()) if c in cats] for s in scns}
    lo, hi = max(6, int(object_size[0] * size)), max(7, int(object_size[1] * size))
    rng = np.random.default_rng(0)
    squares = []
    for _ in range(2000):
        placed: list[tuple[int, int, int]] = []
        for _ in range(int(rng.integers(n_objects[0], n_objects[1] + 1))):
            square = _free_square(rng, size, lo, hi, placed)
            if square is None:
                break
            placed.append(square)
        squares += placed
    x, y, side = np.array(squares, dtype=np.float64).T
    rel, edge = side / size, np.hypot(x + side / 2 - size / 2, y + side / 2 - size / 2) / (size / 2)
    ctx = _Context(likely, look_alikes(tuple(cats)), float(rel.mean()), float(rel.std()) or 1.0,
                   float(edge.mean()), float(edge.std()) or 1.0, 0.0, p_omit)
    if not 0.0 < p_omit < 1.0:
        return ctx
    low, high = -30.0, 30.0
    for _ in range(60):   # bisection: the mean omission rate rises with the intercept
        mid = (low + high) / 2
        low, high = (mid, high) if ctx._rate(rel, edge, mid).mean() < p_omit else (low, mid)
    return _Context(**{**ctx.__dict__, "intercept": (low + high) / 2})


def _caption(rng: np.random.Generator, scene: str, objects: list[_Object], cats: list[str], cols: list[str],
             p: dict[str, float], counts: _NoiseCounts) -> tuple[str, list[str], bool]:
    """One caption of the independent world, the tags it mentions, and whether it mentions an absent object:
    every error is drawn at random, whatever the image shows."""
    counts.captions += 1
    kept = []
    for obj in objects:
        counts.object_instances += 1
        if rng.random() < p["omit_object"]:
            counts.objects_omitted += 1
        else:
            kept.append((obj.category, obj.colour))
    items = _mentions(rng, kept, p, counts)
    present = {o.category for o in objects}
    choices = [c for c in cats if c not in present]
    # An image that shows every category has nothing absent to mention.
    absent = rng.random() < p["absent"] and bool(choices)
    if absent:
        counts.absent_mentions += 1
        _mention_absent(rng, items, choices, cols, p)
    return (*_caption_text(rng, scene, items, p, counts), absent)


def _caption_contextual(rng: np.random.Generator, scene: str, objects: list[_Object], cats: list[str],
                        cols: list[str], p: dict[str, float], counts: _NoiseCounts, ctx: "_Context",
                        omit_p: list[float]) -> tuple[str, list[str], bool, dict]:
    """One caption of the contextual world: the tags it mentions, whether it mentions an absent object, and what
    went wrong in it. At most one absent mention (p["absent"]), either a present object named as its absent
    look-alike (p["lookalike"] of them, where the image has such an object) or, otherwise, a category the scene
    suggests that the image lacks; each object is left out with its own probability `omit_p` (small and
    peripheral ones more), counting a renamed object as left out, so the mean rates are the independent world's."""
    counts.captions += 1
    present = {o.category for o in objects}
    wants_absent = rng.random() < p["absent"]
    renamable = [i for i, o in enumerate(objects) if ctx.look_alike.get(o.category) not in (None, *present)]
    renamed = None
    if wants_absent and renamable and rng.random() < p["lookalike"]:
        renamed = renamable[int(rng.integers(len(renamable)))]
    # Each renamable object is renamed with probability q; it is otherwise left out with (t - q) / (1 - q), so that
    # it goes unnamed with its own rate t = omit_p[i] in all (or q, where q is larger).
    q = p["absent"] * p["lookalike"] / len(renamable) if renamable else 0.0
    kept, omitted = [], []
    for i, obj in enumerate(objects):
        counts.object_instances += 1
        if i == renamed:
            counts.objects_omitted += 1
            kept.append((ctx.look_alike[obj.category], obj.colour))
            continue
        qi = q if i in renamable else 0.0
        if rng.random() < max(0.0, (omit_p[i] - qi) / (1.0 - qi)):
            counts.objects_omitted += 1
            omitted.append(i)
        else:
            kept.append((obj.category, obj.colour))
    items = _mentions(rng, kept, p, counts)
    absent, kind = None, None
    if renamed is not None:
        absent, kind = ctx.look_alike[objects[renamed].category], "look-alike"
    elif wants_absent:
        choices = [c for c in ctx.likely[scene] if c not in present]
        kind = "context"
        if not choices:   # the scene's likely categories are all in the image: any absent one, as the control does
            choices, kind = [c for c in cats if c not in present], "other"
        if choices:
            absent = _mention_absent(rng, items, choices, cols, p)
        else:
            kind = None
    if absent is not None:
        counts.absent_mentions += 1
    text, tags = _caption_text(rng, scene, items, p, counts)
    return text, tags, absent is not None, {"omitted": omitted, "renamed": renamed, "absent": absent,
                                            "absent_kind": kind}


def _mentions(rng: np.random.Generator, kept: list[tuple[str, str]], p: dict[str, float],
              counts: _NoiseCounts) -> list[tuple[str, str | None, int]]:
    """The (category, colour or None, count) a caption names, in a random order: the kept (name, colour) pairs
    grouped, each group losing its colour with p["omit_colour"] (an omitted colour merges groups: "two balls")."""
    groups: dict[tuple[str, str], int] = {}
    for cat, col in kept:
        groups[(cat, col)] = groups.get((cat, col), 0) + 1
    mentions: dict[tuple[str, str | None], int] = {}
    for (cat, col), n in groups.items():
        counts.colour_mentions += 1
        if rng.random() < p["omit_colour"]:
            counts.colours_omitted += 1
            col = None
        mentions[(cat, col)] = mentions.get((cat, col), 0) + n
    items = [(cat, col, n) for (cat, col), n in mentions.items()]
    order = rng.permutation(len(items))
    return [items[i] for i in order]


def _mention_absent(rng: np.random.Generator, items: list, choices: list[str], cols: list[str],
                    p: dict[str, float]) -> str:
    """Insert one absent category from `choices` (a random colour, or none) at a random place; return it."""
    cat = choices[int(rng.integers(len(choices)))]
    col = None if rng.random() < p["omit_colour"] else cols[int(rng.integers(len(cols)))]
    items.insert(int(rng.integers(len(items) + 1)), (cat, col, 1))
    return cat


def _caption_text(rng: np.random.Generator, scene: str, items: list, p: dict[str, float],
                  counts: _NoiseCounts) -> tuple[str, list[str]]:
    """The caption's words for what it names (the scene left out with p["omit_scene"]) and the tags it mentions."""
    with_scene = True
    if rng.random() < p["omit_scene"]:
        counts.scene_omitted += 1
        with_scene = False
    tags = sorted({t for cat, col, _ in items for t in (cat, col) if t} | ({scene} if with_scene else set()))
    phrase = _join([_noun_phrase(n, col, cat) for cat, col, n in items]) if items else ""
    be = "is" if items and items[0][2] == 1 else "are"
    if phrase and with_scene:
        where = _SCENE_PHRASES[scene][int(rng.integers(len(_SCENE_PHRASES[scene])))]
        noun = _SCENE_NOUNS[scene][0]
        templates = [f"{phrase} {where}", f"there {be} {phrase} {where}", f"a photo of {phrase} {where}",
                     f"{noun} with {phrase}", f"{phrase} {where} on a sunny day", f"look at {phrase} {where}"]
    elif phrase:
        templates = [phrase, f"a photo of {phrase}", f"there {be} {phrase}", f"close-up of {phrase}"]
    elif with_scene:
        noun = _SCENE_NOUNS[scene][0]
        templates = [f"a view of {noun}", f"{noun} on a sunny day", f"just {noun}", f"a picture of {noun}"]
    else:
        templates = ["a nice picture", "my holiday picture", "untitled", "a beautiful day"]
    text = templates[int(rng.integers(len(templates)))]
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.5:
        text += "."
    return text, tags


# ---------------------------------------------------------------------------------------------
# The world.

@dataclass(frozen=True)
class WorldInfo:
    """Where a generated world lies and what was planted in it."""
    root: Path
    fmt: str                       # "folder" | "webdataset"
    source: Path                   # what the pipeline reads: the folder, or the folder of tars
    captions_file: Path | None     # folder format: source/captions.jsonl
    shards: tuple[Path, ...]       # webdataset format: the tars, in order
    ground_truth: Path             # truth/ground_truth.jsonl (never given to the pipeline)
    tag_list: Path                 # tags/tag_list.txt
    tag_groups: Path               # tags/tag_groups.json: {"category": [...], "colour": [...], "scene": [...]}
    keys: tuple[str, ...]          # every sample key, in generation order (corrupt ones included)
    corrupt: dict[str, str]        # key -> planted defect (not in the ground truth)
    noise: dict                    # planted noise: counts, rates, caption-label quality vs the truth
    config: dict                   # the arguments that determine the world
    seconds: float                 # wall time of the generation

    def to_json(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, Path):
                d[k] = str(v)
        d["shards"] = [str(s) for s in self.shards]
        d["keys"] = list(self.keys)
        return d

    @classmethod
    def load(cls, root: str | Path) -> "WorldInfo":
        """Read `<root>/world.json` written by `generate_world`."""
        path = Path(root) / "world.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: {root} is not a finished demo world "
                                    "(generate_world writes world.json last)")
        d = json.loads(path.read_text())
        for k in ("root", "source", "ground_truth", "tag_list", "tag_groups"):
            d[k] = Path(d[k])
        d["captions_file"] = Path(d["captions_file"]) if d["captions_file"] else None
        d["shards"] = tuple(Path(s) for s in d["shards"])
        d["keys"] = tuple(d["keys"])
        return cls(**d)


def sample_key(index: int, samples_per_shard: int) -> str:
    """img2dataset's key: 5-digit shard number then the index within the shard."""
    digits = max(4, len(str(samples_per_shard - 1)))
    return f"{index // samples_per_shard:05d}{index % samples_per_shard:0{digits}d}"


_CORRUPTIONS = ("truncated-image", "not-an-image", "empty-caption")


def generate_world(out_dir: str | Path, n_images: int, seed: int = 0, fmt: str = "folder", *,
                   image_size: int = 128,
                   categories: Sequence[str] | None = None,
                   colours: Sequence[str] | None = None,
                   scenes: Sequence[str] | None = None,
                   objects_per_image: tuple[int, int] = (1, 4),
                   object_size: tuple[float, float] = (0.17, 0.38),
                   captions_per_image: int | tuple[int, int] = (1, 3),
                   p_omit_object: float = 0.2,
                   p_omit_colour: float = 0.15,
                   p_absent: float = 0.25,
                   p_omit_scene: float = 0.1,
                   noise: str = "independent",
                   p_scene_object: float = 0.6,
                   p_lookalike: float = 0.3,
                   image_format: str = "jpg",
                   jpeg_quality: int = 92,
                   samples_per_shard: int = 1000,
                   n_corrupt: int = 0,
                   overwrite: bool = False) -> WorldInfo:
    """Write a demo world of `n_images` image–caption samples under `out_dir` (layout: module doc).

    Per caption: objects are omitted at the mean rate `p_omit_object`, each colour with `p_omit_colour`,
    one absent object is mentioned with `p_absent`, the scene is left out with `p_omit_scene`. How the
    errors fall is `noise` (docs/demo.md):
    - "contextual": tied to the image. Objects are of their scene's likely categories (SCENE_CATEGORIES) with
      `p_scene_object`; an absent mention is a present object named as its look-alike (`p_lookalike` of them,
      where one can be) or else a category the scene suggests that the image lacks; small and peripheral
      objects are omitted more often (OMIT_LOGIT_PER_*).
    - "independent": the control, each error drawn at random (the world as first written, byte for byte).
      The default here, so that every existing caller (test fixtures, the stand-ins' training worlds) keeps its
      world; the demo asks for "contextual" (flows/demo.py, and this module's command line).
    `captions_per_image` is a count or an inclusive (min, max) range.
    `n_corrupt` samples (spread over the world) get a planted defect for ingest to reject; they
    are listed in `WorldInfo.corrupt` and left out of the ground truth.
    """
    t0 = time.perf_counter()
    cats, cols, scns = _check_vocabulary(categories, colours, scenes)
    if fmt not in ("folder", "webdataset"):
        raise ValueError(f"generate_world: fmt must be 'folder' or 'webdataset', got {fmt!r}")
    if image_format not in ("jpg", "png"):
        raise ValueError(f"generate_world: image_format must be 'jpg' or 'png', got {image_format!r}")
    if n_images < 1:
        raise ValueError(f"generate_world: n_images must be >= 1, got {n_images}")
    if image_size < 32:
        raise ValueError(f"generate_world: image_size must be >= 32 pixels, got {image_size}")
    lo_obj, hi_obj = objects_per_image
    if not 1 <= lo_obj <= hi_obj:
        raise ValueError(f"generate_world: objects_per_image must be (min, max) with 1 <= min <= max, "
                         f"got {objects_per_image}")
    if not 0 < object_size[0] <= object_size[1] < 1:
        raise ValueError(f"generate_world: object_size is a (min, max) fraction of the image side in (0, 1), "
                         f"got {object_size}")
    cap_range = (captions_per_image, captions_per_image) if isinstance(captions_per_image, int) \
        else tuple(captions_per_image)
    if not 1 <= cap_range[0] <= cap_range[1]:
        raise ValueError(f"generate_world: captions_per_image must be >= 1 or a (min, max) range, "
                         f"got {captions_per_image}")
    if noise not in NOISE_MODELS:
        raise ValueError(f"generate_world: noise must be one of {list(NOISE_MODELS)}, got {noise!r}")
    probs = {"omit_object": p_omit_object, "omit_colour": p_omit_colour, "absent": p_absent,
             "omit_scene": p_omit_scene, "scene_object": p_scene_object, "lookalike": p_lookalike}
    for name, value in probs.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"generate_world: p_{name} must be a probability in [0, 1], got {value}")
    if not 0 <= n_corrupt <= n_images:
        raise ValueError(f"generate_world: n_corrupt must be in [0, n_images], got {n_corrupt}")
    if samples_per_shard < 1:
        raise ValueError(f"generate_world: samples_per_shard must be >= 1, got {samples_per_shard}")

    root = Path(out_dir)
    owned = [root / "source", root / "truth", root / "tags", root / "world.json"]
    if any(p.exists() for p in owned):
        if not overwrite:
            raise FileExistsError(f"{root} already holds a demo world (or part of one); "
                                  "pass overwrite=True or choose another out_dir")
        for p in owned:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    source, truth_dir, tags_dir = root / "source", root / "truth", root / "tags"
    for d in (source, truth_dir, tags_dir):
        d.mkdir(parents=True, exist_ok=True)

    config = dict(n_images=n_images, seed=seed, fmt=fmt, image_size=image_size, categories=cats, colours=cols,
                  scenes=scns, objects_per_image=list(objects_per_image), object_size=list(object_size),
                  captions_per_image=list(cap_range), p_omit_object=p_omit_object, p_omit_colour=p_omit_colour,
                  p_absent=p_absent, p_omit_scene=p_omit_scene, noise=noise, p_scene_object=p_scene_object,
                  p_lookalike=p_lookalike, image_format=image_format,
                  jpeg_quality=jpeg_quality, samples_per_shard=samples_per_shard, n_corrupt=n_corrupt)

    tag_list = tags_dir / "tag_list.txt"
    tag_list.write_text("\n".join(demo_tag_list(cats, cols, scns)) + "\n")
    tag_groups = tags_dir / "tag_groups.json"
    tag_groups.write_text(json.dumps({"category": cats, "colour": cols, "scene": scns}, indent=1))
    # the label system declares each tag's type: shapes are objects (grounded), colours attributes
    (tags_dir / TYPES_FILE).write_text("\n".join([OBJECT] * len(cats) + [ATTRIBUTE] * len(cols)
                                                 + [SCENE] * len(scns)) + "\n")

    # Corrupt samples are spread evenly and chosen by the seed too.
    corrupt_rng = np.random.default_rng([seed, 1 << 20])
    corrupt_idx = sorted(corrupt_rng.choice(n_images, size=n_corrupt, replace=False).tolist()) if n_corrupt else []
    corrupt: dict[str, str] = {}

    counts = _NoiseCounts()
    ctx = _context(cats, scns, image_size, (lo_obj, hi_obj), object_size, p_omit_object) \
        if noise == "contextual" else None
    truth_rows: list[dict] = []
    keys: list[str] = []
    writer = _FolderWriter(source) if fmt == "folder" else _ShardWriter(source, samples_per_shard, image_size)
    mime = "jpeg" if image_format == "jpg" else "png"
    try:
        for i in range(n_images):
            rng = np.random.default_rng([seed, i])
            key = sample_key(i, samples_per_shard)
            keys.append(key)
            pixels, scene, objects = _draw_image(rng, image_size, cats, cols, scns, (lo_obj, hi_obj), object_size,
                                                 ctx.likely if ctx else None, p_scene_object)
            buf = io.BytesIO()
            if image_format == "jpg":
                Image.fromarray(pixels).save(buf, format="JPEG", quality=jpeg_quality)
            else:
                Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
            data = buf.getvalue()
            n_caps = int(rng.integers(cap_range[0], cap_range[1] + 1))
            caps, cap_tags, errors, any_absent = [], [], [], False
            omit_p = ctx.omission(objects, image_size) if ctx else None
            for _ in range(n_caps):
                if ctx is None:
                    text, tags, absent = _caption(rng, scene, objects, cats, cols, probs, counts)
                else:
                    text, tags, absent, err = _caption_contextual(rng, scene, objects, cats, cols, probs, counts,
                                                                  ctx, omit_p)
                    errors.append(err)
                caps.append(text)
                cap_tags.append(tags)
                any_absent |= absent
            if i in corrupt_idx:
                kind = _CORRUPTIONS[len(corrupt) % len(_CORRUPTIONS)]
                corrupt[key] = kind
                if kind == "truncated-image":
                    data = data[: len(data) // 3]
                elif kind == "not-an-image":
                    data = rng.bytes(len(data))
                else:
                    caps = [""]
                writer.add(key, data, image_format, caps, mime)
                continue
            counts.images += 1
            counts.images_with_absent += int(any_absent)
            writer.add(key, data, image_format, caps, mime)
            truth_tags = sorted({o.category for o in objects} | {o.colour for o in objects} | {scene})
            truth_rows.append({
                "key": key, "file": writer.relpath(key, image_format), "width": image_size, "height": image_size,
                "scene": scene, "tags": truth_tags,
                "objects": [{"category": o.category, "colour": o.colour, "box": list(o.box), "area": o.area}
                            for o in objects],
                "captions": caps, "caption_tags": cap_tags,
                # contextual world: what went wrong in each caption (object indices, the absent tag and its kind)
                **({"caption_errors": errors} if ctx else {}),
            })
    finally:
        writer.close()

    gt_path = truth_dir / "ground_truth.jsonl"
    with open(gt_path, "w") as f:
        for row in truth_rows:
            f.write(json.dumps(row) + "\n")
    noise = _noise_summary(counts, truth_rows, {"category": cats, "colour": cols, "scene": scns}, corrupt)
    if ctx is not None:
        noise["contextual"] = _context_summary(ctx, truth_rows, image_size)
    (truth_dir / "noise.json").write_text(json.dumps(noise, indent=1))

    info = WorldInfo(
        root=root, fmt=fmt, source=source,
        captions_file=source / "captions.jsonl" if fmt == "folder" else None,
        shards=tuple(writer.shards) if fmt == "webdataset" else (),
        ground_truth=gt_path, tag_list=tag_list, tag_groups=tag_groups, keys=tuple(keys), corrupt=corrupt,
        noise=noise, config=config, seconds=round(time.perf_counter() - t0, 3))
    tmp = root / "world.json.tmp"
    tmp.write_text(json.dumps(info.to_json(), indent=1))
    tmp.replace(root / "world.json")   # the commit point: a world without world.json is unfinished
    return info


def _noise_summary(c: _NoiseCounts, truth_rows: list[dict], groups: dict[str, list[str]],
                   corrupt: dict[str, str]) -> dict:

    def rate(a: int, b: int) -> float:
        return round(a / b, 4) if b else 0.0

    truth = {r["key"]: set(r["tags"]) for r in truth_rows}
    union = {r["key"]: set().union(*map(set, r["caption_tags"])) for r in truth_rows}
    first = {r["key"]: set(r["caption_tags"][0]) for r in truth_rows}
    q_union = label_quality(union, truth, groups=groups)
    q_first = label_quality(first, truth, groups=groups)

    def brief(q: dict) -> dict:
        out = {k: q[k] for k in ("precision", "recall", "f1", "tp", "fp", "fn")}
        out["by_group"] = {g: {k: v[k] for k in ("precision", "recall", "f1")} for g, v in q["per_group"].items()}
        return out

    return {
        "counts": asdict(c),
        "rates": {
            "object_omitted": rate(c.objects_omitted, c.object_instances),
            "colour_omitted": rate(c.colours_omitted, c.colour_mentions),
            "captions_with_absent": rate(c.absent_mentions, c.captions),
            "images_with_absent": rate(c.images_with_absent, c.images),
            "scene_omitted": rate(c.scene_omitted, c.captions),
            "captions_per_image": rate(c.captions, c.images + len(corrupt)),
        },
        # What a perfect caption parser would give, against the truth.
        "caption_labels_union": brief(q_union),
        "caption_labels_first_caption": brief(q_first),
        "corrupt": dict(corrupt),
    }


def _context_summary(ctx: _Context, truth_rows: list[dict], size: int) -> dict:
    """How the contextual world's errors fell, measured back from the truth: omission by size and position
    (thirds of the object instances), absent mentions by kind, how often objects are of their scene's likely
    categories, and the model itself (likely categories, look-alike pairs)."""
    rel, edge, missed = [], [], []
    kinds = {"context": 0, "look-alike": 0, "other": 0}
    in_scene = n_obj = 0
    for r in truth_rows:
        n_obj += len(r["objects"])
        in_scene += sum(o["category"] in ctx.likely[r["scene"]] for o in r["objects"])
        for err in r["caption_errors"]:
            if err["absent_kind"]:
                kinds[err["absent_kind"]] += 1
            unnamed = set(err["omitted"]) | ({err["renamed"]} if err["renamed"] is not None else set())
            for i, o in enumerate(r["objects"]):
                x0, y0, x1, y1 = o["box"]
                rel.append(max(x1 - x0, y1 - y0) / size)
                edge.append(math.hypot((x0 + x1) / 2 - size / 2, (y0 + y1) / 2 - size / 2) / (size / 2))
                missed.append(i in unnamed)

    def by_thirds(values: list[float]) -> list[dict]:
        if not values:
            return []
        v, m = np.asarray(values), np.asarray(missed, dtype=float)
        cuts = np.quantile(v, [1 / 3, 2 / 3])
        bins = np.digitize(v, cuts)
        return [{"from": round(float(v[bins == b].min()), 3), "to": round(float(v[bins == b].max()), 3),
                 "instances": int((bins == b).sum()), "omitted": round(float(m[bins == b].mean()), 4)}
                for b in range(3) if (bins == b).any()]

    return {
        "scene_categories": ctx.likely, "look_alikes": ctx.look_alike,
        "objects_of_scene_categories": round(in_scene / n_obj, 4) if n_obj else 0.0,
        "absent_by_kind": kinds,
        # box side / image side, smallest third first; distance of the box centre from the image centre / half side
        "omitted_by_size": by_thirds(rel), "omitted_by_distance_from_centre": by_thirds(edge),
    }


class _FolderWriter:
    def __init__(self, source: Path):
        self.source = source
        (source / "images").mkdir(parents=True, exist_ok=True)
        self._captions = open(source / "captions.jsonl", "w")

    def relpath(self, key: str, ext: str) -> str:
        return f"images/{key}.{ext}"

    def add(self, key: str, data: bytes, ext: str, captions: list[str], mime: str) -> None:
        rel = self.relpath(key, ext)
        (self.source / rel).write_bytes(data)
        self._captions.write(json.dumps({"file": rel, "captions": captions}) + "\n")

    def close(self) -> None:
        self._captions.close()


class _ShardWriter:
    """Tars laid out as img2dataset writes them: <key>.<ext>, <key>.txt, <key>.json per sample,
    plus a Parquet table and a stats file per shard. `.txt` holds the captions, one a line."""

    def __init__(self, source: Path, per_shard: int, size: int):
        self.source, self.per_shard, self.size = source, per_shard, size
        self.shards: list[Path] = []
        self._tar: tarfile.TarFile | None = None
        self._rows: list[dict] = []
        self._n = 0
        self._t0 = time.time()

    def relpath(self, key: str, ext: str) -> str:
        return f"{self.shards[-1].name}/{key}.{ext}"

    def _member(self, name: str, payload: bytes) -> None:
        ti = tarfile.TarInfo(name)
        ti.size = len(payload)
        ti.mtime = 0          # fixed, so the same seed gives byte-identical tars
        ti.mode = 0o644
        self._tar.addfile(ti, io.BytesIO(payload))

    def add(self, key: str, data: bytes, ext: str, captions: list[str], mime: str) -> None:
        if self._n % self.per_shard == 0:
            self._finish_shard()
            path = self.source / f"{len(self.shards):05d}.tar"
            self.shards.append(path)
            self._tar = tarfile.open(path.with_suffix(".tar.tmp"), "w", format=tarfile.USTAR_FORMAT)
        self._n += 1
        meta = {"url": f"demo://{key}.{ext}", "key": key, "status": "success", "error_message": None,
                "width": self.size, "height": self.size, "original_width": self.size,
                "original_height": self.size, "exif": "{}", "caption": captions[0] if captions else None,
                "captions": captions, "mime": f"image/{mime}"}
        self._member(f"{key}.{ext}", data)
        self._member(f"{key}.txt", "\n".join(captions).encode())
        self._member(f"{key}.json", json.dumps(meta).encode())
        self._rows.append({k: meta[k] for k in ("url", "key", "status", "error_message", "width", "height",
                                                "original_width", "original_height", "caption")})

    def _finish_shard(self) -> None:
        if self._tar is None:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq
        self._tar.close()
        path = self.shards[-1]
        path.with_suffix(".tar.tmp").replace(path)
        pq.write_table(pa.Table.from_pylist(self._rows), path.with_suffix(".parquet"))
        path.with_name(path.stem + "_stats.json").write_text(json.dumps({
            "count": len(self._rows), "successes": len(self._rows), "failed_to_download": 0,
            "failed_to_resize": 0, "status_dict": {"success": len(self._rows)}}, indent=1))
        self._tar, self._rows = None, []

    def close(self) -> None:
        self._finish_shard()


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write a synthetic image–caption world with known ground truth.")
    ap.add_argument("out_dir")
    ap.add_argument("--n", type=int, default=2700, help="number of images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fmt", choices=("folder", "webdataset"), default="folder")
    ap.add_argument("--size", type=int, default=128, help="image side in pixels")
    ap.add_argument("--categories", type=int, default=len(DEFAULT_CATEGORIES),
                    help=f"use the first N of {len(CATEGORY_NAMES)} categories")
    ap.add_argument("--captions", type=int, nargs=2, default=(1, 3), metavar=("MIN", "MAX"))
    ap.add_argument("--corrupt", type=int, default=0, help="samples with a planted defect")
    ap.add_argument("--noise", choices=NOISE_MODELS, default="contextual",
                    help="caption errors tied to the image (contextual) or drawn at random (independent, the control)")
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)
    if not 2 <= a.categories <= len(CATEGORY_NAMES):
        ap.error(f"--categories must be in [2, {len(CATEGORY_NAMES)}]")
    info = generate_world(a.out_dir, a.n, a.seed, a.fmt, image_size=a.size, categories=CATEGORY_NAMES[:a.categories],
                          captions_per_image=tuple(a.captions), n_corrupt=a.corrupt, noise=a.noise,
                          overwrite=a.overwrite)
    q = info.noise["caption_labels_union"]
    print(f"{a.n} images in {info.seconds:.2f} s -> {info.source}")
    print(f"caption labels vs truth: precision {q['precision']:.3f} recall {q['recall']:.3f} f1 {q['f1']:.3f}")


if __name__ == "__main__":
    main()
