"""Evaluate a run: sample, decode, score; write runs/NAME/eval/ (docs/CONTRACTS.md §6). CLI: evaluate/__main__.py.

One evaluation *setting* is (checkpoint step, guidance scale) on a fixed prompt set. For each setting, from
top to bottom:

  1. generate: every rank samples its share of the prompts (prompts[rank::world]) with the EMA weights,
     decodes through the shard set's image codec and writes PNGs + index lines (resumable);
  2. score: every rank reads its share back from the folder -- the prompt stored beside each image -- and
     computes Inception features, CLIP cosines and (shapes) the judge's reading; rank 0 gathers them and
     computes FID against the split's reference statistics (cached in the cache folder), CLIP-S and the
     judge's aggregate.

The eval folder is locked for the whole job (rank 0 holds it): a second evaluation of the same run stops.

The main setting (newest selected checkpoint, --scale) writes eval/samples/; a guidance sweep (--scales) and
training curves (--checkpoints all) add settings under eval/sweep/ and fill `by_scale` / `by_step`.
"""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from evaluate import judge
from evaluate.clip_score import ClipScorer, ClipUnavailable, clip_scores
from evaluate.fid import (INCEPTION, FIDFeatures, FIDUnavailable, frechet_distance, load_statistics,
                          manifest_key, reference_statistics, require_images, save_statistics, statistics)
from evaluate.sampler import DEFAULT_SOLVER, SOLVER_NOTES, check_solver, sample
from evaluate.prompts import Prompt, choose_prompts
from evaluate.sample_folder import SampleFolder, iter_sample_batches, sample_file, save_grid
from ifvit.errors import BadConfig, MissingPath
from ifvit.files import atomic_write_json
from pipeline.encoders import DEFAULT_CLIP
from pipeline.reader import ShardSet
from train.diffusion import guidance_scale_equivalent
from train.distributed import Dist, init_distributed, shutdown
from train.flops import paper_flops, true_flops
from train.model import count_params
from train.run_dir import RunDir


@dataclass(frozen=True)
class EvalConfig:
    preset: str = "gpu"
    num_samples: int = 30_000  # the paper's FID-30K: distinct val images, one seeded caption each
    steps: int = 50  # model evaluations (each a doubled cond + uncond batch)
    solver: str = DEFAULT_SOLVER  # "uvit" (U-ViT's DPM-Solver path, its FIDs) | "dpmpp2m" (evaluate.sampler)
    scale: float = 1.0  # U-ViT's guidance scale s (diffusers' guidance_scale s + 1); the paper's FID uses 1
    scales: tuple[float, ...] = ()  # guidance sweep (by_scale)
    checkpoints: str = "latest"  # "latest" | "all" | "STEP,STEP,..." (by_step)
    batch_size: int = 256  # prompts per sampler call; the model sees a fixed [2 x batch] shape
    seed: int = 0  # selects the prompts, their captions and each image's noise seed
    split: str = "val"  # prompts and FID reference images
    inception_weights: str | None = None  # local Inception file for offline clusters
    fid_features: str = INCEPTION  # torch-fidelity feature extractor (its FID layer), "pytorch-fid" or "none"
    fid_ref: str | None = None  # reference statistics .npz (pytorch-fid's format, e.g. U-ViT's) instead of the split
    fid_reference_images: int | None = None  # first N images of the split for the reference (None: all)
    clip: str = DEFAULT_CLIP  # open_clip spec (pipeline.encoders), or "none"
    vae: str | None = None  # decoder override (hub id, folder, ldm FILE.pth); None: the shard set's own
    shards: str | None = None  # the shard set, when it has moved since training (default: the run's)
    cache_dir: str | None = None  # FID reference statistics (default $IFVIT_CACHE or ~/.cache/ifvit)
    compile: bool = False  # model.compile() before sampling (GPU, worth it for FID-30K)

    def __post_init__(self):
        if self.num_samples < 1 or self.steps < 1 or self.batch_size < 1:
            raise BadConfig("--num-samples, --steps and --batch-size must be >= 1")
        check_solver(self.solver)


# The paper's protocol needs a GPU; on a CPU the defaults shrink so `make demo` stays in its time budget.
PRESETS = {
    "gpu": EvalConfig(),
    # On 2 CPU cores Inception costs ~0.2 s and CLIP ViT-L/14 ~1.5 s per image: a 256-image FID reference
    # and no CLIP score keep the demo's evaluation to a few minutes (--clip turns it back on).
    "cpu": EvalConfig(preset="cpu", num_samples=64, steps=25, batch_size=32, fid_reference_images=256,
                      clip="none"),
}
PRESET_NOTES = {
    "gpu": "paper protocol: U-ViT's DPM-Solver with 50 model evaluations, up to 30,000 distinct prompts",
    "cpu": "CPU preset (few prompts, 25 solver steps, 256 reference images, no CLIP score): indicative "
           "only, not the paper's FID-30K protocol; FID from a few dozen samples is strongly biased upwards",
}


def default_preset() -> str:
    return "gpu" if torch.cuda.is_available() else "cpu"


def select_checkpoints(run: RunDir, spec: str) -> list[int]:
    available = [step for step, _ in run.checkpoints()]
    if not available:
        raise MissingPath(f"no checkpoint in {run.path}/checkpoints: train first (make train) or pass "
                          "the right --run")
    if spec == "latest":
        return available[-1:]
    if spec == "all":
        return available
    try:
        wanted = sorted({int(s) for s in spec.split(",") if s.strip()})
    except ValueError:
        raise BadConfig(f"--checkpoints {spec!r}: use latest, all or STEP,STEP,...") from None
    missing = [s for s in wanted if s not in available]
    if missing:
        raise MissingPath(f"no checkpoint for step(s) {missing} in {run.path}: available are {available}")
    return wanted


# ----------------------------------------------------------------------------------------- scorers

@dataclass
class Scorers:
    fid: FIDFeatures | None
    fid_reference: dict | None
    fid_reference_warning: str | None
    fid_skipped: str | None
    clip: ClipScorer | None
    clip_skipped: str | None

    @classmethod
    def load(cls, cfg: EvalConfig, shard_set: ShardSet, device: torch.device, dist: Dist) -> "Scorers":
        fid = reference = warning = fid_skipped = None
        if cfg.fid_features.lower() in ("none", "off", ""):
            fid_skipped = "disabled (--fid-features none)"
        else:
            try:
                if not cfg.fid_ref:
                    require_images(shard_set)  # before loading Inception: say the real reason first
                fid = FIDFeatures(cfg.inception_weights, device, cfg.fid_features)
                if cfg.fid_ref:  # checked on every rank: a bad file stops all of them before any sampling
                    reference, warning = load_statistics(cfg.fid_ref, fid)
                elif dist.master:  # only rank 0 computes FID; the cache makes later runs instant
                    reference = reference_statistics(shard_set, fid, cfg.split, max_images=cfg.fid_reference_images,
                                                     cache_dir=cfg.cache_dir)
            except FIDUnavailable as e:
                fid, fid_skipped = None, str(e)
        clip = clip_skipped = None
        if not shard_set.has_captions:
            clip_skipped = (f"the shard set {shard_set.path} holds text states but no caption texts (U-ViT features "
                            "converted without annotation files): rebuild it with `python -m pipeline uvit-features "
                            "... --annotations DIR` (COCO's captions_{train,val}2014.json) for a CLIP score")
        elif cfg.clip.lower() in ("none", "off", ""):
            clip_skipped = ("disabled (--clip none" + (", the cpu preset's default: ViT-L/14 costs ~1.5 s per "
                            "image on 2 cores" if cfg.preset == "cpu" else "") +
                            "); pass --clip ViT-L-14-quickgelu:openai (or a local file) to compute it")
        else:
            try:
                clip = ClipScorer.load(cfg.clip, device)
            except ClipUnavailable as e:
                clip_skipped = str(e)
        # Every rank scores its share, so a metric one rank cannot compute is skipped on all of them.
        fid_skipped = next((r for r in dist.gather(fid_skipped) if r), None)
        clip_skipped = next((r for r in dist.gather(clip_skipped) if r), None)
        return cls(None if fid_skipped else fid, reference, warning, fid_skipped,
                   None if clip_skipped else clip, clip_skipped)


# ----------------------------------------------------------------------------------------- one setting

def generate(model, codec, null_text: torch.Tensor, prompts: list[Prompt], folder: SampleFolder,
             cfg: EvalConfig, scale: float, dist: Dist, desc: str, sampling: dict | None = None) -> dict:
    """Sample this rank's share of `prompts` that the folder does not hold yet; returns timing. `sampling`:
    the run's prediction target and normalisation (RunDir.sampling())."""
    if dist.master:
        folder.prepare()
    dist.barrier()
    done = folder.done()
    todo = [i for i in range(dist.rank, len(prompts), dist.world) if sample_file(i) not in done]
    device = null_text.device
    seconds, written = 0.0, []
    # One background writer: PNG encoding (zlib releases the GIL) overlaps the next batch's sampling, and
    # a single thread keeps each rank's index lines in order.
    with tqdm(total=len(todo), desc=desc, unit="img", disable=not dist.master or not todo) as bar, \
            ThreadPoolExecutor(max_workers=1) as writer:
        for start in range(0, len(todo), cfg.batch_size):
            indices = todo[start:start + cfg.batch_size]
            batch = [prompts[i] for i in indices]
            # Fixed batch shape: pad the last batch by repeating its last prompt, then drop the extras.
            padded = batch + [batch[-1]] * (cfg.batch_size - len(batch))
            context = torch.from_numpy(np.stack([p.text for p in padded])).to(device).float()
            t0 = time.perf_counter()
            latents = sample(model, context, null_text, steps=cfg.steps, scale=scale,
                             seeds=[p.seed for p in padded], solver=cfg.solver, **(sampling or {}))
            images = codec.decode(latents)[:len(batch)].cpu()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds += time.perf_counter() - t0
            written.append(writer.submit(folder.add, images, batch, indices))
            bar.update(len(batch))
    for future in written:
        future.result()  # a failed write stops here, with its own error
    timings = dist.gather((len(todo), seconds))
    dist.barrier()
    images = sum(n for n, _ in timings)
    wall = max(s for _, s in timings)
    timing_file = folder.path / "sampling.json"
    if images:
        timing = {"images": images, "seconds": round(wall, 3), "images_per_s": images / wall if wall else None,
                  "steps": cfg.steps, "solver": cfg.solver, "scale": scale, "batch_size": cfg.batch_size,
                  "world_size": dist.world,
                  "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
        if dist.master:
            atomic_write_json(timing_file, timing)
    else:  # everything was already there (a resumed or repeated evaluation): report the original timing
        timing = json.loads(timing_file.read_text()) if timing_file.is_file() else {"images": 0}
    return timing


def score(folder: SampleFolder, n: int, scorers: Scorers | None, dist: Dist, judge_scenes: bool) -> dict | None:
    """FID, CLIP score and judge metrics of the first `n` samples of the folder (rank 0 gets the dict)."""
    entries = folder.finish() if dist.master else None
    entries = dist.broadcast(entries)[:n]
    problems: list[str] = []
    features, cosines, judged = [], [], []
    mine = entries[dist.rank::dist.world]
    for images, batch in iter_sample_batches(folder.path, 64, mine, problems):
        if scorers and scorers.fid:
            features.append(scorers.fid(images))
        if scorers and scorers.clip:
            cosines.append(scorers.clip.cosines(images, [e["prompt"] for e in batch]))
        if judge_scenes:
            for image, entry in zip(images, batch):
                if entry.get("scene"):
                    judged.append(judge.score(judge.read_scene(image.permute(1, 2, 0).numpy()), entry["scene"]))
    parts = dist.gather((torch.cat(features) if features else None, torch.cat(cosines) if cosines else None,
                         judged, problems))
    if not dist.master:
        return None
    features = [p[0] for p in parts if p[0] is not None]
    cosines = [p[1] for p in parts if p[1] is not None]
    judged = [r for p in parts for r in p[2]]
    problems = [m for p in parts for m in p[3]]
    out = {"num_samples": len(entries) - len(problems), "problems": problems}
    if scorers is not None:
        out["fid"] = None
        if scorers.fid is None:
            out["fid_skipped"] = scorers.fid_skipped
        elif sum(len(f) for f in features) < 2:
            out["fid_skipped"] = "fewer than 2 readable samples"
        else:
            sample_stats = statistics(torch.cat(features))
            out["fid"] = frechet_distance(sample_stats, scorers.fid_reference)
            # The samples' side in pytorch-fid's format too, for FID against any other reference later.
            out["fid_statistics"] = str(save_statistics(folder.path.parent / "fid_stats.npz", sample_stats,
                                                        scorers.fid.name))
        out["clip_score"] = clip_scores(torch.cat(cosines)) if cosines else None
        if scorers.clip is None:
            out["clip_skipped"] = scorers.clip_skipped
    out["shapes"] = judge.aggregate(judged) if judged else None
    return out


def headline(result: dict) -> dict:
    """The flat numbers of one setting, for by_scale / by_step rows."""
    clip, shapes = result.get("clip_score") or {}, result.get("shapes") or {}
    return {"fid": result.get("fid"), "clip_s": clip.get("clip_s"), "cos100": clip.get("cos100"),
            "shapes_exact": shapes.get("exact_accuracy"), "shapes_match_ratio": shapes.get("match_ratio"),
            "shapes_count_error": shapes.get("count_error"), "num_samples": result["num_samples"]}


# ----------------------------------------------------------------------------------------- the run

def evaluate_run(run_dir: str | Path, cfg: EvalConfig) -> dict | None:
    """Evaluate `run_dir` with `cfg`; writes run_dir/eval/ and returns metrics.json's dict (rank 0)."""
    dist = init_distributed("auto")
    try:
        run = RunDir.open(run_dir, shards=cfg.shards)
        with dist.exclusive(run.eval_dir, f"python -m evaluate --run {run_dir}"):
            return _evaluate(run, cfg, dist)
    finally:
        shutdown()


def _evaluate(run: RunDir, cfg: EvalConfig, dist: Dist) -> dict | None:
    device = dist.device
    if device.type == "cuda":  # TF32 for the fp32 parts (VAE decoder, Inception, CLIP); the U-ViT runs in bf16
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    shard_set = run.shard_set()
    steps = select_checkpoints(run, cfg.checkpoints)
    main_step = steps[-1]
    eval_dir = run.eval_dir
    say = tqdm.write if dist.master else (lambda *_: None)

    prompts, prompt_problems = choose_prompts(shard_set, cfg.split, cfg.num_samples, cfg.seed)
    if not prompts:
        raise MissingPath(f"no usable {cfg.split} records in {shard_set.path}: " + "; ".join(prompt_problems[:3]))
    if len(prompts) < cfg.num_samples:
        say(f"{cfg.split} has {len(prompts)} usable records: evaluating {len(prompts)} samples, "
            f"not {cfg.num_samples}")
    # The judge reads val AND holdout (unseen colour-shape pairs) at the main setting.
    judge_splits = [s for s in ("val", "holdout") if shard_set.is_shapes and s in shard_set.splits]
    extra_prompts = {s: choose_prompts(shard_set, s, cfg.num_samples, cfg.seed)[0]
                     for s in judge_splits if s != cfg.split}

    scorers = Scorers.load(cfg, shard_set, device, dist)
    for name, reason in (("FID", scorers.fid_skipped), ("CLIP score", scorers.clip_skipped)):
        if reason:
            say(f"{name} skipped: {reason}")
    if scorers.fid_reference_warning:
        say(f"warning: {scorers.fid_reference_warning}")
    codec = shard_set.image_codec(device, vae=cfg.vae)
    null_text = shard_set.null_text().to(device)
    set_key = manifest_key(shard_set.manifest)

    def folder_params(step, scale, split):
        return {"step": step, "steps": cfg.steps, "solver": cfg.solver, "scale": scale, "seed": cfg.seed,
                "split": split, "num_samples": len(prompts if split == cfg.split else extra_prompts[split]),
                "shard_set": set_key}

    results, timing, main_model = {}, None, None
    sampling = run.sampling()
    for step in steps:
        model = run.load_model(step, ema=True, device=device)
        if cfg.compile and device.type == "cuda":
            model.compile()
        scales = [cfg.scale] + ([s for s in cfg.scales if s != cfg.scale] if step == main_step else [])
        for scale in scales:
            main = step == main_step and scale == cfg.scale
            where = eval_dir if main else eval_dir / "sweep" / f"step_{step:08d}-scale_{scale:g}"
            folder = SampleFolder(where / "samples", folder_params(step, scale, cfg.split), dist.rank)
            t = generate(model, codec, null_text, prompts, folder, cfg, scale, dist,
                         desc=f"sampling step {step} scale {scale:g} ({cfg.split})", sampling=sampling)
            results[(step, scale)] = score(folder, len(prompts), scorers, dist, shard_set.is_shapes)
            if main:
                timing, main_model = t, model
        if step == main_step:
            for split, split_prompts in extra_prompts.items():
                folder = SampleFolder(eval_dir / f"samples_{split}", folder_params(step, cfg.scale, split),
                                      dist.rank)
                generate(model, codec, null_text, split_prompts, folder, cfg, cfg.scale, dist,
                         desc=f"sampling step {step} scale {cfg.scale:g} ({split})", sampling=sampling)
                results[(step, cfg.scale, split)] = score(folder, len(split_prompts), None, dist, True)

    if not dist.master:
        return None
    main = results[(main_step, cfg.scale)]
    shapes = reference = None
    if judge_splits:
        shapes = {s: (main if s == cfg.split else results[(main_step, cfg.scale, s)])["shapes"]
                  for s in judge_splits}
        judge.plot_count_error({s: m for s, m in shapes.items() if m}, eval_dir / "count_error.png",
                               title=f"{run.variant} step {main_step}, scale {cfg.scale:g}")
        # Beside each score: the judge on the split's own images (ceiling) and with their scenes shuffled.
        reference = {s: judge.reference_levels(shard_set.records(s), main["num_samples"]) for s in judge_splits}
    grid = save_grid(run.samples_dir, eval_dir / "grid.png")

    try:
        previous = run.read_eval_metrics()
    except (MissingPath, json.JSONDecodeError):
        previous = {}
    metrics = {
        "run": str(run.path), "variant": run.variant, "step": main_step,
        "preset": cfg.preset, "preset_note": PRESET_NOTES.get(cfg.preset),
        "num_samples": main["num_samples"], "steps": cfg.steps, "solver": cfg.solver, "scale": cfg.scale,
        "guidance_scale": guidance_scale_equivalent(cfg.scale), "seed": cfg.seed, "split": cfg.split,
        "sampler": f"{SOLVER_NOTES[cfg.solver]}, EMA weights, {'bf16 autocast' if device.type == 'cuda' else 'fp32'}",
        "fid": main["fid"], **({"fid_skipped": main["fid_skipped"]} if main.get("fid_skipped") else {}),
        "fid_reference": str(cfg.fid_ref) if cfg.fid_ref else (
            f"{shard_set.path}: {cfg.split} images"
            + (f", the first {cfg.fid_reference_images}" if cfg.fid_reference_images else ", all")),
        **({"fid_reference_warning": scorers.fid_reference_warning} if scorers.fid_reference_warning else {}),
        "fid_features": cfg.fid_features, "fid_statistics": main.get("fid_statistics"),
        "clip_score": main["clip_score"], "clip_model": None if scorers.clip is None else scorers.clip.spec,
        **({"clip_skipped": main["clip_skipped"]} if main.get("clip_skipped") else {}),
        "decoder": cfg.vae or shard_set.manifest["image_encoder"]["spec"],
        "sampling": {"images_per_s": timing.get("images_per_s"), "seconds": timing.get("seconds"),
                     "includes": "sampling + decoding", **{k: timing[k] for k in ("batch_size", "world_size",
                                                                                 "device") if k in timing}},
        "shapes": shapes,
        "shapes_reference": reference,  # per split: {"data": real images, "chance": captions shuffled}
        "params": count_params(main_model),
        "gflops_true": true_flops(main_model.cfg) / 1e9, "gflops_paper": paper_flops(main_model.cfg) / 1e9,
        # A sweep or curve not asked for this time is kept from the previous metrics.json.
        "by_scale": [{"scale": s, "guidance_scale": guidance_scale_equivalent(s), "step": main_step,
                      **headline(results[(main_step, s)])} for s in sorted({cfg.scale, *cfg.scales})]
        if cfg.scales else previous.get("by_scale", []),
        "by_step": [{"step": s, "scale": cfg.scale, **headline(results[(s, cfg.scale)])} for s in steps]
        if cfg.checkpoints != "latest" else previous.get("by_step", []),
        "grid": str(grid), "samples": str(run.samples_dir),
        "problems": prompt_problems + [m for r in results.values() for m in r["problems"]],
        "config": asdict(cfg),
    }
    run.write_eval_metrics(metrics)
    return metrics


def config_from_args(preset: str | None = None, **overrides) -> EvalConfig:
    """The preset (default: by device) with every non-None override applied."""
    preset = preset or default_preset()
    if preset not in PRESETS:
        raise BadConfig(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
