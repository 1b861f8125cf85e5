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

`score` reads any number of filled sheets (one per rater; the kind is told by the header) and computes, per
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
import json
import os
import random
from collections import defaultdict
from pathlib import Path

import numpy as np

from evaluate.judge import count_error, match_ratio, plot_count_error
from evaluate.plotting import new_figure, save_figure, write_text
from evaluate.sampler import DEFAULT_SOLVER, SOLVERS

# The paper's four objects: four plural forms and four kinds (human-made, animal, human, fruit).
OBJECTS = {"bus": "buses", "sheep": "sheep", "person": "people", "apple": "apples"}
COUNT_WORDS = {1: "a", 2: "two", 3: "three", 4: "four", 5: "five"}
IMAGES_PER_PAIR = 10
PREFERENCE_CAPTIONS = 100

COUNT_FIELDS = ["id", "question", "count"]
PREFERENCE_IMAGE_FIELD = "image_{}"


def count_prompt(obj: str, n: int) -> str:
    """'a bus', 'an apple', 'two buses', 'five people'."""
    if n == 1:
        return f"{'an' if obj[0] in 'aeiou' else 'a'} {obj}"
    return f"{COUNT_WORDS[n]} {OBJECTS[obj]}"


def count_question(obj: str) -> str:
    return f"How many {OBJECTS[obj]} can you see in the image?"


def preference_fields(num_runs: int) -> list[str]:
    return ["id", "caption", *[PREFERENCE_IMAGE_FIELD.format(i) for i in range(1, num_runs + 1)], "skipped"]


def run_labels(run_dirs: list[str]) -> list[str]:
    """Short unique names: the folder name, with its parent where two runs share one."""
    names = [Path(r).name for r in run_dirs]
    if len(set(names)) < len(names):
        names = [f"{Path(r).parent.name}/{Path(r).name}" for r in run_dirs]
    if len(set(names)) < len(names):
        raise ValueError(f"runs {run_dirs} do not have distinct names: pass each run once")
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


# -- scoring: pure functions on sheet rows and the key --------------------------------------------------

def read_sheets(paths: list[str | Path]) -> tuple[list[dict], list[dict]]:
    """(count rows, preference rows) of all sheets; each row remembers its sheet for the problem list."""
    count_rows, preference_rows = [], []
    for path in paths:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} | {"sheet": str(path)}
                    for row in reader]
        if "count" in header:
            count_rows += rows
        elif PREFERENCE_IMAGE_FIELD.format(1) in header:
            preference_rows += rows
        else:
            raise ValueError(f"{path}: header {header} is neither a count sheet ({', '.join(COUNT_FIELDS)}) nor a "
                             f"preference sheet ({', '.join(preference_fields(4))}): pass the sheets "
                             "written by `evaluate.human make`")
    return count_rows, preference_rows


def score_counts(rows: list[dict], key: dict) -> tuple[dict, list[str]]:
    """Per run: Eq. 9/10 overall, per object, per requested count, per (object, count). Returns (scores,
    problems): a row whose id is unknown or whose count is not a whole number >= 0 is left out, and said."""
    items = {str(item["id"]): item for item in key["count"]}
    pairs = defaultdict(list)  # run -> [(object, requested, counted)]
    problems = []
    for row in rows:
        item = items.get(row.get("id", ""))
        where = f"{row['sheet']}: count id {row.get('id')!r}"
        if item is None:
            problems.append(f"{where}: not in the key (a sheet of another `make`?)")
            continue
        text = row.get("count", "")
        if not text.isdigit():
            problems.append(f"{where}: count {text!r} is not a whole number" if text else f"{where}: left blank")
            continue
        pairs[item["run"]].append((item["object"], item["requested"], int(text)))

    def metrics(triples):
        requested, counted = [r for _, r, _ in triples], [c for _, _, c in triples]
        return {"n": len(triples), "count_error": count_error(requested, counted),
                "match_ratio": match_ratio(requested, counted)}

    scores = {}
    for run in key["runs"]:
        triples = pairs.get(run, [])
        if not triples:
            continue

        def grouped(select):
            groups = defaultdict(list)
            for t in triples:
                groups[select(t)].append(t)
            return groups

        by_count = grouped(lambda t: t[1])
        by_object = grouped(lambda t: t[0])
        by_pair = grouped(lambda t: (t[0], t[1]))
        scores[run] = {
            **metrics(triples),
            "by_count": {str(c): metrics(by_count[c]) for c in sorted(by_count)},
            "by_object": {o: metrics(by_object[o]) for o in OBJECTS if o in by_object},
            "by_pair": {o: {str(c): metrics(by_pair[o, c]) for c in COUNT_WORDS if (o, c) in by_pair}
                        for o in OBJECTS if o in by_object},
        }
    return scores, problems


def rank_points(rank: int, num_runs: int) -> int:
    """The paper's scoring: rank 1 earns num_runs points (4 with four runs) ... rank num_runs earns 1."""
    return num_runs + 1 - rank


def score_preferences(rows: list[dict], key: dict) -> tuple[dict, list[str]]:
    """Per run: mean points and how many ranks it got. Skipped rows are ignored; a row whose ranks are not
    a permutation of 1..N is invalid (left out, and said) -- the paper drops those too."""
    groups = {str(g["id"]): g for g in key["preference"]}
    num_runs = len(key["runs"])
    points = defaultdict(list)
    problems, skipped, valid = [], 0, 0
    for row in rows:
        group = groups.get(row.get("id", ""))
        where = f"{row['sheet']}: preference id {row.get('id')!r}"
        if group is None:
            problems.append(f"{where}: not in the key (a sheet of another `make`?)")
            continue
        if row.get("skipped", "").lower() in ("y", "yes", "1", "true", "x"):
            skipped += 1
            continue
        ranks = [row.get(PREFERENCE_IMAGE_FIELD.format(i), "") for i in range(1, num_runs + 1)]
        if not all(r.isdigit() for r in ranks) or sorted(map(int, ranks)) != list(range(1, num_runs + 1)):
            problems.append(f"{where}: ranks {ranks} are not 1..{num_runs} each once (mark it skipped instead)")
            continue
        valid += 1
        for run, rank in zip(group["order"], map(int, ranks)):
            points[run].append(rank_points(rank, num_runs))
    scores = {run: {"score": float(np.mean(points[run])), "n": len(points[run])}
              for run in key["runs"] if points[run]}
    return {"runs": scores, "valid": valid, "skipped": skipped}, problems


# -- plots (Figs. 5 and 6) ------------------------------------------------------------------------------

def plot_count_by_object(scores: dict, path: Path) -> None:
    """Fig. 5 left: count error against requested count, one panel per object, one line per run."""
    figure = new_figure(3.2 * len(OBJECTS), 3.2)
    axes = figure.subplots(1, len(OBJECTS), sharey=True)
    for ax, obj in zip(axes, OBJECTS):
        for run, s in scores.items():
            pairs = s["by_pair"].get(obj, {})
            counts = [c for c in COUNT_WORDS if str(c) in pairs]
            ax.plot(counts, [pairs[str(c)]["count_error"] for c in counts], marker="o", label=run)
        ax.set(title=obj, xlabel="requested count", xticks=list(COUNT_WORDS))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("average count error (Eq. 9)")
    axes[-1].legend(fontsize="small")
    save_figure(figure, path)


def plot_preferences(scores: dict, path: Path) -> None:
    """Fig. 6: mean preference points per run, with the number of ranks behind each bar."""
    figure = new_figure(1.6 * max(len(scores), 2) + 1.5, 3.4)
    ax = figure.subplots()
    runs = list(scores)
    bars = ax.bar(runs, [scores[r]["score"] for r in runs], color="tab:blue")
    ax.bar_label(bars, [f"{scores[r]['score']:.2f}\n(n={scores[r]['n']})" for r in runs], fontsize=8)
    ax.set(ylabel="preference score (rank 1 = most points)", ylim=(0, len(runs) + 0.8))
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    save_figure(figure, path)


# -- score: sheets -> report ----------------------------------------------------------------------------

def score_sheets(sheets: list[str | Path], key_path: str | Path, out: Path) -> dict:
    key = json.loads(Path(key_path).read_text())
    count_rows, preference_rows = read_sheets(sheets)
    counts, count_problems = score_counts(count_rows, key)
    preferences, preference_problems = score_preferences(preference_rows, key)
    result = {"sheets": [str(s) for s in sheets], "key": str(key_path), "count": counts,
              "preference": preferences, "problems": count_problems + preference_problems}

    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "human_scores.json", json.dumps(result, indent=1))
    if counts:
        plot_count_error(counts, out / "human_count_by_count.png", title="Human count: all objects")
        plot_count_by_object(counts, out / "human_count.png")
    if preferences["runs"]:
        plot_preferences(preferences["runs"], out / "human_preference.png")
    write_text(out / "human_scores.md", scores_markdown(result))
    return result


def scores_markdown(result: dict) -> str:
    lines = ["# Human evaluation", ""]
    if result["count"]:
        lines += ["## Object count (Eq. 9, 10)", "",
                  "| run | images | average count error ↓ | match ratio ↑ | " +
                  " | ".join(f"error: {o}" for o in OBJECTS) + " |",
                  "|---|---|---|---|" + "---|" * len(OBJECTS)]
        for run, s in result["count"].items():
            per_object = [f"{s['by_object'][o]['count_error']:.3f}" if o in s["by_object"] else "–"
                          for o in OBJECTS]
            lines.append(f"| {run} | {s['n']} | {s['count_error']:.3f} | {s['match_ratio']:.3f} | "
                         + " | ".join(per_object) + " |")
        lines += ["", "![count error per object](human_count.png)",
                  "![count error and match ratio per requested count](human_count_by_count.png)", ""]
    prefs = result["preference"]
    if prefs["runs"]:
        lines += ["## Preference (rank 1 → N points)", "",
                  f"{prefs['valid']} ranked groups, {prefs['skipped']} skipped.", "",
                  "| run | ranks | mean points ↑ |", "|---|---|---|"]
        lines += [f"| {run} | {s['n']} | {s['score']:.3f} |" for run, s in prefs["runs"].items()]
        lines += ["", "![preference scores](human_preference.png)", ""]
    if result["problems"]:
        lines += ["## Rows left out", ""] + [f"- {p}" for p in result["problems"]] + [""]
    return "\n".join(lines)


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
    page = out / "index.html"
    write_text(page, "\n".join(parts))
    return page


def _write_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def write_sheets(out: Path, count_items: list[dict], groups: list[dict], num_runs: int) -> None:
    _write_csv(out / "count_sheet.csv", COUNT_FIELDS,
               [{"id": it["id"], "question": count_question(it["object"]), "count": ""} for it in count_items])
    _write_csv(out / "preference_sheet.csv", preference_fields(num_runs),
               [{"id": g["id"], "caption": g["caption"]} for g in groups])


def generate(run_dir: str, label: str, out: Path, count_items: list[dict], groups: list[dict], *,
             steps: int, scale: float, batch_size: int, device: str, solver: str = DEFAULT_SOLVER) -> None:
    """Sample this run's count and preference images into out/images/<label>/ (existing files are kept,
    so an interrupted `make` resumes where it stopped)."""
    import torch
    from PIL import Image
    from tqdm import tqdm

    from evaluate.sampler import sample
    from pipeline.reader import ShardSet
    from train.checkpoint import load_run

    model, config = load_run(run_dir, device=device)
    shards = ShardSet(config["shards"])
    null = shards.null_text().to(device)
    codec = shards.image_codec(device)
    # Free text ("three buses") needs the encoder anyway, so the val captions go through it too: the same
    # encoding the shard set stores for them, and no lookup of records by key.
    text_encoder = shards.text_encoder(device)
    jobs = [(item["file"], item["prompt"], item["seed"]) for item in count_items if item["run"] == label]
    jobs += [(group["files"][group["order"].index(label)], group["caption"], group["seed"]) for group in groups]
    jobs = [job for job in jobs if not (out / job[0]).exists()]
    cfg = model.cfg
    for start in tqdm(range(0, len(jobs), batch_size), desc=f"human set {label}", unit="batch"):
        chunk = jobs[start:start + batch_size]
        with torch.no_grad():  # the encoder is a plain module: no autograd graph for prompts
            context = text_encoder([caption for _, caption, _ in chunk]).to(device)
        latents = sample(model, context, null, steps=steps, scale=scale, seeds=[seed for *_, seed in chunk],
                         latent_shape=(cfg.in_chans, cfg.img_size, cfg.img_size), solver=solver)
        for (file, *_), image in zip(chunk, codec.decode(latents).cpu()):
            path = out / file
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp.png")
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp)
            os.replace(tmp, path)


def make(runs: list[str], out: Path, *, images_per_pair: int = IMAGES_PER_PAIR,
         num_captions: int = PREFERENCE_CAPTIONS, steps: int = 50, scale: float = 3.0, seed: int = 0,
         batch_size: int = 25, device: str = "cpu", solver: str = DEFAULT_SOLVER) -> dict:
    from evaluate.samples import choose_prompts
    from pipeline.reader import ShardSet
    from train.checkpoint import load_run

    labels = run_labels(runs)
    out.mkdir(parents=True, exist_ok=True)
    # All runs rank the same captions: take them from the first run's shard set.
    _, config = load_run(runs[0])
    chosen, problems = choose_prompts(ShardSet(config["shards"]), "val", num_captions, seed=seed)
    for problem in problems:
        print(f"left out: {problem}")
    prompts = [{"caption": p.prompt, "seed": p.seed, "key": p.key} for p in chosen]
    count_items = count_set(labels, images_per_pair, seed)
    groups = preference_set(labels, prompts, seed)
    key = {"runs": labels, "run_dirs": list(runs), "steps": steps, "solver": solver, "scale": scale, "seed": seed,
           "count": count_items, "preference": groups}
    write_text(out / "key.json", json.dumps(key, indent=1))
    for run, label in zip(runs, labels):
        generate(run, label, out, count_items, groups, steps=steps, scale=scale, batch_size=batch_size,
                 device=device, solver=solver)
    write_sheets(out, count_items, groups, len(labels))
    page = write_page(out, count_items, groups, len(labels))
    print(f"\n{len(count_items)} count images and {len(groups)} preference groups of {len(labels)} runs")
    for name in (page, out / "count_sheet.csv", out / "preference_sheet.csv", out / "key.json"):
        print(f"  {name}")
    print("Give raters index.html and the two sheets (not key.json); then run "
          f"`python -m evaluate.human score SHEETS... --key {out / 'key.json'} --out DIR`.")
    return key


def main(argv=None) -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
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
    s = sub.add_parser("score", help="score filled sheets")
    s.add_argument("sheets", nargs="+", metavar="SHEET")
    s.add_argument("--key", type=Path, help="key.json of `make` (default: the one beside the first sheet)")
    s.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    if args.command == "make":
        make(args.runs, args.out, images_per_pair=args.images_per_pair, num_captions=args.captions,
             steps=args.steps, scale=args.scale, seed=args.seed, batch_size=args.batch_size, device=args.device,
             solver=args.solver)
        return
    key = args.key or Path(args.sheets[0]).parent / "key.json"
    if not key.exists():
        raise SystemExit(f"no key at {key}: pass --key DIR/key.json (written by `evaluate.human make`)")
    result = score_sheets(args.sheets, key, args.out)
    print(scores_markdown(result))
    print(f"wrote {args.out / 'human_scores.json'} and plots in {args.out}")


if __name__ == "__main__":
    main()
