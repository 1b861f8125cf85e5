"""Training speed of the four variants at the paper's configuration (U-ViT-S/2, 4x32x32 latents, 77x768 text).

    python -m train.bench [--json PATH] [--batch-size B] [--steps N] [--compile true|false]

The trainer's own step (bf16 autocast, fused AdamW, fp32 EMA; torch.compile on a GPU) on random inputs of
fixed shape, so the figures are the model's and the optimizer's, not the loader's. For each variant: steps/s
and samples/s, peak memory, achieved TFLOP/s and MFU — true FLOPs (every matmul, attention included;
train.flops) x 3 for forward + backward, against the device's dense bf16 peak — beside the paper's RTX-4090
it/s and the speed ratio to early_concat. Torch only: runs on a GPU machine with nothing else installed.
"""
from __future__ import annotations

import platform
import sys
import time

import torch

from ifvit.cli import ArgumentParser, entry_point
from ifvit.errors import Unavailable
from ifvit.files import atomic_write_json
from train.config import TrainConfig
from train.diffusion import NoiseSchedule
from train.flops import PAPER_TABLE, true_flops
from train.model import VARIANTS, UViT, count_params
from train.trainer import (build_optimizer, draw_step_inputs, enable_activation_checkpointing, peak_flops,
                           train_step, update_ema)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


ATTENTION_KERNEL_WORDS = ("flash", "fmha", "attention", "sdpa", "cudnn")


def attention_kernels(step, device: torch.device, top: int = 5) -> list[dict]:
    """The attention kernels one call of `step` ran on the GPU, by device time: proof of which SDPA backend
    (flash, memory-efficient, cuDNN, math) the compiled or eager model actually selected."""
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        sync(device)
    rows = []
    for event in prof.key_averages():
        micros = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if micros and any(word in event.key.lower() for word in ATTENTION_KERNEL_WORDS):
            rows.append({"kernel": event.key[:120], "calls": event.count, "ms": round(micros / 1e3, 3)})
    return sorted(rows, key=lambda r: -r["ms"])[:top]


def bench_variant(name: str, *, batch: int, steps: int, warmup: int, device: torch.device, compile_model: bool,
                  autocast_dtype: torch.dtype | None, activation_checkpointing: bool = False,
                  cfg=None, profile_attention: bool = False) -> dict:
    """Time `steps` training steps (after `warmup` untimed ones, which include compilation). With
    `profile_attention` on a GPU, one more step is profiled for the attention kernels it ran."""
    cfg = cfg or VARIANTS[name]
    torch.manual_seed(0)
    model = UViT(cfg).to(device)
    ema = UViT(cfg).to(device).requires_grad_(False)
    optimizer = build_optimizer(model, TrainConfig(), device)
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    if compile_model:
        model.compile()
    schedule = NoiseSchedule(device)
    gen = torch.Generator(device).manual_seed(0)
    x0 = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, device=device, generator=gen)
    text = torch.randn(batch, cfg.text_len, cfg.text_dim, device=device, generator=gen)
    null_text = torch.zeros(cfg.text_len, cfg.text_dim, device=device)
    context, t, eps = draw_step_inputs(x0, text, null_text, gen, caption_dropout=0.1, schedule=schedule)
    ema_params, params = list(ema.parameters()), list(model.parameters())

    def step():
        loss = train_step(model, optimizer, schedule, x0, context, t, eps, lr=1e-4, autocast_dtype=autocast_dtype)
        update_ema(ema_params, params, 0.9999)
        return loss

    warmup_start = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warmup_seconds = time.perf_counter() - warmup_start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss = loss.item()  # waits for the last step
    seconds = time.perf_counter() - start
    kernels = None
    if profile_attention and device.type == "cuda":
        try:
            kernels = attention_kernels(step, device)
        except Exception as e:  # noqa: BLE001 - a profiler that cannot attach must not cost the timing
            kernels = [{"kernel": f"not profiled ({type(e).__name__}: {e})"[:120], "calls": 0, "ms": 0}]

    steps_per_s = steps / seconds
    flops_per_s = 3 * true_flops(cfg) * batch * steps_per_s
    peak = peak_flops(device)
    paper = PAPER_TABLE.get(name, (None, None, None))
    result = {
        "variant": name, "params": count_params(model), "gflops_true": round(true_flops(cfg) / 1e9, 3),
        "batch_size": batch, "steps_per_s": steps_per_s, "samples_per_s": steps_per_s * batch,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "tflops": flops_per_s / 1e12, "mfu": flops_per_s / peak if peak else None,
        "paper_4090_its": paper[2], "loss": loss,
        "warmup_s": warmup_seconds,  # the untimed steps, compilation included
        **({"attention_kernels": kernels} if kernels is not None else {}),
    }
    del model, ema, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if compile_model:
        torch._dynamo.reset()  # each variant compiles from a clean cache
    return result


def add_ratios(results: list[dict], base: str = "early_concat") -> None:
    """Speed of each variant relative to the baseline, ours and the paper's."""
    ref = next((r for r in results if r["variant"] == base), None)
    for r in results:
        r["ratio_to_early_concat"] = r["steps_per_s"] / ref["steps_per_s"] if ref else None
        paper_ref = PAPER_TABLE[base][2]
        r["paper_ratio_to_early_concat"] = r["paper_4090_its"] / paper_ref if r["paper_4090_its"] else None


def format_table(results: list[dict]) -> str:
    def f(value, spec):
        return "–" if value is None else format(value, spec)

    lines = ["| variant | steps/s | samples/s | TFLOP/s | MFU | peak GiB | ratio to early_concat | "
             "paper 4090 it/s | paper ratio |", "|" + "---|" * 9]
    for r in results:
        lines.append(f"| {r['variant']} | {r['steps_per_s']:.3f} | {r['samples_per_s']:.1f} | {f(r['tflops'], '.2f')} "
                     f"| {f(r['mfu'], '.1%')} | {f(r['peak_mem_gib'], '.1f')} | {f(r['ratio_to_early_concat'], '.2f')} "
                     f"| {f(r['paper_4090_its'], '.2f')} | {f(r['paper_ratio_to_early_concat'], '.2f')} |")
    return "\n".join(lines)


def run(argv: list[str]) -> dict:
    """The benchmark (the report dict); `main` is its command line."""
    p = ArgumentParser(prog="python -m train.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", metavar="PATH", help="also write the results here")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--batch-size", type=int, help="default 256 on a GPU, 4 on a CPU")
    p.add_argument("--steps", type=int, help="timed steps (default 50 on a GPU, 2 on a CPU)")
    p.add_argument("--warmup", type=int, help="untimed steps first, compilation included (default 10 / 1)")
    p.add_argument("--compile", choices=("true", "false"), help="torch.compile (default: on a GPU only)")
    p.add_argument("--precision", choices=("bf16", "fp32"), help="default bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = p.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        raise Unavailable("--device cuda but torch sees no GPU: pass --device cpu (or auto) or fix the CUDA install")
    cuda = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    batch = args.batch_size or (256 if cuda else 4)
    steps = args.steps or (50 if cuda else 2)
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    compile_model = args.compile == "true" if args.compile else cuda
    precision = args.precision or ("bf16" if cuda else "fp32")
    autocast_dtype = torch.bfloat16 if precision == "bf16" else None
    device_name = torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or platform.machine()}, " \
                                                                 f"{torch.get_num_threads()} threads)"
    peak = peak_flops(device)
    print(f"train.bench on {device_name}: batch {batch}, {precision}, compile {'on' if compile_model else 'off'}, "
          f"{warmup} warm-up + {steps} timed steps per variant"
          + (f"; bf16 peak {peak / 1e12:.0f} TFLOP/s" if peak else "; MFU needs a GPU in the peak table"))

    results = []
    for name in args.variants:
        r = bench_variant(name, batch=batch, steps=steps, warmup=warmup, device=device, compile_model=compile_model,
                          autocast_dtype=autocast_dtype, activation_checkpointing=args.activation_checkpointing)
        print(f"  {name:13s} {r['steps_per_s']:8.3f} steps/s  {r['samples_per_s']:9.1f} samples/s  "
              f"{r['tflops']:7.2f} TFLOP/s" + (f"  MFU {r['mfu']:.1%}" if r["mfu"] is not None else ""), flush=True)
        results.append(r)
    add_ratios(results)

    report = {
        "device": device_name, "torch": torch.__version__, "batch_size": batch, "precision": precision,
        "compile": compile_model, "activation_checkpointing": args.activation_checkpointing,
        "warmup_steps": warmup, "timed_steps": steps, "peak_tflops_bf16": peak / 1e12 if peak else None,
        "flops_convention": "true FLOPs (every matmul incl. attention, 2 per multiply-add) x 3 per sample",
        "results": results,
    }
    print("\n" + format_table(results))
    print("\npaper: RTX-4090 training it/s (Table 1); ratio = steps/s divided by early_concat's.")
    if args.json:
        atomic_write_json(args.json, report, indent=2)
        print(f"wrote {args.json}")
    return report


@entry_point
def main(argv: list[str]) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
