"""Trainer pieces on random tensors (no shard set): config, one step, accumulation, activation
checkpointing, caption dropout, EMA, checkpoints, preview sampler, CLI, bench arithmetic."""
import copy

import pytest
import torch

from train.bench import add_ratios, bench_variant
from train.checkpoint import list_checkpoints, load_run, save_checkpoint
from train.config import PRESETS, TrainConfig, default_preset, make_config, parse_overrides
from train.diffusion import NoiseSchedule
from train.flops import true_flops
from train.model import ABLATIONS, VARIANTS, UViT, variant_config
from train.preview import ddim_sample, pixels_to_uint8
from train.trainer import (build_optimizer, draw_step_inputs, enable_activation_checkpointing, model_config,
                           step_generator, train_step, update_ema)

TINY = dict(width=32, depth=3, heads=2, patch_size=8, in_chans=3, img_size=32, text_len=77, text_dim=16)


def tiny_model(variant="if_concat", **kw):
    torch.manual_seed(0)
    return UViT(variant_config(variant, **({"n_image": 1} if variant.startswith("if") else {}), **TINY, **kw))


def batch(model, b=4, seed=0, dropout=0.1):
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g)
    text = torch.randn(b, cfg.text_len, cfg.text_dim, generator=g)
    null = torch.zeros(cfg.text_len, cfg.text_dim)
    return (x0, *draw_step_inputs(x0, text, null, g, caption_dropout=dropout, schedule=NoiseSchedule()))


# --- config ----------------------------------------------------------------------------------------------

def test_presets_follow_the_paper_and_fit_their_data():
    coco = PRESETS["coco"]
    assert (coco.lr, coco.beta1, coco.beta2, coco.weight_decay, coco.warmup_steps) == (2e-4, 0.9, 0.9, 0.03, 5000)
    assert (coco.batch_size, coco.steps, coco.ema_decay, coco.caption_dropout) == (256, 1_000_000, 0.9999, 0.1)
    assert default_preset("moments", cuda=False) == "coco"
    assert default_preset("pixels", cuda=True) == "shapes" and default_preset("pixels", cuda=False) == "tiny"
    data = dict(in_chans=3, img_size=32, text_len=77, text_dim=64)
    for preset in ("shapes", "tiny"):  # every variant and ablation builds at the preset's size
        for name in [*VARIANTS, *ABLATIONS]:
            mcfg = model_config(name, PRESETS[preset], data)
            assert (mcfg.in_chans, mcfg.text_dim, mcfg.width) == (3, 64, PRESETS[preset].width)
            if mcfg.fusion == "intermediate" and VARIANTS.get(name, ABLATIONS.get(name)).n_image:
                assert 0 < mcfg.n_image < mcfg.depth // 2, "intermediate fusion must keep fused blocks"
    assert model_config("if_concat", PRESETS["coco"], dict(in_chans=4, img_size=32, text_len=77, text_dim=768)) \
        == VARIANTS["if_concat"]


def test_warmup_then_constant_lr():
    cfg = make_config("coco")
    assert cfg.lr_at(1) == pytest.approx(2e-4 / 5000)
    assert cfg.lr_at(2500) == pytest.approx(1e-4)
    assert cfg.lr_at(5000) == cfg.lr_at(900_000) == 2e-4


def test_overrides_are_typed_and_checked():
    parsed = parse_overrides({"lr": "1e-4", "compile": "false", "width": "none", "steps": "10",
                              "activation_checkpointing": "true", "precision": "bf16"})
    assert parsed == {"lr": 1e-4, "compile": False, "width": None, "steps": 10,
                      "activation_checkpointing": True, "precision": "bf16"}
    with pytest.raises(KeyError, match="known are"):
        parse_overrides({"learning_rate": "1"})
    with pytest.raises(ValueError):
        make_config("tiny", precision="fp16")


def test_cli_exposes_every_config_field():
    from train.__main__ import parser

    args = parser().parse_args(["--variant", "if_xattn", "--shards", "s", "--out", "o", "--ema-decay", "0.999",
                                "--grad-accum", "4", "--n-image", "2"])
    assert args.cfg_ema_decay == "0.999" and args.cfg_grad_accum == "4" and args.n_image == 2
    for name in TrainConfig.__dataclass_fields__:
        if name != "preset":
            assert hasattr(args, f"cfg_{name}")


# --- one step ---------------------------------------------------------------------------------------------

def test_train_step_lowers_the_loss_on_a_fixed_batch():
    model = tiny_model()
    opt = build_optimizer(model, make_config("tiny"), torch.device("cpu"))
    x0, context, t, eps = batch(model, b=8)
    losses = [train_step(model, opt, NoiseSchedule(), x0, context, t, eps, lr=3e-3).item() for _ in range(30)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0]
    assert opt.param_groups[0]["lr"] == 3e-3


def test_gradient_accumulation_matches_the_full_batch():
    full, accum = tiny_model(), tiny_model()
    cfg = make_config("tiny")
    opts = [build_optimizer(m, cfg, torch.device("cpu")) for m in (full, accum)]
    inputs = batch(full, b=8)
    loss_full = train_step(full, opts[0], NoiseSchedule(), *inputs, lr=1e-3, grad_accum=1)
    loss_accum = train_step(accum, opts[1], NoiseSchedule(), *inputs, lr=1e-3, grad_accum=4)
    assert loss_accum.item() == pytest.approx(loss_full.item(), rel=1e-5)
    for a, b in zip(full.parameters(), accum.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["if_concat", "early_xattn"])
def test_activation_checkpointing_gives_identical_results(variant):
    plain, recomputed = tiny_model(variant), tiny_model(variant)
    enable_activation_checkpointing(recomputed)
    assert plain.state_dict().keys() == recomputed.state_dict().keys()  # checkpoints stay interchangeable
    x0, context, t, eps = batch(plain)
    for m in (plain, recomputed):
        loss = torch.nn.functional.mse_loss(m(NoiseSchedule().add_noise(x0, eps, t), t, context), eps)
        loss.backward()
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters()):
        assert torch.equal(a.grad, b.grad), name


def test_every_variant_trains_all_its_parameters():
    """DDP runs with find_unused_parameters=False: a parameter without a gradient would hang it."""
    for name in [*VARIANTS, *ABLATIONS]:
        model = UViT(model_config(name, make_config("tiny", depth=5), dict(in_chans=3, img_size=32,
                                                                          text_len=77, text_dim=16)))
        x0, context, t, eps = batch(model, b=2)
        torch.nn.functional.mse_loss(model(x0, t, context), eps).backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, f"{name}: {missing}"


def test_caption_dropout_swaps_in_the_null_text_without_changing_shapes():
    g = torch.Generator().manual_seed(0)
    x0, text, null = torch.randn(64, 3, 8, 8), torch.randn(64, 77, 16), torch.randn(77, 16)
    context, t, eps = draw_step_inputs(x0, text, null, g, caption_dropout=0.25, schedule=NoiseSchedule())
    dropped = (context == null).all(dim=(1, 2))
    kept = (context == text).all(dim=(1, 2))
    assert context.shape == text.shape and bool((dropped ^ kept).all())
    assert 4 <= int(dropped.sum()) <= 30
    assert t.min() >= 0 and t.max() < 1000 and eps.shape == x0.shape


def test_step_draws_depend_only_on_seed_rank_and_step():
    def draws(seed, rank, step):
        g = step_generator(seed, rank, step, torch.device("cpu"))
        return torch.rand(4, generator=g)

    assert torch.equal(draws(0, 0, 7), draws(0, 0, 7))
    assert not torch.equal(draws(0, 0, 7), draws(0, 0, 8))
    assert not torch.equal(draws(0, 0, 7), draws(0, 1, 7))
    assert not torch.equal(draws(0, 0, 7), draws(1, 0, 7))


def test_ema_update():
    model = tiny_model()
    ema = copy.deepcopy(model)
    before = [p.clone() for p in ema.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    update_ema(list(ema.parameters()), list(model.parameters()), decay=0.9)
    for b, e in zip(before, ema.parameters()):
        torch.testing.assert_close(e, b + 0.1)


# --- checkpoints and previews ------------------------------------------------------------------------------

def test_checkpoints_are_plain_atomic_and_pruned(tmp_path):
    model = tiny_model("if_xattn")
    config = {"variant": "if_xattn", "model": model.cfg.to_dict(), "train": make_config("tiny").to_dict(),
              "shards": "x"}
    opt = build_optimizer(model, make_config("tiny"), torch.device("cpu"))
    train_step(model, opt, NoiseSchedule(), *batch(model), lr=1e-3)
    for step in (10, 20, 30):
        state = {"model": model.state_dict(), "ema": model.state_dict(), "optimizer": opt.state_dict(),
                 "step": step, "config": config, "rng": {"torch": torch.get_rng_state(), "cuda": None},
                 "data": {"segment_seed": 1, "consumed": 3}}
        save_checkpoint(tmp_path, state, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [20, 30]
    assert not list((tmp_path / "checkpoints").glob(".*tmp*"))
    ckpt = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=True)
    assert ckpt["step"] == 30 and set(ckpt) >= {"model", "ema", "optimizer", "step", "config", "rng"}
    loaded, cfg = load_run(tmp_path)
    assert cfg == config and not loaded.training
    for a, b in zip(loaded.parameters(), model.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="available steps are"):
        load_run(tmp_path, step=10)
    with pytest.raises(FileNotFoundError, match="train first"):
        load_run(tmp_path / "nothing")


def test_preview_sampler_is_deterministic_per_seed():
    model = tiny_model().eval()
    context = torch.randn(3, 77, 16)
    a = ddim_sample(model, context, torch.zeros(77, 16), seeds=[0, 1, 2], steps=4)
    b = ddim_sample(model, context[1:2], torch.zeros(77, 16), seeds=[1], steps=4)
    assert a.shape == (3, 3, 32, 32) and torch.isfinite(a).all()
    torch.testing.assert_close(a[1:2], b, rtol=1e-4, atol=1e-5)  # same prompt + seed, any batch
    img = pixels_to_uint8(torch.tensor([[-2.0, -1.0, 0.0, 1.0]]))
    assert img.dtype == torch.uint8 and img.tolist() == [[0, 0, 128, 255]]


# --- bench ---------------------------------------------------------------------------------------------------

def test_bench_measures_a_training_step_and_ratios():
    cfg = variant_config("early_concat", **{**TINY, "in_chans": 4, "text_dim": 768})
    results = [bench_variant(name, batch=2, steps=1, warmup=1, device=torch.device("cpu"), compile_model=False,
                             autocast_dtype=None, cfg=cfg) for name in ("early_concat", "if_xattn")]
    add_ratios(results)
    r = results[1]
    assert r["steps_per_s"] > 0 and r["samples_per_s"] == pytest.approx(2 * r["steps_per_s"])
    assert r["mfu"] is None and r["peak_mem_gib"] is None  # a CPU has no bf16 peak in the table
    assert r["tflops"] == pytest.approx(3 * true_flops(cfg) * 2 * r["steps_per_s"] / 1e12)
    assert r["paper_ratio_to_early_concat"] == pytest.approx(2.74 / 1.81)
    assert results[0]["ratio_to_early_concat"] == 1.0
