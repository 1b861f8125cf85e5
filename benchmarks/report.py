"""campaign.json -> markdown: the summary written after every stage, and one line per stage for the console.

Every number printed here is read from the JSON; a figure a stage did not produce prints as "–".
"""
from __future__ import annotations

from benchmarks.campaign import BY_NAME, STAGES


UNITS = {"images_per_s": "images/s", "captions_per_s": "captions/s", "write_per_s": "PNG writes/s",
         "mb_per_s": "MB/s"}


def fmt(value, spec: str = ".3g", suffix: str = "") -> str:
    if value is None:
        return "–"
    return format(value, spec) + suffix


def minutes(seconds) -> str:
    return "–" if seconds is None else f"{seconds / 60:.1f} min"


def ok_items(entry: dict) -> dict:
    return {k: v for k, v in entry.get("items", {}).items() if v.get("status") == "ok"}


def table(head: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(map(str, r)) + " |"
                                                                        for r in rows]


# ----------------------------------------------------------------------------------------- headlines

def headline(name: str, entry: dict) -> str:
    """The stage's main figures in one line (empty when it produced none)."""
    items = ok_items(entry)
    if name == "tests":
        c = entry.get("counts") or {}
        return ", ".join(f"{c[k]} {k}" for k in ("passed", "failed", "error", "skipped") if c.get(k))
    if name == "train":
        ec = train_rows(entry).get("early_concat")
        parts = [f"early_concat {ec['steps_per_s']:.2f} steps/s {ec['mode']}" +
                 (f", MFU {ec['mfu']:.0%}" if ec.get("mfu") else "")] if ec else []
        mode, speedup = train_speedup(entry)
        if speedup:
            parts.append(f"if_xattn/early_concat {speedup:.2f}x {mode} (paper "
                         f"{entry['settings']['paper_speedup_if_xattn']:.2f}x)")
        return "; ".join(parts)
    if name == "eval" and entry.get("fid30k"):
        return f"FID-30K projected {minutes(entry['fid30k']['total_s'])} (goal {minutes(entry['fid30k']['goal_s'])})"
    if name == "encode" and entry.get("coco2014"):
        c = entry["coco2014"]
        return f"COCO 2014 encode projected {minutes(c['total_s'])}, bound by {c['bound_by']} (goal {minutes(c['goal_s'])})"
    if name == "science":
        judged = [(v[len("judge_"):], i.get("val") or {}) for v, i in items.items() if v.startswith("judge_")]
        return "; ".join(f"{v} count match {fmt(j.get('match_ratio'), '.0%')}, exact {fmt(j.get('exact_accuracy'), '.0%')}"
                         for v, j in judged)
    return ""


def stage_line(name: str, entry: dict) -> str:
    failed = [k for k, v in entry.get("items", {}).items() if v.get("status") == "failed"]
    line = f"   {entry['status']} in {entry['seconds']:.0f} s"
    if entry.get("error"):
        line += f" ({entry['error'][:200]})"
    if failed:
        line += f"; failed: {', '.join(failed)}"
    text = headline(name, entry)
    return line + (f": {text}" if text else "")


# ----------------------------------------------------------------------------------------- sections

def tests_section(entry: dict) -> list[str]:
    rows = [[name, t["outcome"], fmt(t.get("seconds"), ".1f"), (t.get("message") or "")[:120].replace("|", "/")]
            for name, t in (entry.get("tests") or {}).items()]
    return table(["test", "outcome", "s", "note"], rows) if rows else []


def train_rows(entry: dict) -> dict[str, dict]:
    """{variant: its compiled row where that was measured, else its eager one, + "mode" and "eager_steps_per_s"}."""
    items, rows = ok_items(entry), {}
    for key, r in items.items():
        variant, _, mode = key.partition("/")
        if mode not in ("eager", "compiled") or (mode == "eager" and f"{variant}/compiled" in items):
            continue
        rows[variant] = {**r, "mode": mode if r.get("compiled") or mode == "eager" else "eager (compile failed)",
                         "eager_steps_per_s": (items.get(f"{variant}/eager") or {}).get("steps_per_s")}
    return rows


def train_speedup(entry: dict) -> tuple[str, float | None]:
    """if_xattn / early_concat steps/s: compiled where both were, else eager."""
    for mode in ("compiled", "eager"):
        if entry.get(f"speedup_if_xattn_{mode}"):
            return mode, entry[f"speedup_if_xattn_{mode}"]
    return "", None


def train_section(entry: dict) -> list[str]:
    s = entry.get("settings") or {}
    lines = [f"{s.get('model', '')}, batch {s.get('batch')}, {s.get('precision')}; every row eager "
             f"({(s.get('eager') or {}).get('steps')} timed steps), then compiled in this order while the budget "
             f"lasts. MFU: true FLOPs x 3 per sample against the bf16 peak ({fmt(s.get('peak_tflops_bf16'), '.0f')} "
             f"TFLOP/s) and against the matmul rate measured here ({fmt(entry.get('matmul_tflops'), '.0f')} TFLOP/s).",
             ""]
    merged = train_rows(entry)
    rows = []
    for variant in dict.fromkeys(k.partition("/")[0] for k in entry.get("items", {}) if "/" in k):
        r = merged.get(variant)
        if r is None:
            bad = [v for k, v in entry["items"].items() if k.startswith(variant + "/")][0]
            rows.append([variant, "–", bad.get("status"), *["–"] * 9, (bad.get("reason") or bad.get("error") or "")[:90]])
            continue
        kernel = (r.get("attention_kernels") or [{}])[0].get("kernel", "–")[:40]
        rows.append([variant, fmt(r.get("eager_steps_per_s"), ".2f"),
                     fmt(r["steps_per_s"], ".2f") if r["mode"] == "compiled" else "–",
                     fmt(r["samples_per_s"], ".0f"), fmt(r["tflops"], ".1f"), fmt(r.get("mfu"), ".1%"),
                     fmt(r.get("tflops_share_of_matmul"), ".1%"), fmt(r.get("peak_mem_gib"), ".1f"),
                     fmt(r.get("warmup_s"), ".0f") if r["mode"] == "compiled" else "–",
                     fmt(r.get("ratio_to_early_concat"), ".2f"), fmt(r.get("paper_ratio_to_early_concat"), ".2f"),
                     kernel, r.get("compile_error", "")[:90]])
    lines += table(["variant", "eager steps/s", "compiled steps/s", "images/s", "TFLOP/s", "MFU", "of matmul",
                    "peak GiB", "compile s", "ratio", "paper ratio", "attention kernel", "note"], rows)
    lines += ["", "images/s onwards: the compiled row where there is one, else the eager one; ratio = steps/s over "
                  "early_concat's in the same mode; paper = RTX 4090 it/s (Table 1)."]
    mode, speedup = train_speedup(entry)
    if speedup:
        lines += ["", f"if_xattn / early_concat ({mode}): **{speedup:.2f}x** (paper, RTX 4090: "
                      f"{s.get('paper_speedup_if_xattn', 0):.2f}x)."]
    return lines


def rates_section(entry: dict, keys: tuple[str, ...]) -> list[str]:
    rows = []
    for name, r in entry.get("items", {}).items():
        if r.get("status") != "ok":
            rows.append([name, r.get("status"), "–", (r.get("error") or r.get("reason") or "")[:100]])
            continue
        rate = next((f"{r[k]:.1f} {UNITS.get(k, k)}" for k in keys if r.get(k) is not None), "–")
        extra = ", ".join(f"{k} {r[k]}" for k in ("batch", "steps", "resolution") if k in r)
        rows.append([name, "ok", rate, extra])
    return table(["measurement", "status", "rate", "at"], rows)


def projection(title: str, p: dict | None) -> list[str]:
    if not p:
        return ["", f"{title}: not projected (a measurement it needs is missing)."]
    parts = ", ".join(f"{k} {minutes(v)}" for k, v in p["parts_s"].items())
    extra = f"; with --compile {minutes(p['total_s_compiled'])}" if p.get("total_s_compiled") else ""
    return ["", f"{title}: **{minutes(p['total_s'])}** (goal {minutes(p['goal_s'])}){extra}. Parts: {parts}."
            + (f" {p['note']}." if p.get("note") else "")]


def science_section(entry: dict) -> list[str]:
    items = ok_items(entry)
    shards = items.get("shards") or {}
    lines = [f"Shard set: {shards.get('records', '–')} records {shards.get('splits', '')}, built in "
             f"{fmt(shards.get('seconds'), '.0f')} s by the local executor. Training for "
             f"{fmt(entry.get('train_seconds_each'), '.0f')} s each after the first log line.", ""]
    variants = [v for v in ("early_concat", "if_concat") if f"train_{v}" in items]
    rows = []
    for key, label, spec in (("steps", "steps", "d"), ("steps_per_s", "steps/s", ".2f"), ("loss_last", "loss (last)", ".4f")):
        rows.append([label, *(fmt(items[f"train_{v}"].get(key), spec) for v in variants)])
    for split in ("val", "holdout"):
        for key, label, spec in (("match_ratio", "count match", ".1%"), ("count_error", "count error", ".3f"),
                                 ("color_accuracy", "colour", ".1%"), ("shape_accuracy", "shape", ".1%"),
                                 ("relation_accuracy", "relation", ".1%"), ("exact_accuracy", "exact scene", ".1%")):
            rows.append([f"{split}: {label}", *(fmt((items.get(f"judge_{v}", {}).get(split) or {}).get(key), spec)
                                                for v in variants)])
    lines += table(["", *variants], rows) if variants else ["no training finished"]
    files = (items.get("figures") or {}).get("files") or []
    if files:
        lines += ["", "Figures: " + ", ".join(files) + " (same prompts and seeds in both grids)."]
    return lines


def campaign_markdown(summary: dict, brief: bool = False) -> str:
    m, stages = summary["machine"], summary["stages"]
    device = m.get("gpu") or f"CPU, {m.get('cpu_cores')} cores"
    lines = [f"# GPU campaign on {device}, {summary['started'][:10]}" + (" (smoke: toy sizes)" if summary["mode"] == "smoke" else ""),
             "", f"torch {m.get('torch')} (CUDA {m.get('cuda')}), python {m.get('python')}; budget "
             f"{fmt(summary.get('budget_s'), '.0f')} s, elapsed {fmt(summary.get('elapsed_s'), '.0f')} s"
             + ("" if summary.get("finished") else " (not finished)") + "."
             + (f" Stages re-run: {', '.join(', '.join(r['stages']) for r in summary['reruns'])}." if summary.get("reruns") else ""),
             ""]
    rows = [[f"{i}. {s.title}", stages[s.name]["status"], fmt(stages[s.name].get("seconds"), ".0f"),
             fmt(stages[s.name].get("budget_s"), ".0f"), headline(s.name, stages[s.name]) or
             (stages[s.name].get("error") or "")[:120]]
            for i, s in enumerate(STAGES, 1) if s.name in stages]
    lines += table(["stage", "status", "s", "budget s", "headline"], rows)
    if summary["mode"] == "smoke":
        lines += ["", "Smoke run: toy models on a CPU. The figures only prove that every code path runs; they "
                      "measure nothing and project nothing."]
    if brief:
        return "\n".join(lines)
    sections = {"tests": tests_section, "train": train_section,
                "eval": lambda e: rates_section(e, ("images_per_s", "write_per_s")) + projection("FID-30K, projected", e.get("fid30k")),
                "encode": lambda e: rates_section(e, ("images_per_s", "captions_per_s", "mb_per_s")) + projection(
                    "MS-COCO 2014 encode, projected", e.get("coco2014")),
                "science": science_section}
    for i, s in enumerate(STAGES, 1):
        if s.name in summary["stages"]:
            entry = summary["stages"][s.name]
            lines += ["", f"## {i}. {BY_NAME[s.name].title}", ""]
            if entry.get("error"):
                lines += [f"**{entry['status']}**: {entry['error']}", ""]
            lines += sections[s.name](entry)
    return "\n".join(lines) + "\n"
