"""Human evaluation: the rating sets, the page and sheets, and the scorer on hand-filled sheets."""
import csv
import json

import numpy as np
import pytest
from PIL import Image

from evaluate import human, human_scores

RUNS = ["early_concat", "early_xattn", "if_concat", "if_xattn"]


def write_csv(path, fields, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def hand_key():
    """Six count images and four preference groups with known answers."""
    count = [
        {"id": 1, "run": "early_concat", "object": "bus", "requested": 1},
        {"id": 2, "run": "early_concat", "object": "bus", "requested": 3},
        {"id": 3, "run": "if_concat", "object": "apple", "requested": 1},
        {"id": 4, "run": "if_concat", "object": "apple", "requested": 2},
        {"id": 5, "run": "if_concat", "object": "sheep", "requested": 5},  # left blank by the rater
        {"id": 6, "run": "early_concat", "object": "person", "requested": 2},  # answered "many"
    ]
    preference = [
        {"id": 1, "caption": "a", "order": ["early_xattn", "early_concat", "if_xattn", "if_concat"]},
        {"id": 2, "caption": "b", "order": ["early_concat", "early_xattn", "if_concat", "if_xattn"]},
        {"id": 3, "caption": "c", "order": RUNS},  # skipped
        {"id": 4, "caption": "d", "order": RUNS},  # invalid: rank 1 twice
    ]
    return {"runs": RUNS, "count": count, "preference": preference}


def hand_sheets(tmp_path):
    counts = write_csv(tmp_path / "count_sheet.csv", human_scores.COUNT_FIELDS, [
        {"id": 1, "question": "q", "count": 1}, {"id": 2, "question": "q", "count": 2},
        {"id": 3, "question": "q", "count": 3}, {"id": 4, "question": "q", "count": 2},
        {"id": 5, "question": "q", "count": ""}, {"id": 6, "question": "q", "count": "many"},
    ])
    prefs = write_csv(tmp_path / "preference_sheet.csv", human_scores.preference_fields(4), [
        {"id": 1, "caption": "a", "image_1": 1, "image_2": 2, "image_3": 3, "image_4": 4, "skipped": "N"},
        {"id": 2, "caption": "b", "image_1": 4, "image_2": 3, "image_3": 2, "image_4": 1, "skipped": ""},
        {"id": 3, "caption": "c", "skipped": "Y"},
        {"id": 4, "caption": "d", "image_1": 1, "image_2": 1, "image_3": 2, "image_4": 3, "skipped": "N"},
    ])
    (tmp_path / "key.json").write_text(json.dumps(hand_key()))
    return counts, prefs


def test_count_scores_reproduce_eq_9_and_10_by_hand(tmp_path):
    counts, _ = hand_sheets(tmp_path)
    rows, _ = human_scores.read_sheets([counts])
    scores, problems = human_scores.score_counts(rows, hand_key())
    # early_concat: (1 asked, 1 seen), (3, 2) -> errors 0, 1; matches 1, 0.  id 6 ("many") is left out.
    assert scores["early_concat"]["count_error"] == pytest.approx(0.5)
    assert scores["early_concat"]["match_ratio"] == pytest.approx(0.5)
    assert scores["early_concat"]["n"] == 2
    # if_concat: (1, 3), (2, 2) -> errors 2, 0; matches 0, 1.  id 5 (blank) is left out.
    assert scores["if_concat"]["count_error"] == pytest.approx(1.0)
    assert scores["if_concat"]["match_ratio"] == pytest.approx(0.5)
    assert scores["if_concat"]["by_pair"]["apple"]["1"] == {"n": 1, "count_error": 2.0, "match_ratio": 0.0}
    assert scores["if_concat"]["by_count"]["2"]["count_error"] == 0.0
    assert scores["early_concat"]["by_object"]["bus"]["count_error"] == pytest.approx(0.5)
    assert set(scores) == {"early_concat", "if_concat"}  # runs with no rated image are absent, not zero
    assert len(problems) == 2 and any("blank" in p for p in problems) and any("many" in p for p in problems)


def test_preference_points_rank_one_earns_four(tmp_path):
    _, prefs = hand_sheets(tmp_path)
    _, rows = human_scores.read_sheets([prefs])
    result, problems = human_scores.score_preferences(rows, hand_key())
    # Group 1 ranks 1..4 in shown order: early_xattn 4, early_concat 3, if_xattn 2, if_concat 1.
    # Group 2 ranks 4..1: early_concat 1, early_xattn 2, if_concat 3, if_xattn 4.
    expected = {"early_concat": 2.0, "early_xattn": 3.0, "if_concat": 2.0, "if_xattn": 3.0}
    assert {run: s["score"] for run, s in result["runs"].items()} == expected
    assert all(s["n"] == 2 for s in result["runs"].values())
    assert (result["valid"], result["skipped"]) == (2, 1)
    assert len(problems) == 1 and "'4'" in problems[0]
    assert [human_scores.rank_points(r, 4) for r in (1, 2, 3, 4)] == [4, 3, 2, 1]


def test_score_cli_writes_report_and_plots(tmp_path):
    counts, prefs = hand_sheets(tmp_path)
    out = tmp_path / "scores"
    human.main(["score", str(counts), str(prefs), "--out", str(out)])
    result = json.loads((out / "human_scores.json").read_text())
    assert result["count"]["if_concat"]["count_error"] == pytest.approx(1.0)
    assert result["preference"]["runs"]["if_xattn"]["score"] == pytest.approx(3.0)
    for name in ("human_count.png", "human_count_by_count.png", "human_preference.png"):
        assert Image.open(out / name).size[0] > 100
    report = (out / "human_scores.md").read_text()
    assert "| if_concat | 2 | 1.000 | 0.500 |" in report
    assert "| if_xattn | 2 | 3.000 |" in report


def test_unknown_sheet_and_missing_key_name_the_fix(tmp_path, capsys):
    bad = write_csv(tmp_path / "other.csv", ["a", "b"], [{"a": 1, "b": 2}])
    with pytest.raises(ValueError, match="evaluate.human make"):
        human_scores.read_sheets([bad])
    assert human.main(["score", str(bad), "--out", str(tmp_path)]) == 2  # a user error: one line, status 2
    assert "--key" in capsys.readouterr().err


def test_rating_sets_same_seeds_for_every_run_shuffled_and_recorded():
    items = human.count_set(RUNS)
    assert len(items) == 4 * 4 * 5 * human.IMAGES_PER_PAIR
    assert sorted(i["id"] for i in items) == list(range(1, len(items) + 1))
    per_run = {run: sorted((i["prompt"], i["seed"]) for i in items if i["run"] == run) for run in RUNS}
    assert all(v == per_run[RUNS[0]] for v in per_run.values())  # same prompts and seeds for every run
    assert [i["run"] for i in items[:8]] != [RUNS[0]] * 8  # shuffled over runs
    assert {i["prompt"] for i in items} >= {"a bus", "an apple", "two sheep", "five people", "three buses"}
    assert len({i["file"] for i in items}) == len(items)

    groups = human.preference_set(RUNS, [{"caption": f"c{i}", "seed": i} for i in range(20)])
    assert all(sorted(g["order"]) == sorted(RUNS) for g in groups)
    assert len({tuple(g["order"]) for g in groups}) > 1  # order randomised per group
    assert human.preference_set(RUNS, [{"caption": "c0", "seed": 0}]) == groups[:1]  # and seeded


def test_page_and_sheets_round_trip_through_the_scorer(tmp_path):
    """Blank sheets from the writer, filled by a 'rater' who always counts right and always prefers
    if_xattn: the scorer must give error 0, match 1, and if_xattn 4 points."""
    labels = RUNS[:2] + ["if_xattn"]
    items = human.count_set(labels, images_per_pair=1)
    groups = human.preference_set(labels, [{"caption": f"caption {i}", "seed": i} for i in range(3)])
    for file in [i["file"] for i in items] + [f for g in groups for f in g["files"]]:
        (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(tmp_path / file)
    human.write_sheets(tmp_path, items, groups, len(labels))
    page = human.write_page(tmp_path, items, groups, len(labels)).read_text()
    assert page.count("data:image/jpeg;base64,") == len(items) + 3 * len(labels)
    assert "How many buses can you see" in page and "caption 2" in page

    key = {"runs": labels, "count": items, "preference": groups}
    truth = {str(i["id"]): i["requested"] for i in items}
    with open(tmp_path / "count_sheet.csv") as f:
        rows = [dict(r, count=truth[r["id"]]) for r in csv.DictReader(f)]
    write_csv(tmp_path / "count_sheet.csv", human_scores.COUNT_FIELDS, rows)
    with open(tmp_path / "preference_sheet.csv") as f:
        rows = list(csv.DictReader(f))
    for row, group in zip(rows, groups):
        others = iter(range(2, len(labels) + 1))
        for i, run in enumerate(group["order"], start=1):
            row[f"image_{i}"] = 1 if run == "if_xattn" else next(others)
    write_csv(tmp_path / "preference_sheet.csv", human_scores.preference_fields(len(labels)), rows)

    counted, preferred = human_scores.read_sheets([tmp_path / "count_sheet.csv", tmp_path / "preference_sheet.csv"])
    counts, problems = human_scores.score_counts(counted, key)
    assert not problems
    assert all(s["count_error"] == 0.0 and s["match_ratio"] == 1.0 and s["n"] == 20 for s in counts.values())
    prefs, problems = human_scores.score_preferences(preferred, key)
    assert not problems and prefs["runs"]["if_xattn"] == {"score": 3.0, "n": 3}


@pytest.fixture(scope="module")
def runs(shapes_shards, tmp_path_factory):
    from tiny_runs import tiny_runs

    return tiny_runs(shapes_shards, tmp_path_factory.getbasetemp() / "tiny_runs")


@pytest.mark.slow
def test_make_on_two_tiny_runs(runs, tmp_path):
    from tiny_runs import one_thread

    out = tmp_path / "human"
    with one_thread():
        human.main(["make", "--runs", str(runs["early_concat"]), str(runs["if_concat"]), "--out", str(out),
                    "--images-per-pair", "1", "--captions", "2", "--steps", "2"])
    key = json.loads((out / "key.json").read_text())
    assert key["runs"] == ["early_concat", "if_concat"]
    assert len(key["count"]) == 2 * 20 and len(key["preference"]) == 2
    files = [i["file"] for i in key["count"]] + [f for g in key["preference"] for f in g["files"]]
    for file in files:
        with Image.open(out / file) as image:
            assert image.size == (32, 32)
    with open(out / "count_sheet.csv") as f:
        assert len(list(csv.DictReader(f))) == 40
    with open(out / "preference_sheet.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["caption"] for r in rows] == [g["caption"] for g in key["preference"]]
    page = (out / "index.html").read_text()
    assert page.count("data:image/jpeg;base64,") == len(files)
