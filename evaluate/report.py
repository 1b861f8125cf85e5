"""One-screen summary of an evaluation's metrics.json (printed at the end of `python -m evaluate`).

    python -m evaluate.report runs/NAME        # print it again later
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _num(value, fmt: str = ".3f", missing: str = "-") -> str:
    return missing if value is None else format(value, fmt)


def summary(m: dict) -> str:
    lines = [f"evaluation of {m['run']}  ({m['variant']}, checkpoint step {m['step']:,}, EMA weights)"]
    if m.get("preset_note"):
        lines.append(f"  note         {m['preset_note']}")
    solver = m.get("solver", "dpmpp2m")  # metrics.json written before the choice existed: diffusers' solver
    lines.append(f"  samples      {m['num_samples']:,} {m['split']} prompts, {m['steps']} steps of the {solver} "
                 f"solver, scale s={m['scale']:g} (guidance_scale {m['guidance_scale']:g}), seed {m['seed']}")
    s = m["sampling"]
    lines.append(f"  sampling     {_num(s.get('images_per_s'), '.2f')} images/s with guidance (sampling + decoding, "
                 f"{s.get('device', '?')}, batch {s.get('batch_size', '?')})")
    lines.append(f"  model        {m['params']:,} params; {m['gflops_true']:.3g} GFLOPs true, "
                 f"{m['gflops_paper']:.3g} paper convention (one forward, batch 1)")
    lines.append(f"  FID          {_num(m['fid'], '.2f')} against {m.get('fid_reference', '?')} "
                 f"[{m.get('fid_features', 'inception-v3-compat')} features]" if m["fid"] is not None
                 else f"  FID          skipped: {m.get('fid_skipped', '')}")
    if m.get("fid_reference_warning"):
        lines.append(f"  warning      {m['fid_reference_warning']}")
    clip = m.get("clip_score")
    lines.append(f"  CLIP score   CLIP-S {clip['clip_s']:.3f} (2.5*max(cos,0)), 100*cos {clip['cos100']:.2f}  "
                 f"[{m.get('clip_model')}]" if clip else f"  CLIP score   skipped: {m.get('clip_skipped', '')}")
    shapes = m.get("shapes")
    if shapes:
        splits = [s for s in ("val", "holdout") if shapes.get(s)]
        lines.append(f"  {'shapes judge':<25}" + "".join(f"{s:>12}" for s in splits))
        rows = [("exact scene", "exact_accuracy"), ("count match (Eq. 10)", "match_ratio"),
                ("count error (Eq. 9)", "count_error"), ("colour", "color_accuracy"),
                ("shape", "shape_accuracy"), ("relation", "relation_accuracy")]
        for label, key in rows:
            lines.append(f"    {label:<23}" + "".join(f"{_num(shapes[s].get(key)):>12}" for s in splits))
    for name, rows, key in (("by scale", m.get("by_scale"), "scale"), ("by step", m.get("by_step"), "step")):
        for row in rows or []:
            lines.append(f"  {name:<12} {key} {row[key]:<7g} FID {_num(row['fid'], '.2f'):>7}  "
                         f"CLIP-S {_num(row['clip_s']):>6}  exact {_num(row['shapes_exact']):>6}  "
                         f"count match {_num(row['shapes_match_ratio']):>6}")
    if m.get("problems"):
        lines.append(f"  problems     {len(m['problems'])} input(s) left out, first: {m['problems'][0]}")
    lines.append(f"  sample grid  {m['grid']}")
    lines.append(f"  metrics      {Path(m['run']) / 'eval' / 'metrics.json'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m evaluate.report RUN_DIR", file=sys.stderr)
        return 2
    path = Path(argv[0]) / "eval" / "metrics.json"
    if not path.is_file():
        print(f"no {path}: evaluate the run first (python -m evaluate --run {argv[0]})", file=sys.stderr)
        return 1
    print(summary(json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
