"""Human evaluation, the scoring side: the sheet format `evaluate.human make` writes, and what
`evaluate.human score` computes from filled sheets (paper Figs. 5 and 6; the CLI is evaluate/human.py).

Per run: the average count error and match ratio (Eq. 9, 10, the functions of evaluate/judge.py), also per
object and per requested count; and the preference score (rank 1 -> N points ... rank N -> 1 point with N
runs, the paper's 4/3/2/1), skipped and invalid rows left out and reported.
"""
from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from evaluate.judge import count_error, match_ratio, plot_count_error
from evaluate.plotting import new_figure, save_figure
from ifvit.errors import BadConfig
from ifvit.files import atomic_write_json, atomic_write_text

# The paper's four objects: four plural forms and four kinds (human-made, animal, human, fruit).
OBJECTS = {"bus": "buses", "sheep": "sheep", "person": "people", "apple": "apples"}
COUNT_WORDS = {1: "a", 2: "two", 3: "three", 4: "four", 5: "five"}
IMAGES_PER_PAIR = 10
PREFERENCE_CAPTIONS = 100

COUNT_FIELDS = ["id", "question", "count"]
PREFERENCE_IMAGE_FIELD = "image_{}"


def count_question(obj: str) -> str:
    return f"How many {OBJECTS[obj]} can you see in the image?"


def preference_fields(num_runs: int) -> list[str]:
    return ["id", "caption", *[PREFERENCE_IMAGE_FIELD.format(i) for i in range(1, num_runs + 1)], "skipped"]


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
            raise BadConfig(f"{path}: header {header} is neither a count sheet ({', '.join(COUNT_FIELDS)}) nor a "
                             f"preference sheet ({', '.join(preference_fields(4))}): pass the sheets "
                             "written by `evaluate.human make`")
    return count_rows, preference_rows


def _in_key(rows: list[dict], entries: list[dict], kind: str, problems: list[str]):
    """(row, its entry in the key, where) for every sheet row whose id the key knows; the others are said."""
    by_id = {str(entry["id"]): entry for entry in entries}
    for row in rows:
        entry = by_id.get(row.get("id", ""))
        where = f"{row['sheet']}: {kind} id {row.get('id')!r}"
        if entry is None:
            problems.append(f"{where}: not in the key (a sheet of another `make`?)")
            continue
        yield row, entry, where


def score_counts(rows: list[dict], key: dict) -> tuple[dict, list[str]]:
    """Per run: Eq. 9/10 overall, per object, per requested count, per (object, count). Returns (scores,
    problems): a row whose id is unknown or whose count is not a whole number >= 0 is left out, and said."""
    pairs = defaultdict(list)  # run -> [(object, requested, counted)]
    problems = []
    for row, item, where in _in_key(rows, key["count"], "count", problems):
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
    num_runs = len(key["runs"])
    points = defaultdict(list)
    problems, skipped, valid = [], 0, 0
    for row, group, where in _in_key(rows, key["preference"], "preference", problems):
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
    atomic_write_json(out / "human_scores.json", result)
    if counts:
        plot_count_error(counts, out / "human_count_by_count.png", title="Human count: all objects")
        plot_count_by_object(counts, out / "human_count.png")
    if preferences["runs"]:
        plot_preferences(preferences["runs"], out / "human_preference.png")
    atomic_write_text(out / "human_scores.md", scores_markdown(result))
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
