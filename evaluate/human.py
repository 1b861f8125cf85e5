"""Human evaluation for MS-COCO runs, where no program can judge (paper §4.2-4.4, Figs. 5 and 6).

    python -m evaluate.human make --runs RUN... --out DIR     # images, HTML page, blank rating sheets, key
    python -m evaluate.human score SHEETS... --out DIR        # filled sheets -> scores and plots

`make` generates, with the same seeds for every run:
- the object-count set: bus, sheep, person, apple x a/two/three/four/five x 10 images ("three buses");
- the preference set: 100 val captions, chosen as `python -m evaluate` chooses its prompts (distinct images,
  one seeded caption each), one image per run, shown in a random order per caption recorded in key.json.
It writes DIR/index.html (self-contained: images embedded), DIR/count_sheet.csv, DIR/preference_sheet.csv,
DIR/key.json (which run made which image: keep it from the raters) and the PNGs under DIR/images/.
Count images are shuffled over runs and prompts, so a rater cannot tell the runs apart by position -- the
paper notes its unshuffled order as a source of bias.

`score` (evaluate/human_scores.py) reads any number of filled sheets (one per rater; the kind is told by the header) and computes, per
run: the average count error and match ratio (Eq. 9, 10, the functions of evaluate/judge.py), also per object
and per requested count; and the preference score (rank 1 -> N points ... rank N -> 1 point with N runs, the
paper's 4/3/2/1), skipped and invalid rows left out and reported. Writes human_scores.json, human_scores.md,
human_count.png (Fig. 5) and human_preference.png (Fig. 6).
"""
from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import random
import sys
from pathlib import Path

from evaluate.human_scores import (COUNT_FIELDS, COUNT_WORDS, OBJECTS, count_question, preference_fields,
                                   score_sheets, scores_markdown)
from evaluate.sampler import DEFAULT_SOLVER, SOLVERS
from ifvit.cli import ArgumentParser, entry_point
from ifvit.errors import BadConfig, MissingPath
from ifvit.files import atomic_path, atomic_write_json, atomic_write_text
from ifvit.lock import FolderLock

IMAGES_PER_PAIR = 10
PREFERENCE_CAPTIONS = 100

def count_prompt(obj: str, n: int) -> str:
    """'a bus', 'an apple', 'two buses', 'five people'."""
    if n == 1:
        return f"{'an' if obj[0] in 'aeiou' else 'a'} {obj}"
    return f"{COUNT_WORDS[n]} {OBJECTS[obj]}"


def run_labels(run_dirs: list[str]) -> list[str]:
    """Short unique names: the folder name, with its parent where two runs share one."""
    names = [Path(r).name for r in run_dirs]
    if len(set(names)) < len(names):
        names = [f"{Path(r).parent.name}/{Path(r).name}" for r in run_dirs]
    if len(set(names)) < len(names):
        raise BadConfig(f"runs {run_dirs} do not have distinct names: pass each run once")
    return names


# -- the two sets (which image is which): pure, seeded, recorded in key.json ---------------------------

def count_set(labels: list[str], images_per_pair: int = IMAGES_PER_PAIR, seed: int = 0) -> list[dict]:
    """Every (run, object, count, image seed) once, in a seeded random order; ids number that order."""
    items = [{"run": run, "object": obj, "requested": n, "prompt": count_prompt(obj, n), "seed": seed + i}
             for run in labels for obj in OBJECTS for n in COUNT_WORDS for i in range(images_per_pair)]
    random.Random(seed).shuffle(items)
    for i, item in enumerate(items, start=1):
        item["id"] = i
        item["file"] = f"images/{item['run']}/count/{item['object']}_{item['requested']}_{item['seed']}.png"
    return items


def preference_set(labels: list[str], prompts: list[dict], seed: int = 0) -> list[dict]:
    """One group per prompt ({"caption", "seed", "key"}): the runs in a seeded random order per group."""
    rng = random.Random(seed + 1)
    groups = []
    for i, prompt in enumerate(prompts, start=1):
        order = list(labels)
        rng.shuffle(order)
        groups.append({"id": i, **prompt, "order": order,
                       "files": [f"images/{run}/preference/{i:04d}.png" for run in order]})
    return groups


# -- make: sample the images, write the page and the sheets ---------------------------------------------

def _png_to_jpeg_base64(path: Path) -> str:
    """Embedded images as JPEG: the page stays tens of MB, not hundreds, for ~1,200 images."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.open(path).convert("RGB").save(buffer, format="JPEG", quality=90)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def write_page(out: Path, count_items: list[dict], groups: list[dict], num_runs: int) -> Path:
    """index.html: instructions, the count images, the preference groups; images embedded."""
    def img(file):
        return f'<img src="data:image/jpeg;base64,{_png_to_jpeg_base64(out / file)}" width="192">'

    parts = ["<!doctype html><meta charset='utf-8'><title>Human evaluation</title><style>",
             "body{font-family:sans-serif;max-width:1100px;margin:auto} .card{display:inline-block;margin:6px;"
             "text-align:center;vertical-align:top} .group{border-top:1px solid #ccc;padding:8px 0}</style>",
             "<h1>Human evaluation</h1>",
             "<h2>Part 1: count the objects</h2><p>For each image, write the number of objects asked for in "
             "the <code>count</code> column of <code>count_sheet.csv</code> (0 if there are none).</p>"]
    for item in count_items:
        parts.append(f"<div class='card'><b>#{item['id']}</b> {html.escape(count_question(item['object']))}"
                     f"<br>{img(item['file'])}</div>")
    parts.append(f"<h2>Part 2: rank the images</h2><p>For each caption, rank the {num_runs} images by overall "
                 f"quality and match to the caption: 1 = best. Write the rank of Image 1..{num_runs} in the "
                 "columns image_1.. of <code>preference_sheet.csv</code>, or Y in <code>skipped</code> when "
                 "it is too hard to call.</p>")
    for group in groups:
        cards = "".join(f"<div class='card'>Image {i}<br>{img(f)}</div>" for i, f in enumerate(group["files"], 1))
        parts.append(f"<div class='group'><b>#{group['id']}</b> {html.escape(group['caption'])}<br>{cards}</div>")
    return atomic_write_text(out / "index.html", "\n".join(parts))


def _write_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def write_sheets(out: Path, count_items: list[dict], groups: list[dict], num_runs: int) -> None:
    _write_csv(out / "count_sheet.csv", COUNT_FIELDS,
               [{"id": it["id"], "question": count_question(it["object"]), "count": ""} for it in count_items])
    _write_csv(out / "preference_sheet.csv", preference_fields(num_runs),
               [{"id": g["id"], "caption": g["caption"]} for g in groups])


def generate(run_dir: str, label: str, out: Path, count_items: list[dict], groups: list[dict], *,
             steps: int, scale: float, batch_size: int, device: str, solver: str = DEFAULT_SOLVER,
             shards: str | None = None) -> None:
    """Sample this run's count and preference images into out/images/<label>/ (existing files are kept,
    so an interrupted `make` resumes where it stopped). `shards` replaces the run's recorded shard set."""
    import torch
    from tqdm import tqdm

    from evaluate.images import save_png
    from evaluate.sampler import sample
    from train.run_dir import RunDir

    run = RunDir.open(run_dir, shards=shards)
    model, shards = run.load_model(device=device), run.shard_set()
    null = shards.null_text().to(device)
    codec = shards.image_codec(device)
    # Free text ("three buses") needs the encoder anyway, so the val captions go through it too: the same
    # encoding the shard set stores for them, and no lookup of records by key.
    text_encoder = shards.text_encoder(device)
    jobs = [(item["file"], item["prompt"], item["seed"]) for item in count_items if item["run"] == label]
    jobs += [(group["files"][group["order"].index(label)], group["caption"], group["seed"]) for group in groups]
    jobs = [job for job in jobs if not (out / job[0]).exists()]
    cfg, sampling = model.cfg, run.sampling()
    for start in tqdm(range(0, len(jobs), batch_size), desc=f"human set {label}", unit="batch"):
        chunk = jobs[start:start + batch_size]
        with torch.no_grad():  # the encoder is a plain module: no autograd graph for prompts
            context = text_encoder([caption for _, caption, _ in chunk]).to(device)
        latents = sample(model, context, null, steps=steps, scale=scale, seeds=[seed for *_, seed in chunk],
                         latent_shape=(cfg.in_chans, cfg.img_size, cfg.img_size), solver=solver, **sampling)
        for (file, *_), image in zip(chunk, codec.decode(latents).cpu()):
            save_png(image, out / file)


def make(runs: list[str], out: Path, *, images_per_pair: int = IMAGES_PER_PAIR,
         num_captions: int = PREFERENCE_CAPTIONS, steps: int = 50, scale: float = 3.0, seed: int = 0,
         batch_size: int = 25, device: str = "cpu", solver: str = DEFAULT_SOLVER, shards: str | None = None) -> dict:
    from evaluate.prompts import choose_prompts
    from train.run_dir import RunDir

    labels = run_labels(runs)
    out.mkdir(parents=True, exist_ok=True)
    # All runs rank the same captions: take them from the first run's shard set.
    shard_set = RunDir.open(runs[0], shards=shards).shard_set()
    chosen, problems = choose_prompts(shard_set, "val", num_captions, seed=seed)
    for problem in problems:
        print(f"left out: {problem}")
    prompts = [{"caption": p.prompt, "seed": p.seed, "key": p.key} for p in chosen]
    count_items = count_set(labels, images_per_pair, seed)
    groups = preference_set(labels, prompts, seed)
    key = {"runs": labels, "run_dirs": list(runs), "steps": steps, "solver": solver, "scale": scale, "seed": seed,
           "count": count_items, "preference": groups}
    atomic_write_json(out / "key.json", key)
    for run, label in zip(runs, labels):
        generate(run, label, out, count_items, groups, steps=steps, scale=scale, batch_size=batch_size,
                 device=device, solver=solver, shards=shards)
    write_sheets(out, count_items, groups, len(labels))
    page = write_page(out, count_items, groups, len(labels))
    print(f"\n{len(count_items)} count images and {len(groups)} preference groups of {len(labels)} runs")
    for name in (page, out / "count_sheet.csv", out / "preference_sheet.csv", out / "key.json"):
        print(f"  {name}")
    print("Give raters index.html and the two sheets (not key.json); then run "
          f"`python -m evaluate.human score SHEETS... --key {out / 'key.json'} --out DIR`.")
    return key


@entry_point
def main(argv: list[str]) -> int:
    import torch

    p = ArgumentParser(prog="python -m evaluate.human", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make", help="sample the rating sets and write the page and blank sheets")
    m.add_argument("--runs", nargs="+", required=True, metavar="RUN")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--images-per-pair", type=int, default=IMAGES_PER_PAIR)
    m.add_argument("--captions", type=int, default=PREFERENCE_CAPTIONS, help="preference captions (default 100)")
    m.add_argument("--steps", type=int, default=50)
    m.add_argument("--solver", choices=SOLVERS, default=DEFAULT_SOLVER, help="ODE solver (evaluate.sampler)")
    m.add_argument("--scale", type=float, default=3.0, help="guidance scale, U-ViT convention (paper: 3)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--batch-size", type=int, default=25)
    m.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    m.add_argument("--shards", help="the runs' shard set, if it has moved since training")
    s = sub.add_parser("score", help="score filled sheets")
    s.add_argument("sheets", nargs="+", metavar="SHEET")
    s.add_argument("--key", type=Path, help="key.json of `make` (default: the one beside the first sheet)")
    s.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    if args.command == "make":
        with FolderLock(args.out, "python -m evaluate.human make"):
            make(args.runs, args.out, images_per_pair=args.images_per_pair, num_captions=args.captions,
                 steps=args.steps, scale=args.scale, seed=args.seed, batch_size=args.batch_size,
                 device=args.device, solver=args.solver, shards=args.shards)
        return 0
    key = args.key or Path(args.sheets[0]).parent / "key.json"
    if not key.exists():
        raise MissingPath(f"no key at {key}: pass --key DIR/key.json (written by `evaluate.human make`)")
    with FolderLock(args.out, "python -m evaluate.human score"):
        result = score_sheets(args.sheets, key, args.out)
    print(scores_markdown(result))
    print(f"wrote {args.out / 'human_scores.json'} and plots in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
