"""Stage 3: what an FID-30K evaluation costs, measured piece by piece through evaluate's own code.

    sampling    evaluate.sampler.sample on the paper model (U-ViT-S/2, random weights: speed does not depend on
                them): evaluate's default solver, 50 model evaluations with guidance (a doubled batch), bf16
                autocast, at a fixed list of batch sizes, and if_xattn at the default batch
    decoding    the SD-VAE decoder (the real architecture from its diffusers config, random weights) through
                the pipeline's VAECodec, fp32/TF32 as evaluate runs it
    scoring     torch-fidelity's Inception (FID features) and CLIP ViT-L/14 image+text (CLIP score, its PIL
                preprocessing included), both with random weights; PNG writing and reading, as evaluate
                stores and re-reads every sample
Then the projected wall time of `python -m evaluate` with its GPU defaults on 30,000 prompts; last, if the
stage's time allows, early_concat compiled once at the default batch (`--compile`).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

from benchmarks.campaign import Recorder, StageContext, stage_device
from pipeline.bench import timed
from pipeline.encoders import SD_VAE_CONFIG, VAECodec
from benchmarks.stage_train import toy_config
from train.model import VARIANTS, UViT

FID_SAMPLES = 30_000
BATCHES = (64, 256, 512)  # fixed, no probing; 256 is evaluate's default
DEFAULT_BATCH = 256
STEPS = 50
COMPILE_ESTIMATE_S = 40
TOY_VAE = dict(SD_VAE_CONFIG, block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8)
TOY_CLIP = dict(embed_dim=32, quick_gelu=True, vision_cfg=dict(image_size=32, layers=1, width=64, patch_size=8),
                text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=2))


def images(n: int, side: int, device="cpu") -> torch.Tensor:
    """Noisy uint8 images: random data compresses as badly as real photos do, unlike flat colour."""
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, device=device)


def sampling(model, batch: int, steps: int, device: torch.device, text_dim: int) -> dict:
    from evaluate.sampler import sample

    gen = torch.Generator().manual_seed(0)
    context = torch.randn(batch, 77, text_dim, generator=gen).to(device)
    null = torch.randn(77, text_dim, generator=gen).to(device)
    run = lambda n: sample(model, context, null, steps=n, scale=1.0, seeds=range(batch))  # noqa: E731
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    run(2)  # warm-up: kernels, cuBLAS handles and, for a compiled model, compilation
    warmup = time.perf_counter() - start
    seconds = timed(lambda: run(steps), 0, 1, device)
    return {"batch": batch, "steps": steps, "images_per_s": batch / seconds, "seconds": seconds, "warmup_s": warmup,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


def random_inception(path: Path) -> Path:
    """A weights file for torch-fidelity's Inception with random values: it has no constructor route that
    skips downloading its weights, and throughput does not depend on their values."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
        model = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(model.state_dict(), path)
    return path


def run(rec: Recorder, ctx: StageContext) -> None:
    import open_clip

    from evaluate.clip_score import ClipScorer
    from evaluate.fid import FIDFeatures, decode_png
    from evaluate.images import save_png

    device = stage_device(ctx)
    cuda = device.type == "cuda"
    batches, default, steps, side = (BATCHES, DEFAULT_BATCH, STEPS, 256) if cuda else ((2, 4), 4, 2, 32)
    if ctx.smoke:  # a toy model of the same class; the real one takes minutes per batch on a CPU
        configs = {v: toy_config(v, img_size=8) for v in ("early_concat", "if_xattn")}
    else:
        configs = {v: VARIANTS[v] for v in ("early_concat", "if_xattn")}
    from evaluate.sampler import DEFAULT_SOLVER

    rec.set("settings", {"batches": list(batches), "default_batch": default, "steps": steps, "guidance": True,
                         "solver": DEFAULT_SOLVER,
                         "image_side": side, "model": "paper (U-ViT-S/2)" if not ctx.smoke else "toy"})

    torch.manual_seed(0)
    model = UViT(configs["early_concat"]).to(device).eval()
    text_dim = configs["early_concat"].text_dim
    for batch in batches:
        with rec.item(f"sample_b{batch}") as out:
            out.update(sampling(model, batch, steps, device, text_dim))
    with rec.item(f"sample_b{default}_if_xattn") as out:
        xattn = UViT(configs["if_xattn"]).to(device).eval()
        out.update(sampling(xattn, default, steps, device, text_dim), variant="if_xattn")
        del xattn
    del model

    from diffusers import AutoencoderKL

    codec = VAECodec(AutoencoderKL(**(TOY_VAE if ctx.smoke else SD_VAE_CONFIG)), "random", 0.23010, device)
    latent_side = side // codec.downsample
    for batch in ((32, default) if cuda else (2,)):
        with rec.item(f"decode_b{batch}") as out:
            z = torch.randn(batch, codec.latent_channels, latent_side, latent_side, device=device)
            seconds = timed(lambda: codec.decode(z), 1, 3 if cuda else 1, device)
            out.update(batch=batch, images_per_s=batch / seconds, resolution=side)
    codec = None  # frees the decoder for what follows

    score_batch = 256 if cuda else 2
    pictures = images(score_batch, side)
    with rec.item("inception") as out, tempfile.TemporaryDirectory() as tmp:
        fid = FIDFeatures(random_inception(Path(tmp) / "inception.pth"), device)
        seconds = timed(lambda: fid(pictures), 1, 3 if cuda else 1, device)
        out.update(batch=score_batch, images_per_s=score_batch / seconds)
    with rec.item("clip") as out:
        if ctx.smoke:
            model, preprocess = open_clip.CLIP(**TOY_CLIP), open_clip.image_transform(32, is_train=False)
        else:
            model, _, preprocess = open_clip.create_model_and_transforms("ViT-L-14-quickgelu", pretrained=None)
        scorer = ClipScorer(model, preprocess, open_clip.get_tokenizer("ViT-L-14-quickgelu"), device, "random")
        prompts = [f"a photo of {i} red circles" for i in range(score_batch)]
        seconds = timed(lambda: scorer.cosines(pictures, prompts), 1, 3 if cuda else 1, device)
        out.update(batch=score_batch, images_per_s=score_batch / seconds,
                   model="ViT-L-14-quickgelu (random)" if not ctx.smoke else "toy")
    with rec.item("png") as out, tempfile.TemporaryDirectory() as tmp:
        few = images(16 if cuda else 4, side)
        paths = [Path(tmp) / f"{i:05d}.png" for i in range(len(few))]
        write = timed(lambda: [save_png(im, p) for im, p in zip(few, paths)], 0, 1, torch.device("cpu"))
        read = timed(lambda: [decode_png(p.read_bytes()) for p in paths], 0, 1, torch.device("cpu"))
        out.update(write_per_s=len(few) / write, read_per_s=len(few) / read, resolution=side)
    rec.set("fid30k", project(rec.data["items"], default))

    # Last, as it is optional: compiling the sampler's model (python -m evaluate --compile) costs more than
    # all of the above together, and the projection above stands without it.
    key = f"sample_b{default}_compiled"
    if not cuda:
        return
    if ctx.remaining() < COMPILE_ESTIMATE_S:
        rec.skip(key, f"not reached: {ctx.remaining():.0f} s left, compiling takes ~{COMPILE_ESTIMATE_S} s")
        return
    with rec.item(key) as out:
        compiled = UViT(configs["early_concat"]).to(device).eval()
        compiled.compile()  # once: the sampler feeds one batch shape
        out.update(sampling(compiled, default, steps, device, text_dim), compiled=True)
    rec.set("fid30k", project(rec.data["items"], default))


def project(items: dict, batch: int) -> dict | None:
    """Seconds for `python -m evaluate` with its defaults on 30,000 prompts: generate (sample + decode, PNG
    writing overlapped in its writer thread), then score (read the PNGs back, Inception, CLIP)."""
    def rate(name, key="images_per_s"):
        entry = items.get(name, {})
        return entry.get(key) if entry.get("status") == "ok" else None

    sample, decode = rate(f"sample_b{batch}"), rate(f"decode_b{batch}") or rate("decode_b2")
    inception, clip = rate("inception"), rate("clip")
    write, read = rate("png", "write_per_s"), rate("png", "read_per_s")
    if None in (sample, decode, inception, clip, write, read):
        return None
    n = FID_SAMPLES
    generate = max(n / sample + n / decode, n / write)
    score = n / read + n / inception + n / clip
    compiled = rate(f"sample_b{batch}_compiled")
    out = {"samples": n, "batch": batch, "generate_s": generate, "score_s": score, "total_s": generate + score,
           "parts_s": {"sample": n / sample, "decode": n / decode, "png_write": n / write, "png_read": n / read,
                       "inception": n / inception, "clip": n / clip},
           "goal_s": 600, "note": "FID reference statistics of the val images come once on top (cached after)"}
    if compiled:
        out["total_s_compiled"] = max(n / compiled + n / decode, n / write) + score
    return out
