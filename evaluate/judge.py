"""The automatic judge of the `shapes` data set: read an image back into objects, score it against a prompt.

What the paper measured with human raters (object counts, Fig. 5) is measured here by a program, which is
possible because `shapes` scenes have exact ground truth (pipeline/shapes.py; docs/design.md, "The shapes world").

    objects = read_scene(image)              # [{"color", "shape", "x", "y", "size"}], x/y/size in [0, 1]
    result  = score(objects, target)         # target: a scene dict or shapes.parse_caption(prompt)
    metrics = aggregate([result, ...])       # count error / match ratio per count and per object, accuracies
    plot_count_error({"if_concat": metrics, "early_concat": other}, "fig5.png")

Reusable count metrics (the human-evaluation scorer, evaluate/human.py, uses the same two):

    count_error(requested: Sequence[int], counted: Sequence[int]) -> float   # Eq. 9: mean |counted - requested|
    match_ratio(requested: Sequence[int], counted: Sequence[int]) -> float   # Eq. 10: mean [counted == requested]

Each pair (requested_i, counted_i) is one object group of one image; both raise ValueError on empty or
unequal-length input.
"""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from pipeline.shapes import BACKGROUND, COLORS, MAX_OBJECTS


@dataclass(frozen=True)
class JudgeConfig:
    # A pixel takes the nearest palette colour (background included) when within this RGB distance, else
    # it counts as background. Palette colours are >= 160 apart, so 110 tolerates a lot of colour drift.
    max_color_distance: float = 110.0
    # Components smaller than this fraction of the image are specks, not objects. The smallest object
    # (a 7 px triangle at 32 px) covers ~2.4% of the image; 0.6% is a quarter of it.
    min_area_fraction: float = 0.006


DEFAULT = JudgeConfig()
_PALETTE = np.array([BACKGROUND, *COLORS.values()], np.float32)
_COLOR_NAMES = list(COLORS)
# Shape prototypes in feature space (fill of the bounding box, top-corner fill, bottom-corner fill):
# an apex-up triangle fills half its box with empty top corners; a circle pi/4 with all corners empty.
_PROTOTYPES = {"square": (1.0, 1.0, 1.0), "circle": (0.785, 0.0, 0.0), "triangle": (0.5, 0.0, 1.0)}


# ----------------------------------------------------------------------------------------- reading

def _shape_of(mask: np.ndarray) -> str:
    """Classify one object's mask (cropped to its bounding box) by the nearest shape prototype."""
    h, w = mask.shape
    # Corner regions: pixels whose centre lies past |u| + |v| = 1.3 in box coordinates [-1, 1]^2.
    # A circle never reaches there (its max is sqrt 2 only on the diagonal, pixel centres fall short).
    u = (np.arange(w) + 0.5) / w * 2 - 1
    v = (np.arange(h) + 0.5) / h * 2 - 1
    corner = np.abs(u)[None, :] + np.abs(v)[:, None] > 1.3
    top, bottom = corner & (v < 0)[:, None], corner & (v > 0)[:, None]
    features = np.array([mask.mean(), mask[top].mean() if top.any() else 0.0,
                         mask[bottom].mean() if bottom.any() else 0.0])
    return min(_PROTOTYPES, key=lambda s: np.sum((features - np.array(_PROTOTYPES[s])) ** 2))


def read_scene(image: np.ndarray | Image.Image, config: JudgeConfig = DEFAULT) -> list[dict]:
    """Objects in an RGB image (uint8 HxWx3 or PIL): connected regions of one palette colour.

    Robust to what a generator gets slightly wrong: colours within `max_color_distance`, specks below
    `min_area_fraction`, and pinholes (filled) inside an object."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, np.float32)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"read_scene needs an RGB image HxWx3, got shape {pixels.shape}")
    height, width = pixels.shape[:2]
    distance = np.linalg.norm(pixels[:, :, None, :] - _PALETTE, axis=-1)
    nearest = distance.argmin(-1)
    nearest[distance.min(-1) > config.max_color_distance] = 0
    min_area = config.min_area_fraction * height * width
    objects = []
    for index, color in enumerate(_COLOR_NAMES, start=1):
        labels, _ = ndimage.label(nearest == index)  # 4-connectivity: diagonal touches stay apart
        for label, box in enumerate(ndimage.find_objects(labels), start=1):
            rows, cols = box
            if (rows.stop - rows.start) * (cols.stop - cols.start) < min_area:
                continue  # cheap early out: noise makes many specks
            mask = ndimage.binary_fill_holes(labels[box] == label)
            if mask.sum() < min_area:
                continue
            objects.append({
                "color": color, "shape": _shape_of(mask),
                "x": (cols.start + cols.stop) / 2 / width, "y": (rows.start + rows.stop) / 2 / height,
                "size": max(cols.stop - cols.start, rows.stop - rows.start) / max(height, width),
            })
    return objects


# ----------------------------------------------------------------------------------------- scoring

def _check_counts(requested: Sequence[int], counted: Sequence[int]) -> None:
    if len(requested) == 0 or len(requested) != len(counted):
        raise ValueError(f"need equally many requested and counted values, got {len(requested)} and "
                         f"{len(counted)}: pass one (requested, counted) pair per object group")


def count_error(requested: Sequence[int], counted: Sequence[int]) -> float:
    """Eq. 9, average count error: mean over samples of |counted - requested|."""
    _check_counts(requested, counted)
    return float(np.mean(np.abs(np.asarray(counted, float) - np.asarray(requested, float))))


def match_ratio(requested: Sequence[int], counted: Sequence[int]) -> float:
    """Eq. 10, average match ratio: fraction of samples whose count equals the requested count."""
    _check_counts(requested, counted)
    return float(np.mean(np.asarray(counted) == np.asarray(requested)))


def _relation_holds(name: str, subject: dict, obj: dict) -> bool:
    """Subject is on the named side of the object, and that axis dominates (else it reads as the other)."""
    dx, dy = obj["x"] - subject["x"], obj["y"] - subject["y"]  # y grows downward
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[name]
    return along > abs(across)


def score(detected: list[dict], target: dict) -> dict:
    """Score one image's detected objects against the requested scene.

    `target` needs "groups" and "relation" (a scene dict or `shapes.parse_caption`'s output). Colour and
    shape are judged as sets (the colours seen are exactly those asked for), so together with the
    per-group counts they separate attribute binding errors from missing attributes."""
    groups = []
    for g in target["groups"]:
        found = [o for o in detected if (o["color"], o["shape"]) == (g["color"], g["shape"])]
        groups.append({"color": g["color"], "shape": g["shape"], "requested": g["count"],
                       "counted": len(found)})
    relation_ok = None
    if target.get("relation"):
        relation = target["relation"]

        def largest(g):
            found = [o for o in detected if (o["color"], o["shape"]) == (g["color"], g["shape"])]
            return max(found, key=lambda o: o["size"], default=None)

        subject, obj = largest(target["groups"][relation["subject"]]), largest(target["groups"][relation["object"]])
        relation_ok = subject is not None and obj is not None and _relation_holds(relation["name"], subject, obj)
    counts_ok = all(g["requested"] == g["counted"] for g in groups)
    return {
        "kind": target.get("kind"),
        "groups": groups,
        "num_requested": sum(g["requested"] for g in groups),
        "num_detected": len(detected),
        "color_ok": {o["color"] for o in detected} == {g["color"] for g in groups},
        "shape_ok": {o["shape"] for o in detected} == {g["shape"] for g in groups},
        "relation_ok": relation_ok,
        # Exact: every group counted right, nothing extra, and the relation (if any) holds.
        "exact": counts_ok and len(detected) == sum(g["requested"] for g in groups) and relation_ok is not False,
    }


def _count_metrics(pairs: list[tuple[int, int]]) -> dict:
    requested, counted = zip(*pairs)
    return {"n": len(pairs), "count_error": count_error(requested, counted),
            "match_ratio": match_ratio(requested, counted)}


def aggregate(results: list[dict]) -> dict:
    """Summary of many `score` results (JSON-ready). Count metrics treat each object group as one sample,
    like one (object, count) prompt of the paper's human study; `by_count` keys are the requested count."""
    if not results:
        raise ValueError("aggregate needs at least one scored image")
    pairs = [(g["requested"], g["counted"]) for r in results for g in r["groups"]]
    by_count, by_object, by_kind = defaultdict(list), defaultdict(list), defaultdict(list)
    for r in results:
        by_kind[r["kind"]].append(r["exact"])
        for g in r["groups"]:
            by_count[g["requested"]].append((g["requested"], g["counted"]))
            by_object[f"{g['color']} {g['shape']}"].append((g["requested"], g["counted"]))
    relations = [r["relation_ok"] for r in results if r["relation_ok"] is not None]
    return {
        "num_images": len(results),
        "exact_accuracy": float(np.mean([r["exact"] for r in results])),
        "color_accuracy": float(np.mean([r["color_ok"] for r in results])),
        "shape_accuracy": float(np.mean([r["shape_ok"] for r in results])),
        "relation_accuracy": float(np.mean(relations)) if relations else None,
        "num_relation_images": len(relations),
        **_count_metrics(pairs),
        "by_count": {str(c): _count_metrics(by_count[c]) for c in sorted(by_count)},
        "by_object": {name: _count_metrics(by_object[name]) for name in sorted(by_object)},
        "by_kind": {str(k): {"n": len(v), "exact_accuracy": float(np.mean(v))} for k, v in sorted(
            by_kind.items(), key=lambda kv: str(kv[0]))},
    }


def judge_images(images: Sequence, targets: Sequence[dict], config: JudgeConfig = DEFAULT) -> dict:
    """read_scene + score + aggregate over paired images and target scenes."""
    return aggregate([score(read_scene(image, config), target) for image, target in zip(images, targets)])


def reference_levels(records: Iterable[dict], n: int, seed: int = 0) -> dict:
    """What the judge's scores mean on a world: {"data": the world's own first `n` images judged against
    their own scenes (the ceiling: how well the judge reads real pictures), "chance": the same images judged
    against the scenes of other images (a fixed derangement: a model that ignores its caption but draws
    the world's pictures perfectly scores this)}. `records`: ShardSet.records(split) dicts with png bytes."""
    import io

    images, scenes = [], []
    for record in records:
        if len(images) == n:
            break
        images.append(np.asarray(Image.open(io.BytesIO(record["png"])).convert("RGB")))
        scenes.append(record["json"]["scene"])
    if len(images) < 2:
        raise ValueError("reference levels need at least two images with scenes")
    order = np.random.default_rng(seed).permutation(len(images))
    shuffled = [None] * len(images)
    for i, j in enumerate(order):  # one cycle through a random order: nobody keeps their own scene
        shuffled[j] = scenes[order[i - 1]]
    return {"num_images": len(images), "data": judge_images(images, scenes),
            "chance": judge_images(images, shuffled)}


# ----------------------------------------------------------------------------------------- the figure

def plot_count_error(runs: Mapping[str, dict], path: str | os.PathLike, title: str | None = None) -> None:
    """Fig. 5-style plot: average count error (left) and match ratio (right) against the requested count,
    one line per label. `runs` maps a label (run or variant name) to an `aggregate` result."""
    from evaluate.plotting import new_figure, save_figure

    figure = new_figure(9, 3.6)
    error_axis, match_axis = figure.subplots(1, 2)
    counts = range(1, MAX_OBJECTS + 1)
    for label, metrics in runs.items():
        by_count = metrics["by_count"]
        present = [c for c in counts if str(c) in by_count]
        error_axis.plot(present, [by_count[str(c)]["count_error"] for c in present], marker="o", label=label)
        match_axis.plot(present, [by_count[str(c)]["match_ratio"] for c in present], marker="o", label=label)
    error_axis.set(xlabel="requested count", ylabel="average count error (Eq. 9)", xticks=list(counts))
    match_axis.set(xlabel="requested count", ylabel="match ratio (Eq. 10)", xticks=list(counts), ylim=(0, 1.02))
    error_axis.set_ylim(bottom=0)
    for axis in (error_axis, match_axis):
        axis.grid(alpha=0.3)
    match_axis.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    save_figure(figure, path, dpi=120)
