"""The embedded `shapes` data set: seeded captioned scenes with exact ground truth (docs/shapes.md).

Scenes hold 1-5 non-overlapping circles, squares and triangles in six well-separated colours on black:

    one_group   "three red circles"
    two_groups  "two red circles and a blue square"
    relation    "a red circle left of a blue square"

Every image has five paraphrased captions (number words or digits, "a"/"one", word order, prefixes) and its
exact scene dict, so alignment can be scored by a program (evaluate/judge.py) instead of human raters.
Some (colour, shape) pairs (HELD_OUT) never appear in `train`/`val`; split `holdout` always contains one.

Geometry lives on a 64-unit design grid (integer centres, even sizes, box edges on pixel boundaries at 32
and 64 px), and pixels are rasterised by testing sub-pixel samples at exact binary fractions with
+ - * <= only, so every resolution renders byte-identically on any machine.
Randomness uses only `random.Random(int).random()`, the one stream Python promises never to change
(numpy's Generator methods may change their streams between releases).

Torch-free: numpy and Pillow only. Contract: docs/CONTRACTS.md §1; user docs: docs/shapes.md.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import json
import random
import re
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image

# Saturated colours at least 160 apart in RGB (and from black), so a blurry generated image still maps to the right name.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 60, 240),
    "yellow": (240, 220, 40),
    "magenta": (220, 50, 220),
    "cyan": (40, 220, 230),
}
BACKGROUND = (0, 0, 0)
SHAPES = ("circle", "square", "triangle")
# One pair per colour-shape row/column, so each held-out colour and shape is still seen in training.
HELD_OUT: set[tuple[str, str]] = {("yellow", "triangle"), ("magenta", "circle"), ("cyan", "square")}
SPLITS = ("train", "val", "holdout")
KINDS = ("one_group", "two_groups", "relation")
KIND_WEIGHTS = (0.4, 0.35, 0.25)
RELATIONS = ("left of", "right of", "above", "below")
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
MAX_OBJECTS = 5
CAPTIONS_PER_IMAGE = 5

# Design grid: 64 units = the image side. At 32 px an object is 7-9 px with >= 3 px of background between
# bounding boxes, enough for 5 objects to fit and for the judge to separate them.
UNITS = 64
SIZES = (14, 16, 18)
GAP = 6
BORDER = 2
SUPERSAMPLE = 4  # sub-pixel samples per pixel side when rasterising
VAL_EVERY = 10  # a scene goes to `val` iff its content hash % 10 == 0: no scene is in both train and val

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
PREFIXES = ("", "a picture of ", "an image of ", "there {be} ")


@dataclass(frozen=True)
class World:
    """What the generator may draw. `full` is the data set; easier worlds (the CPU demo's) draw from a subset
    with the same grammar, rendering and judge, so every caption parses and every score means the same."""
    colors: tuple[str, ...] = tuple(COLORS)
    kinds: tuple[str, ...] = KINDS
    kind_weights: tuple[float, ...] = KIND_WEIGHTS
    max_objects: int = MAX_OBJECTS
    sizes: tuple[int, ...] = SIZES


WORLDS: dict[str, World] = {
    "full": World(),
    # Three colours, one group of 1-3 objects, large (22-26 of 64 units): what a CPU run of minutes can learn
    # (docs/shapes.md, "Worlds"). None of its colour-shape pairs is held out, so it has no holdout split.
    "demo": World(colors=("red", "green", "blue"), kinds=("one_group",), kind_weights=(1.0,), max_objects=3,
                  sizes=(22, 24, 26)),
}


def get_world(name: str) -> World:
    if name not in WORLDS:
        raise ValueError(f"unknown shapes world {name!r}: choose one of {', '.join(WORLDS)}")
    return WORLDS[name]


@dataclass
class ShapesExample:
    key: str
    image: Image.Image  # RGB, resolution x resolution
    captions: list[str]
    scene: dict


# ----------------------------------------------------------------------------------------- randomness

class _Stream:
    """Deterministic choices built only on random.Random.random(), stable across Python versions."""

    def __init__(self, *parts):
        digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
        self._random = random.Random(int.from_bytes(digest[:8], "big"))

    def below(self, n: int) -> int:
        return min(int(self._random.random() * n), n - 1)

    def between(self, lo: int, hi: int) -> int:  # inclusive
        return lo + self.below(hi - lo + 1)

    def choice(self, items):
        return items[self.below(len(items))]

    def weighted(self, items, weights):
        r, acc = self._random.random() * sum(weights), 0.0
        for item, w in zip(items, weights):
            acc += w
            if r < acc:
                return item
        return items[-1]

    def sample(self, items, k: int) -> list:
        pool = list(items)
        return [pool.pop(self.below(len(pool))) for _ in range(min(k, len(pool)))]


# ----------------------------------------------------------------------------------------- scenes

def _relation_holds(name: str, subject, obj) -> bool:
    """Generator-side relation test on boxes (cx, cy, size): disjoint along the relation's axis and that
    axis dominant 2:1, so nobody (and no judge reading centres to half a pixel) could call it another."""
    dx, dy = obj[0] - subject[0], obj[1] - subject[1]  # y grows downward
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[name]
    return along >= (subject[2] + obj[2]) / 2 + GAP and abs(across) * 2 <= along


@functools.lru_cache(maxsize=None)
def _centres(size: int) -> tuple[np.ndarray, np.ndarray]:
    # Box edges on even units = pixel boundaries at 32 and 64 px: squares come out exact.
    grid = BORDER + size // 2 + 2 * np.arange((UNITS - 2 * BORDER - size) // 2 + 1)
    cx, cy = np.meshgrid(grid, grid)
    return cx.ravel(), cy.ravel()


def _place(stream: _Stream, n: int, sizes: tuple[int, ...] = SIZES) -> list[tuple[int, int, int]] | None:
    """n boxes (cx, cy, size) in units, each drawn uniformly among the grid positions still free."""
    boxes = []
    for _ in range(n):
        size = stream.choice(sizes)
        cx, cy = _centres(size)
        free = np.ones(cx.shape, bool)
        for bx, by, bsize in boxes:  # at least GAP between boxes along x or y (doubled: integers only)
            reach = bsize + size + 2 * GAP
            free &= (2 * np.abs(cx - bx) >= reach) | (2 * np.abs(cy - by) >= reach)
        candidates = np.flatnonzero(free)
        if len(candidates) == 0:
            return None
        k = candidates[stream.below(len(candidates))]
        boxes.append((int(cx[k]), int(cy[k]), size))
    return boxes


def _sample_scene(stream: _Stream, pairs: list[tuple[str, str]], world: World = WORLDS["full"]) -> dict | None:
    # The full world keeps the original draw sequence exactly (byte-identical sets across versions).
    kind = stream.weighted(world.kinds, world.kind_weights) if len(world.kinds) > 1 else world.kinds[0]
    most = world.max_objects
    if kind == "one_group":
        counts = [stream.between(1, most)]
    elif kind == "two_groups":
        first = stream.between(1, most - 1)
        counts = [first, stream.between(1, most - first)]
    else:
        counts = [1, 1]
    chosen = stream.sample(pairs, len(counts))
    groups = [{"count": c, "color": color, "shape": shape} for c, (color, shape) in zip(counts, chosen)]
    boxes = _place(stream, sum(counts), world.sizes)
    if boxes is None:
        return None
    relation = None
    if kind == "relation":  # name one of the relations the layout shows clearly (by symmetry: uniform)
        clear = [name for name in RELATIONS if _relation_holds(name, boxes[0], boxes[1])]
        if not clear:
            return None
        relation = {"name": stream.choice(clear), "subject": 0, "object": 1}
    objects, it = [], iter(boxes)
    for g in groups:
        for _ in range(g["count"]):
            cx, cy, size = next(it)
            # Units are multiples of 1/64: exact in binary floating point and in JSON.
            objects.append({"color": g["color"], "shape": g["shape"],
                            "x": cx / UNITS, "y": cy / UNITS, "size": size / UNITS})
    return {"kind": kind, "objects": objects, "groups": groups, "relation": relation}


def _bucket(scene: dict) -> int:
    content = sorted((o["color"], o["shape"], o["x"], o["y"], o["size"]) for o in scene["objects"])
    return int.from_bytes(hashlib.sha256(json.dumps(content).encode()).digest()[:4], "big") % VAL_EVERY


def _make_scene(split: str, index: int, seed: int, world: str = "full") -> dict:
    if split not in SPLITS:
        raise ValueError(f"unknown shapes split {split!r}: use one of {SPLITS}")
    w = get_world(world)
    everything = [(c, s) for c in w.colors for s in SHAPES]
    held_out = [pair for pair in everything if pair in HELD_OUT]
    allowed = [pair for pair in everything if pair not in HELD_OUT]
    pairs = allowed if split != "holdout" else everything
    # The stream's name keeps the full world's scenes as they always were; other worlds get their own.
    stream = _Stream("shapes", seed, split, index) if world == "full" else _Stream("shapes", world, seed, split, index)
    while True:  # rejection sampling: a handful of draws for train, ~10 for val, ~4 for holdout
        scene = _sample_scene(stream, pairs, w)
        if scene is None:
            continue
        if split == "holdout" and not held_out:
            raise ValueError(f"the {world} world holds out no colour-shape pair: it has no holdout split "
                             "(build it with --holdout-images 0)")
        if split == "holdout":
            if any((g["color"], g["shape"]) in HELD_OUT for g in scene["groups"]):
                return scene
        elif (_bucket(scene) == 0) == (split == "val"):
            return scene


# ----------------------------------------------------------------------------------------- rendering

def shape_mask(shape: str, x: float, y: float, size: float, resolution: int) -> np.ndarray:
    """Boolean [resolution, resolution] mask of one shape (centre and size in [0, 1] image units).

    A pixel is on when at least half of its 4x4 sub-pixel samples fall inside the shape: area-true at
    7-9 px, where plain centre sampling turns small circles into squares with clipped corners.
    Hand-written instead of PIL.ImageDraw because samples sit at exact binary fractions of a unit and
    are tested with + - * <= only, so every resolution is identical on every platform."""
    cx, cy, half = x * UNITS, y * UNITS, size * UNITS / 2
    samples = (np.arange(resolution * SUPERSAMPLE) + 0.5) * (UNITS / (resolution * SUPERSAMPLE))
    u, v = samples[None, :], samples[:, None]
    if shape == "square":
        inside = (np.abs(u - cx) <= half) & (np.abs(v - cy) <= half)
    elif shape == "circle":
        inside = (u - cx) ** 2 + (v - cy) ** 2 <= half * half
    elif shape == "triangle":  # apex up: half-width grows from 0 at the top to `half` at the base
        inside = (v <= cy + half) & (2 * np.abs(u - cx) <= v - (cy - half))
    else:
        raise ValueError(f"unknown shape {shape!r}: use one of {SHAPES}")
    coverage = inside.reshape(resolution, SUPERSAMPLE, resolution, SUPERSAMPLE).sum(axis=(1, 3))
    return coverage * 2 >= SUPERSAMPLE * SUPERSAMPLE


def render(scene: dict, resolution: int = 32) -> Image.Image:
    pixels = np.empty((resolution, resolution, 3), np.uint8)
    pixels[:] = BACKGROUND
    for o in scene["objects"]:
        pixels[shape_mask(o["shape"], o["x"], o["y"], o["size"], resolution)] = COLORS[o["color"]]
    return Image.fromarray(pixels, "RGB")


# ----------------------------------------------------------------------------------------- captions

def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrases(group: dict, forms: tuple[str, ...] = ("article", "word", "digit")) -> list[str]:
    count, color, shape = group["count"], group["color"], group["shape"]
    noun = f"{color} {shape}" + ("s" if count > 1 else "")
    numbers = {"article": _article(color) if count == 1 else NUMBER_WORDS[count],
               "word": NUMBER_WORDS[count], "digit": str(count)}
    return list(dict.fromkeys(f"{numbers[f]} {noun}" for f in forms))


def _with_prefix(body: str, first_count: int) -> list[str]:
    be = "is" if first_count == 1 else "are"
    return [prefix.format(be=be) + body for prefix in PREFIXES]


def all_captions(scene: dict) -> list[str]:
    """Every paraphrase the grammar allows for the scene; the first is the plain canonical one."""
    groups, relation = scene["groups"], scene["relation"]
    out = []
    if relation is None:
        orders = [groups] if len(groups) == 1 else [groups, groups[::-1]]
        for order in orders:
            for phrases in itertools.product(*(_noun_phrases(g) for g in order)):
                out += _with_prefix(" and ".join(phrases), order[0]["count"])
    else:
        name, inverse = relation["name"], INVERSE[relation["name"]]
        subject, obj = groups[relation["subject"]], groups[relation["object"]]
        # "B right of A" says the same as "A left of B"; "to the" is natural only for left/right.
        for first, word, second in ((subject, name, obj), (obj, inverse, subject)):
            words = [word, f"to the {word}"] if word in ("left of", "right of") else [word]
            for a, w, b in itertools.product(_noun_phrases(first, ("article", "word")), words,
                                             _noun_phrases(second, ("article", "word"))):
                out += _with_prefix(f"{a} {w} {b}", first["count"])
    return list(dict.fromkeys(out))


def _pick_captions(stream: _Stream, scene: dict) -> list[str]:
    captions = all_captions(scene)
    return [captions[0]] + stream.sample(captions[1:], CAPTIONS_PER_IMAGE - 1)


_COUNT = {"a": 1, "an": 1, **{w: n for n, w in NUMBER_WORDS.items()}, **{str(n): n for n in NUMBER_WORDS}}
_NP = (rf"({'|'.join(_COUNT)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})s?")
_PREFIX = r"(?:a picture of |an image of |there is |there are )?"
_RELATION = r"(?:to the )?(left of|right of)|(above|below)"
_ONE = re.compile(rf"{_PREFIX}{_NP}")
_TWO = re.compile(rf"{_PREFIX}{_NP} and {_NP}")
_REL = re.compile(rf"{_PREFIX}{_NP} (?:{_RELATION}) {_NP}")


def parse_caption(text: str) -> dict | None:
    """{"kind", "groups", "relation"} of a caption in the generator's grammar, else None.

    Accepts every paraphrase `all_captions` writes, any case, extra spaces and a final full stop;
    the plural "s" is optional, so "3 red circle" reads like "3 red circles"."""
    text = " ".join(text.lower().replace(".", " ").split())

    def group(m, i):
        return {"count": _COUNT[m.group(i)], "color": m.group(i + 1), "shape": m.group(i + 2)}

    if m := _ONE.fullmatch(text):
        return {"kind": "one_group", "groups": [group(m, 1)], "relation": None}
    if m := _TWO.fullmatch(text):
        kind, groups, relation = "two_groups", [group(m, 1), group(m, 4)], None
    elif m := _REL.fullmatch(text):
        groups = [group(m, 1), group(m, 6)]
        kind, relation = "relation", {"name": m.group(4) or m.group(5), "subject": 0, "object": 1}
    else:
        return None
    if (groups[0]["color"], groups[0]["shape"]) == (groups[1]["color"], groups[1]["shape"]):
        return None  # "a red circle and two red circles" is not something the generator writes
    return {"kind": kind, "groups": groups, "relation": relation}


# ----------------------------------------------------------------------------------------- the data set

def key_for(split: str, index: int) -> str:
    return f"shapes-{split}-{index:08d}"


def make_example(split: str, index: int, seed: int = 0, resolution: int = 32, world: str = "full") -> ShapesExample:
    """Example `index` of `split`: depends on (split, index, seed, world) only, so any prefix or slice is stable."""
    scene = _make_scene(split, index, seed, world)
    captions = _pick_captions(_Stream("captions", seed, split, index), scene)
    return ShapesExample(key_for(split, index), render(scene, resolution), captions, scene)


def generate(split: str, n: int, seed: int = 0, resolution: int = 32, start: int = 0,
             world: str = "full") -> Iterator[ShapesExample]:
    """Examples start..start+n-1 of `split` ("train", "val" or "holdout"), deterministic per index."""
    for index in range(start, start + n):
        yield make_example(split, index, seed, resolution, world)
