"""Where captioned images come from: MS-COCO, the user's own table, or the embedded `shapes` generator.

A source does two things:
  rows()      lists one small dict per image in the driver (cheap: no pixels) plus the inputs it rejects
              while listing (duplicate ids, captions pointing at no image);
  load(row)   runs inside a Ray CPU task: returns the PIL image, the raw captions and extra json fields.
Everything else -- caption cleaning, mode conversion, size checks, crop and resize -- is shared and lives in
`prepare`, so every source rejects bad input the same way and says why (docs/pipeline.md, "Bad inputs").
"""
from __future__ import annotations

import io
import json
import zlib
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ifvit.errors import BadConfig, MissingPath

SPLITS = ("train", "val", "holdout")


def skip(row_or_key, reason: str, **extra) -> dict:
    """One entry of the manifest's `skipped` list."""
    if isinstance(row_or_key, dict):
        return {"key": row_or_key["key"], "split": row_or_key["split"], "source_file": row_or_key["source_file"],
                "reason": reason, **extra}
    return {"key": row_or_key, "reason": reason, **extra}


# ----------------------------------------------------------------------------------------- COCO

@dataclass
class CocoSource:
    """MS-COCO captions (2014 or 2017): annotations/captions_{train,val}YEAR.json and the folders
    {train,val}YEAR/ under `root`. Every caption of an image is kept (COCO has 5-7)."""
    root: str
    year: int = 2014
    splits: tuple[str, ...] = ("train", "val")
    name = "coco"

    def __post_init__(self):
        self.root = str(Path(self.root).resolve())  # Ray workers do not share the driver's working dir

    def options(self) -> dict:
        return {"kind": self.name, "root": self.root, "year": self.year,
                "splits": list(self.splits)}

    def rows(self) -> tuple[list[dict], list[dict]]:
        rows, skipped, seen = [], [], set()
        for split in self.splits:
            ann_file = Path(self.root) / "annotations" / f"captions_{split}{self.year}.json"
            if not ann_file.is_file():
                raise MissingPath(f"no {ann_file}: --coco-root must hold annotations/ and {split}{self.year}/ "
                                        f"(from https://cocodataset.org: {split}{self.year}.zip and "
                                        f"annotations_trainval{self.year}.zip)")
            data = json.loads(ann_file.read_text(encoding="utf-8"))
            captions = defaultdict(list)
            for ann in sorted(data["annotations"], key=lambda a: a["id"]):
                captions[ann["image_id"]].append(ann["caption"])
            images = {}
            for img in data["images"]:
                key = f"{img['id']:012d}"
                if key in seen:
                    skipped.append(skip(key, "duplicate id", split=split, source_file=img["file_name"]))
                    continue
                seen.add(key)
                images[img["id"]] = img
            for image_id in sorted(set(captions) - set(images)):
                skipped.append(skip(f"{image_id:012d}", "captions for an image id not in the annotation's images",
                                    split=split, source_file=ann_file.name))
            for image_id in sorted(images):
                img = images[image_id]
                rows.append({"key": f"{image_id:012d}", "split": split, "id": image_id,
                             "source_file": f"{split}{self.year}/{img['file_name']}",
                             "captions": captions.get(image_id, [])})
        return rows, skipped

    def load(self, row: dict):
        return Image.open(Path(self.root) / row["source_file"]), row["captions"], {}


# ----------------------------------------------------------------------------------------- table

IMAGE_COLUMNS = ("image", "image_path", "path", "file", "file_name", "filename")
CAPTION_COLUMNS = ("captions", "caption", "text", "prompt")


def read_table(path: str):
    import pandas as pd

    suffix = Path(path).suffix.lower()
    if suffix == ".parquet":
        return pd.read_parquet(path)
    if suffix in (".jsonl", ".json"):
        return pd.read_json(path, lines=suffix == ".jsonl")
    if suffix in (".csv", ".tsv"):
        return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", keep_default_na=False)
    raise BadConfig(f"unsupported table {path}: use .parquet, .jsonl, .json, .csv or .tsv")


def _as_caption_list(value) -> list:
    if isinstance(value, (list, tuple, np.ndarray)):
        return list(value)
    return [value]


@dataclass
class TableSource:
    """The user's captioned images: one row per image, an image path column (relative to `image_root`) and
    one or more caption columns, or one column holding a list of captions. An optional `split` column
    (train/val) is honoured; otherwise a stable `val_fraction` of the images (by path hash) goes to val."""
    table: str
    image_root: str
    image_column: str | None = None
    caption_columns: tuple[str, ...] = ()
    id_column: str | None = None
    val_fraction: float = 0.02
    name = "table"

    def __post_init__(self):
        self.table, self.image_root = str(Path(self.table).resolve()), str(Path(self.image_root).resolve())
        if not Path(self.table).is_file():
            raise MissingPath(f"no table at {self.table}: pass --table FILE (.parquet, .jsonl, .json, .csv, .tsv)")
        if not Path(self.image_root).is_dir():
            raise MissingPath(f"no folder {self.image_root}: pass --image-root DIR, the folder the table's image "
                              "paths are relative to")

    def options(self) -> dict:
        return {"kind": self.name, **asdict(self), "caption_columns": list(self.caption_columns),
                "table_size": Path(self.table).stat().st_size}

    def _columns(self, df) -> tuple[str, list[str], str | None]:
        image = self.image_column or next((c for c in IMAGE_COLUMNS if c in df.columns), None)
        captions = list(self.caption_columns) or [c for c in df.columns if c in CAPTION_COLUMNS
                                                   or c.startswith("caption")]
        missing = [c for c in [image, *captions] if c is None or c not in df.columns]
        if image is None or not captions or missing:
            raise BadConfig(f"table {self.table} has columns {list(df.columns)}: name the image path column with "
                             f"--image-column and the caption column(s) with --caption-column")
        id_column = self.id_column or ("id" if "id" in df.columns else None)
        return image, captions, id_column

    def rows(self) -> tuple[list[dict], list[dict]]:
        df = read_table(self.table)
        image_col, caption_cols, id_col = self._columns(df)
        rows, skipped, seen = [], [], set()
        width = max(6, len(str(len(df))))
        for index, record in enumerate(df.to_dict("records")):
            key = f"{index:0{width}d}"  # row number: stable, unique and dot-free (webdataset splits keys at dots)
            path = str(record[image_col])
            ident = record[id_col] if id_col else index
            ident = ident.item() if hasattr(ident, "item") else ident
            split = str(record.get("split", "")).strip().lower() or self._split_of(path)
            split = {"validation": "val", "valid": "val"}.get(split, split)
            row = {"key": key, "split": split, "id": ident, "source_file": path,
                   "captions": [c for col in caption_cols for c in _as_caption_list(record[col])]}
            if split not in SPLITS:
                skipped.append(skip(row, f"unknown split {split!r} (use train or val)"))
            elif id_col and ident in seen:
                skipped.append(skip(row, f"duplicate id {ident!r}"))
            else:
                seen.add(ident)
                rows.append(row)
        return rows, skipped

    def _split_of(self, path: str) -> str:
        return "val" if zlib.crc32(path.encode()) % 10_000 < self.val_fraction * 10_000 else "train"

    def load(self, row: dict):
        return Image.open(Path(self.image_root) / row["source_file"]), row["captions"], {}


# ----------------------------------------------------------------------------------------- shapes

@dataclass
class ShapesSource:
    """The embedded synthetic set (pipeline/shapes.py): generated inside the Ray tasks, one index each."""
    train_images: int = 20_000
    val_images: int = 1_000
    holdout_images: int = 500
    seed: int = 0
    resolution: int = 32
    world: str = "full"
    name = "shapes"

    def options(self) -> dict:
        # The full world is left out, so sets built before worlds existed keep their config hash.
        return {"kind": self.name, **{k: v for k, v in asdict(self).items() if (k, v) != ("world", "full")}}

    def rows(self) -> tuple[list[dict], list[dict]]:
        from pipeline import shapes

        counts = {"train": self.train_images, "val": self.val_images, "holdout": self.holdout_images}
        return [{"key": shapes.key_for(split, i), "split": split, "id": i, "source_file": f"shapes:{split}/{i}"}
                for split, n in counts.items() for i in range(n)], []

    def load(self, row: dict):
        from pipeline import shapes

        example = shapes.make_example(row["split"], row["id"], self.seed, self.resolution, self.world)
        return example.image, example.captions, {"scene": example.scene}


# ----------------------------------------------------------------------------------------- shared checks

@dataclass(frozen=True)
class Preprocess:
    """Center square crop + LANCZOS resize to `resolution` (docs/design.md, "Shard set"), and what counts as
    unusable."""
    resolution: int = 256
    min_side: int = 32  # smaller images would be upsampled > 8x to 256: noise, not data
    max_aspect: float = 5.0  # a center square of a wider panorama keeps < 20% of what the captions describe

    def describe(self) -> str:
        return f"EXIF-transpose, to RGB (alpha over white), center square crop, LANCZOS resize to {self.resolution}"


def clean_captions(captions: list) -> tuple[list[str], list[str]]:
    """(usable captions with whitespace normalised, reasons for the dropped ones)."""
    kept, dropped = [], []
    for c in captions:
        if not isinstance(c, str):  # None, or NaN for a missing cell in pandas
            dropped.append(f"caption is not text: {c!r}")
        elif not " ".join(c.split()):
            dropped.append("empty caption")
        else:
            kept.append(" ".join(c.split()))
    return kept, dropped


def to_rgb(image: Image.Image) -> Image.Image:
    """Greyscale, CMYK, palette and alpha images to RGB; transparent pixels become white, not black."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit greyscale: PIL's convert would clip
        array = np.asarray(image, dtype=np.float64)
        return Image.fromarray((255 * array / max(array.max(), 1)).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def center_square(image: Image.Image, resolution: int) -> Image.Image:
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.resize((resolution, resolution), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side))


def prepare(source, row: dict, pre: Preprocess) -> tuple[np.ndarray | None, dict, list[dict]]:
    """Load one row: (uint8 [3, R, R] or None when skipped, record json, skipped entries)."""
    try:
        image, raw_captions, extra = source.load(row)
        with image:
            image.load()  # decode now, inside the try: truncated files fail here, not later
            size = image.size
            if min(size) < pre.min_side:
                return None, {}, [skip(row, f"too small: {size[0]}x{size[1]} (min side {pre.min_side} px)")]
            if max(size) / min(size) > pre.max_aspect:
                return None, {}, [skip(row, f"extreme aspect ratio {max(size) / min(size):.1f} "
                                            f"(max {pre.max_aspect}): a center crop would lose most of it")]
            mode = image.mode
            pixels = np.asarray(center_square(to_rgb(image), pre.resolution)).transpose(2, 0, 1).copy()
    except FileNotFoundError:
        return None, {}, [skip(row, "missing file")]
    except Exception as e:  # PIL raises many types for corrupt data; the reason keeps the message
        return None, {}, [skip(row, f"unreadable image: {type(e).__name__}: {e}")]
    captions, dropped = clean_captions(raw_captions)
    skipped = [skip(row, reason) for reason in dropped]
    if not captions:
        return None, {}, skipped + [skip(row, "no captions")]
    record = {"key": row["key"], "id": row["id"], "source_file": row["source_file"], "split": row["split"],
              "captions": captions, "original_size": list(size), "original_mode": mode, **extra}
    return pixels, record, skipped


def encode_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.transpose(1, 2, 0)).save(buffer, format="PNG")
    return buffer.getvalue()
