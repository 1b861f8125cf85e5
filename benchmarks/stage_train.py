"""Stage 2: training throughput at the paper's configuration, through train.bench (the trainer's own step).

Batch 256, bf16 autocast, torch.compile (each model compiled once), flash SDPA, fused AdamW, fp32 EMA: the
four variants, then the four ablation rows, as far as the stage's time allows (the headline pair,
early_concat and if_xattn, first). Per row: steps/s, images/s, TFLOP/s from train.flops' true FLOPs (x3
for forward + backward), MFU against the dense bf16 peak the trainer uses and against the matmul rate
measured here, peak memory, the attention kernels one step ran, and the compile (warm-up) time. A model
that fails to compile is measured eager instead, and says so.
"""
from __future__ import annotations

import time

import torch

from benchmarks.campaign import Recorder, StageContext, error_text, free_gpu_memory, stage_device
from train.bench import add_ratios, bench_variant
from train.flops import PAPER_TABLE
from train.model import ABLATIONS, VARIANTS
from train.trainer import model_config, peak_flops

FIRST_COMPILE_S = 45  # a guess for the first compiled row, until one has been timed here
ORDER = ("early_concat", "if_xattn", "if_concat", "early_xattn", *ABLATIONS)
PAPER_SPEEDUP = PAPER_TABLE["if_xattn"][2] / PAPER_TABLE["early_concat"][2]  # 2.74 / 1.81 on an RTX 4090
# The toy size of --smoke: the same variants, 5 blocks of width 32 (ablations scaled as the trainer does).
SMOKE_MODEL = dict(width=32, depth=5, heads=2, patch_size=4)
SMOKE_DATA = dict(in_chans=4, img_size=16, text_len=77, text_dim=64)


def toy_config(name: str, **data):
    """`name` at the toy size of --smoke, its image-only blocks scaled to the depth as the trainer does."""
    from train.config import TrainConfig

    return model_config(name, TrainConfig(**SMOKE_MODEL), {**SMOKE_DATA, **data})


def matmul_tflops(device: torch.device, n: int = 8192, iters: int = 10) -> float:
    """bf16 n x n x n products on random data (zeros run faster), median of `iters` timed with CUDA events."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / sorted(times)[len(times) // 2] / 1e12


def measure(name: str, cfg, size: dict, device: torch.device, compile_model: bool, out: dict) -> dict:
    """One bench_variant row into `out`; a model that fails to compile is measured eager and says so."""
    cuda = device.type == "cuda"
    kwargs = dict(batch=size["batch"], steps=size["steps"], warmup=size["warmup"], device=device,
                  autocast_dtype=torch.bfloat16 if cuda else None, cfg=cfg, profile_attention=cuda)
    result = None
    try:
        result = bench_variant(name, compile_model=compile_model, **kwargs)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - a compile failure: the eager figure, labelled
        if not compile_model:
            raise
        out["compile_error"] = error_text(e)
    if result is None:  # outside the except block, so the failed model's memory can go first
        torch._dynamo.reset()
        free_gpu_memory()
        result = bench_variant(name, compile_model=False, **kwargs)
    result["compiled"] = compile_model and "compile_error" not in out
    out.update(result)
    return result


def run(rec: Recorder, ctx: StageContext) -> None:
    device = stage_device(ctx)
    cuda = device.type == "cuda"
    eager_size = dict(batch=256, steps=20, warmup=5) if cuda else dict(batch=2, steps=2, warmup=1)
    compiled_size = dict(batch=256, steps=30, warmup=10)
    rec.set("settings", {"batch": eager_size["batch"], "eager": eager_size, "compiled": compiled_size if cuda else None,
                         "device": torch.cuda.get_device_name() if cuda else "cpu",
                         "precision": "bf16" if cuda else "fp32", "compile": cuda,
                         "peak_tflops_bf16": (peak_flops(device) or 0) / 1e12 or None,
                         "model": "paper (U-ViT-S/2, 4x32x32 latents, 77x768 text)" if not ctx.smoke else
                         f"toy {SMOKE_MODEL}", "paper_speedup_if_xattn": PAPER_SPEEDUP})
    matmul = None
    if cuda:
        with rec.item("matmul") as out:
            matmul = out["tflops"] = matmul_tflops(device)
    rec.set("matmul_tflops", matmul)
    configs = {name: toy_config(name) if ctx.smoke else {**VARIANTS, **ABLATIONS}[name] for name in ORDER}

    # Every row eager first (seconds each, no compilation), then compiled in order of importance for as
    # long as the budget lasts: compiling the paper model takes far longer than timing it.
    phases = [("eager", False, eager_size, 0.0)] + ([("compiled", True, compiled_size, FIRST_COMPILE_S)] if cuda else [])
    for phase, compile_model, size, estimate in phases:
        rows = []
        for name in ORDER:
            key = f"{name}/{phase}"
            if ctx.remaining() < estimate:
                rec.skip(key, f"not reached: {ctx.remaining():.0f} s left of the stage's budget and a row takes "
                              f"~{estimate:.0f} s here; re-run with --stages train (a larger --budget)")
                continue
            start = time.monotonic()
            with rec.item(key) as out:
                result = measure(name, configs[name], size, device, compile_model, out)
                if matmul:
                    out["tflops_share_of_matmul"] = result["tflops"] / matmul
                rows.append(result)
            estimate = 1.2 * (time.monotonic() - start)  # the next row costs about as much
        add_ratios(rows)  # ratio_to_early_concat (ours) beside the paper's RTX-4090 ratio
        for row in rows:
            rec.data["items"][f"{row['variant']}/{phase}"].update(
                ratio_to_early_concat=row["ratio_to_early_concat"],
                paper_ratio_to_early_concat=row["paper_ratio_to_early_concat"])
        by_name = {r["variant"]: r for r in rows}
        if "early_concat" in by_name and "if_xattn" in by_name:
            rec.set(f"speedup_if_xattn_{phase}",
                    by_name["if_xattn"]["steps_per_s"] / by_name["early_concat"]["steps_per_s"])
    rec.flush()
