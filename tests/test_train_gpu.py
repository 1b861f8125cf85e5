"""GPU-only checks of the training step (skipped without CUDA): the flash attention kernel serves every
variant, a compiled model trains step after step without recompiling and runs the flash kernel, and the
trainer's single-GPU loop (bf16, fused AdamW, checkpoints, resume, previews) runs end to end."""
import pytest
import torch

from train.config import make_config
from train.diffusion import NoiseSchedule
from train.model import VARIANTS, UViT, variant_config
from train.trainer import build_optimizer, draw_step_inputs, train_step, update_ema

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def inputs(cfg, batch, step, device):
    gen = torch.Generator(device).manual_seed(step)
    x0 = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, device=device, generator=gen)
    text = torch.randn(batch, cfg.text_len, cfg.text_dim, device=device, generator=gen)
    null = torch.zeros(cfg.text_len, cfg.text_dim, device=device)
    return (x0, *draw_step_inputs(x0, text, null, gen, caption_dropout=0.1, schedule=NoiseSchedule(device)))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_flash_attention_serves_every_variant(variant):
    """sdpa_kernel(FLASH_ATTENTION) raises if any attention call of forward or backward cannot use it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = torch.device("cuda")
    cfg = VARIANTS[variant]  # the paper's configuration: head dim 64, no mask
    model = UViT(cfg).to(device)
    x0, context, t, eps = inputs(cfg, 4, 0, device)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
        pred = model(x0, t, context)
        torch.nn.functional.mse_loss(pred.float(), eps).backward()
    assert pred.shape == x0.shape and torch.isfinite(pred).all()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("variant", ["early_concat", "if_xattn"])
def test_compiled_model_trains_without_recompiling(variant):
    """New data, timesteps, dropped captions and learning rates every step: one graph, compiled once."""
    from torch._dynamo.utils import counters

    device = torch.device("cuda")
    cfg = variant_config(variant, width=256, depth=7, heads=4, **({"n_image": 2} if variant.startswith("if") else {}))
    torch._dynamo.reset()
    counters.clear()
    model = UViT(cfg).to(device)
    ema = UViT(cfg).to(device).requires_grad_(False)
    optimizer = build_optimizer(model, make_config("coco"), device)
    model.compile()
    schedule = NoiseSchedule(device)
    losses = []
    for step in range(1, 9):
        x0, context, t, eps = inputs(cfg, 16, step, device)
        loss = train_step(model, optimizer, schedule, x0, context, t, eps, lr=1e-4 * step,
                          autocast_dtype=torch.bfloat16)
        update_ema(list(ema.parameters()), list(model.parameters()), 0.999)
        losses.append(loss.item())
        if step == 1:
            graphs = counters["stats"]["unique_graphs"]
            assert graphs >= 1
    assert counters["stats"]["unique_graphs"] == graphs, "the model recompiled during training"
    assert all(torch.isfinite(torch.tensor(losses)))

    # The compiled graph's own choice of SDPA backend, read off the kernels one step runs.
    from train.bench import attention_kernels

    x0, context, t, eps = inputs(cfg, 16, 9, device)
    ran = attention_kernels(lambda: train_step(model, optimizer, schedule, x0, context, t, eps, lr=1e-4,
                                               autocast_dtype=torch.bfloat16), device)
    assert any("flash" in k["kernel"].lower() for k in ran), f"no flash attention kernel ran: {ran}"


def test_the_single_gpu_training_loop_runs_and_resumes(shapes_shards, tmp_path):
    """train() on CUDA without DDP: bf16 autocast, fused AdamW, checkpoint with the CUDA RNG state, a
    preview, then a resume that continues where the checkpoint left off."""
    from train.trainer import train

    small = dict(width=64, depth=3, heads=2, patch_size=4, batch_size=8, log_every=2, ckpt_every=4,
                 preview_every=4, preview_prompts=2, preview_steps=2, num_workers=0, device="cuda",
                 precision="bf16", compile=False)
    first = train("if_concat", shapes_shards, tmp_path / "run", preset="tiny", overrides=dict(small, steps=4))
    assert first.stopped == "finished" and first.step == 4 and next(first.model.parameters()).is_cuda
    assert all(torch.isfinite(torch.tensor([h["loss"] for h in first.history])))
    assert (tmp_path / "run" / "previews" / "step_00000004.png").is_file()
    resumed = train("if_concat", shapes_shards, tmp_path / "run", preset="tiny", overrides=dict(small, steps=6))
    assert resumed.step == 6 and [h["step"] for h in resumed.history] == [6]
