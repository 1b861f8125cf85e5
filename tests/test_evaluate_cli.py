"""`python -m evaluate` end to end on a tiny run of the shapes fixture, with tiny FID and CLIP stand-ins."""
import json

import numpy as np
import pytest
import torch

from evaluate.__main__ import main as evaluate_main
from evaluate.report import summary
from evaluate.sample import main as sample_main
from evaluate.sampler import sample
from evaluate.samples import choose_prompts, load_image, read_index
from evaluate_helpers import register_tiny_fid, write_tiny_clip
from pipeline.reader import ShardSet
from train.checkpoint import load_run, save_checkpoint
from train.model import UViT, count_params, variant_config

CONTRACT_KEYS = {"run", "variant", "step", "num_samples", "steps", "scale", "guidance_scale", "seed", "fid",
                 "clip_score", "sampling", "shapes", "params", "gflops_true", "gflops_paper", "by_scale", "by_step"}


def make_run(shards, run_dir, variant="if_concat", steps=(1, 2)):
    """A run directory per CONTRACTS §4 with random weights at each step: what `evaluate` reads of a run."""
    ss = ShardSet(shards)
    cfg = variant_config(variant, in_chans=ss.latent_channels, img_size=ss.latent_size, patch_size=4, width=32,
                         depth=5, heads=2, n_image=1, text_len=ss.text_len, text_dim=ss.text_dim)
    config = {"variant": variant, "model": cfg.to_dict(), "train": {"preset": "test"}, "shards": str(shards)}
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(config))
    for step in steps:
        torch.manual_seed(step)
        weights = UViT(cfg).state_dict()
        save_checkpoint(run_dir, {"model": weights, "ema": weights, "step": step, "config": config})
    return run_dir


@pytest.fixture(scope="module")
def evaluated(shapes_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    run = make_run(shapes_shards, root / "run")
    args = ["--run", str(run), "--num-samples", "6", "--steps", "3", "--batch-size", "4", "--seed", "7",
            "--clip", write_tiny_clip(root / "clip"), "--fid-features", register_tiny_fid(),
            "--scales", "0,1", "--checkpoints", "all"]
    assert evaluate_main(args) == 0
    return run, args


def test_metrics_json_has_the_contracted_keys(evaluated):
    run, _ = evaluated
    m = json.loads((run / "eval" / "metrics.json").read_text())
    assert CONTRACT_KEYS <= set(m)
    assert (m["variant"], m["step"], m["num_samples"], m["steps"], m["scale"], m["guidance_scale"], m["seed"]) == \
        ("if_concat", 2, 6, 3, 1.0, 2.0, 7)
    assert m["solver"] == "uvit" and m["sampler"].startswith("U-ViT's DPM-Solver++")  # the default
    assert isinstance(m["fid"], float) and m["fid"] >= 0
    assert set(m["clip_score"]) == {"clip_s", "cos100"}
    assert m["sampling"]["images_per_s"] > 0 and m["sampling"]["seconds"] > 0
    assert m["params"] == count_params(load_run(run)[0]) and 0 < m["gflops_paper"] < m["gflops_true"]
    # shapes: the judge on val and on the hold-out (unseen colour-shape pairs) split.
    assert set(m["shapes"]) == {"val", "holdout"}
    for split in ("val", "holdout"):
        assert m["shapes"][split]["num_images"] == 6 and 0 <= m["shapes"][split]["exact_accuracy"] <= 1
        assert "by_count" in m["shapes"][split]
    # Guidance sweep at the newest checkpoint, training curve at the main scale.
    assert [(r["scale"], r["step"]) for r in m["by_scale"]] == [(0.0, 2), (1.0, 2)]
    assert [(r["step"], r["scale"]) for r in m["by_step"]] == [(1, 1.0), (2, 1.0)]
    for row in m["by_scale"] + m["by_step"]:
        assert {"fid", "clip_s", "cos100", "shapes_exact"} <= set(row) and row["fid"] is not None
    # The main setting appears in both tables with the same numbers.
    assert m["by_scale"][1]["fid"] == m["by_step"][1]["fid"] == m["fid"]
    assert m["by_scale"][0]["fid"] != m["fid"]
    for name in ("grid.png", "count_error.png"):
        assert (run / "eval" / name).stat().st_size > 0
    assert "sample grid" in summary(m) and str(run / "eval" / "grid.png") in summary(m)


def test_each_sample_is_its_stored_prompt_and_seed(evaluated, shapes_shards):
    run, _ = evaluated
    entries = read_index(run / "eval" / "samples")
    assert [e["file"] for e in entries] == [f"{i:05d}.png" for i in range(6)]
    prompts, _ = choose_prompts(ShardSet(shapes_shards), "val", 6, seed=7)
    assert [(e["key"], e["prompt"], e["seed"]) for e in entries] == [(p.key, p.prompt, p.seed) for p in prompts]
    assert len({e["key"] for e in entries}) == 6  # distinct images
    # Regenerate sample 4 alone (a different batch position) from its stored seed: the same picture.
    model, _ = load_run(run)
    ss = ShardSet(shapes_shards)
    latents = sample(model, torch.from_numpy(prompts[4].text[None]).float(), ss.null_text(), steps=3, scale=1.0,
                     seeds=[entries[4]["seed"]])
    again = ss.image_codec().decode(latents)[0]
    stored = load_image(run / "eval" / "samples" / entries[4]["file"])
    assert (again.int() - stored.int()).abs().max() <= 1


def test_prompt_choice_is_seeded_distinct_and_extends(shapes_shards):
    ss = ShardSet(shapes_shards)
    six, problems = choose_prompts(ss, "val", 6, seed=7)
    assert problems == [] and [p.key for p in choose_prompts(ss, "val", 3, seed=7)[0]] == [p.key for p in six[:3]]
    assert [p.key for p in choose_prompts(ss, "val", 6, seed=8)[0]] != [p.key for p in six]
    records = {r["key"]: r for r in ss.records("val")}
    for p in six:
        record = records[p.key]
        assert p.prompt == record["json"]["captions"][p.caption_index]
        assert np.array_equal(p.text, record["text"][p.caption_index]) and p.scene == record["json"]["scene"]
    assert len(choose_prompts(ss, "val", 10_000)[0]) == ss.num_records("val")  # never more than the split


def test_resume_keeps_finished_samples_and_redoes_missing_ones(evaluated):
    run, args = evaluated
    samples = run / "eval" / "samples"
    before = {p.name: p.stat().st_mtime_ns for p in samples.glob("*.png")}
    first = json.loads((run / "eval" / "metrics.json").read_text())
    (samples / "00005.png").unlink()  # as if the job had been killed before the last image
    main_only = [a for a in args if a not in ("--scales", "0,1", "--checkpoints", "all")]
    assert evaluate_main(main_only) == 0
    after = {p.name: p.stat().st_mtime_ns for p in samples.glob("*.png")}
    assert set(after) == set(before)
    assert all(after[name] == before[name] for name in before if name != "00005.png")
    m = json.loads((run / "eval" / "metrics.json").read_text())
    assert m["fid"] == pytest.approx(first["fid"]) and m["shapes"] == first["shapes"]
    # A sweep not asked for this time is kept from the previous metrics.json.
    assert m["by_scale"] == first["by_scale"] and m["by_step"] == first["by_step"]


def test_missing_weights_skip_fid_and_clip_with_the_fix(evaluated, tmp_path):
    run, args = evaluated
    out = tmp_path / "run"
    make_run(ShardSet(json.loads((run / "config.json").read_text())["shards"]).path, out, steps=(3,))
    assert evaluate_main(["--run", str(out), "--num-samples", "2", "--steps", "2", "--batch-size", "2",
                          "--solver", "dpmpp2m", "--inception-weights", str(tmp_path / "missing.pth"),
                          "--clip", f"local-dir:{tmp_path / 'missing'}"]) == 0
    m = json.loads((out / "eval" / "metrics.json").read_text())
    assert m["fid"] is None and "--inception-weights" in m["fid_skipped"]
    assert m["clip_score"] is None and "--clip" in m["clip_skipped"]
    assert m["shapes"]["val"]["num_images"] == 2  # the rest still runs
    assert m["solver"] == "dpmpp2m" and "diffusers" in m["sampler"]
    assert json.loads((out / "eval" / "samples" / "params.json").read_text())["solver"] == "dpmpp2m"


def test_sample_cli_writes_pngs_for_free_text(evaluated, tmp_path, capsys):
    run, _ = evaluated
    assert sample_main(["--run", str(run), "--prompt", "two red circles", "--num", "2", "--steps", "2",
                        "--solver", "dpmpp2m", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "two_red_circles_grid.png", "two_red_circles_seed0.png", "two_red_circles_seed1.png"]
    out = capsys.readouterr().out
    assert "judge: exact scene" in out and "2 dpmpp2m steps" in out


def test_fid_ref_file_gives_the_same_fid_as_the_split_images(evaluated, shapes_shards, tmp_path, capsys):
    """A pytorch-fid-format reference of the same val images and features is the same reference."""
    from evaluate.fid import FIDFeatures, decode_png, frechet_distance, load_statistics

    run, args = evaluated
    first = json.loads((run / "eval" / "metrics.json").read_text())
    features = FIDFeatures(device="cpu", extractor=register_tiny_fid())
    images = torch.stack([decode_png(r["png"]) for r in ShardSet(shapes_shards).records("val")])
    act = features(images).numpy().astype(np.float64)
    ref = tmp_path / "fid_stats_val.npz"  # as pytorch-fid and U-ViT write it: no `features` entry
    np.savez(ref, mu=act.mean(0), sigma=np.cov(act, rowvar=False))
    main_only = [a for a in args if a not in ("--scales", "0,1", "--checkpoints", "all")]
    assert evaluate_main(main_only + ["--fid-ref", str(ref)]) == 0
    m = json.loads((run / "eval" / "metrics.json").read_text())
    assert m["fid"] == pytest.approx(first["fid"], rel=1e-5) and m["fid_reference"] == str(ref)
    assert "pytorch-fid" in m["fid_reference_warning"] and "warning:" in capsys.readouterr().out
    # The samples' statistics are written in the same format: FID from the two files is the reported one.
    samples, _ = load_statistics(m["fid_statistics"])
    assert frechet_distance(samples, load_statistics(ref)[0]) == pytest.approx(m["fid"], rel=1e-9)
    # A file that cannot be a reference stops the evaluation at once: one line, exit status 2.
    (tmp_path / "bad.npz").write_text("no")
    with pytest.raises(SystemExit) as stop:
        evaluate_main(main_only + ["--fid-ref", str(tmp_path / "bad.npz")])
    assert stop.value.code == 2 and "not a readable statistics" in capsys.readouterr().err
