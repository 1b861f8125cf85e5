"""Attention analysis: spectra per image/head/step then averaged, conditional half only, plots written."""
import json

import numpy as np
import pytest
import torch

from evaluate.attention import AttentionStats, drop_border, top_singular_values, write_outputs


def one_hot_rows(grid, text_len, token):
    """[1, 1, grid*grid, T]: every patch puts all its attention on one text token (rank 1, σ1 = grid)."""
    probs = torch.zeros(1, 1, grid * grid, text_len)
    probs[..., token] = 1.0
    return probs


def test_spectra_are_averaged_per_matrix_not_taken_of_the_averaged_map():
    # Two steps attend to different tokens: each matrix has σ = (4, 0, 0); their average (every patch
    # half on token 0, half on token 1) has σ1 = sqrt(16 * 0.5) = 2.83. The analysis must report 4.
    stats = AttentionStats(grid=4)
    stats(0, 999, {"mid": one_hot_rows(4, 3, token=0)})
    stats(1, 500, {"mid": one_hot_rows(4, 3, token=1)})
    got = stats.summary()["mid"]["singular_values"]
    assert got[:3] == pytest.approx([4.0, 0.0, 0.0], abs=1e-9)
    averaged_map = (one_hot_rows(4, 3, 0) + one_hot_rows(4, 3, 1))[0, 0] / 2
    assert torch.linalg.svdvals(averaged_map)[0].item() == pytest.approx(8 ** 0.5)
    assert len(got) == 10 and got[3:] == [0.0] * 7  # padded past min(L, T) = 3


def test_spectra_match_numpy_on_random_attention_over_images_heads_and_steps():
    g = torch.Generator().manual_seed(0)
    steps = [torch.softmax(3 * torch.randn(2, 3, 25, 12, generator=g), -1) for _ in range(4)]
    stats = AttentionStats(grid=5)
    for i, probs in enumerate(steps):
        stats(i, 999 - i, {"in1": probs})
    every = np.stack([np.linalg.svd(m, compute_uv=False)[:10] for p in steps for m in p.reshape(-1, 25, 12).numpy()])
    out = stats.summary()["in1"]
    assert out["matrices"] == 4 * 2 * 3
    np.testing.assert_allclose(out["singular_values"], every.mean(0), rtol=1e-5)
    np.testing.assert_allclose(out["singular_values_std"], every.std(0), rtol=1e-4, atol=1e-7)
    mean_of_maps = np.linalg.svd(torch.stack(steps).mean((0, 1, 2)).numpy(), compute_uv=False)[:10]
    assert not np.allclose(out["singular_values"], mean_of_maps, rtol=0.05)
    # The map: each patch's attention mass on the text, averaged; with softmax over text only it is 1.
    assert np.allclose(out["map"], 1.0) and np.array(out["map"]).shape == (5, 5)


def test_border_removal_keeps_the_interior_patches_for_map_and_spectra():
    grid = 4
    probs = torch.arange(grid * grid, dtype=torch.float32).view(1, 1, grid * grid, 1).expand(1, 1, -1, 2)
    inner = drop_border(probs, grid)
    assert inner[0, 0, :, 0].tolist() == [5.0, 6.0, 9.0, 10.0]
    stats = AttentionStats(grid=grid, remove_border=True)
    stats(0, 999, {"mid": probs})
    out = stats.summary()["mid"]
    assert out["map"] == [[10.0, 12.0], [18.0, 20.0]]  # sums over the 2 text keys
    expected = torch.linalg.svdvals(inner[0, 0].double())
    assert out["singular_values"][:2] == pytest.approx(expected.tolist())
    with pytest.raises(ValueError, match="no-border"):
        drop_border(torch.zeros(1, 1, 4, 2), 2)


def test_a_doubled_guidance_batch_is_refused():
    stats = AttentionStats(grid=2)
    stats.batch = 2
    stats(0, 999, {"mid": torch.full((2, 1, 4, 3), 1 / 3)})
    with pytest.raises(RuntimeError, match="conditional half"):
        stats(1, 500, {"mid": torch.full((4, 1, 4, 3), 1 / 3)})


def test_top_singular_values_pads_and_truncates():
    assert top_singular_values(torch.eye(3)).tolist() == [1.0] * 3 + [0.0] * 7
    assert top_singular_values(torch.eye(12)).shape == (10,)


def synthetic_result(label, fusion, fused, grid=4):
    stats = AttentionStats(grid=grid)
    g = torch.Generator().manual_seed(len(label))
    stats(0, 999, {b: torch.softmax(torch.randn(1, 2, grid * grid, 6, generator=g), -1) for b in fused})
    return {"run": label, "label": label, "variant": label, "fusion": fusion, "conditioning": "concat",
            "block_names": ["in0", "in1", "mid", "out0", "out1"], "fused_blocks": fused, "grid": grid,
            "border_removed": False, "num_prompts": 1, "steps": 1, "scale": 3.0, "prompts": [],
            "blocks": stats.summary()}


def test_outputs_written_for_one_and_several_runs(tmp_path):
    early = synthetic_result("early_concat", "early", ["in0", "in1", "mid", "out0", "out1"])
    inter = synthetic_result("if_concat", "intermediate", ["in1", "mid", "out0"])
    paths = write_outputs([early], tmp_path / "one")
    assert set(paths) == {"json", "maps", "spectra"}
    paths = write_outputs([early, inter], tmp_path / "two")
    assert set(paths) == {"json", "maps", "spectra", "compare"}
    assert all(p.stat().st_size > 1000 for p in paths.values())
    saved = json.loads(paths["json"].read_text())["runs"]
    assert saved[1]["blocks"]["mid"]["singular_values"] == inter["blocks"]["mid"]["singular_values"]
    assert "in0" not in saved[1]["blocks"]


def test_only_the_conditional_half_is_recorded():
    """One sampling step from known noise: the recorded maps must be the model's attention under the
    prompts' context, not under the "" context that shares the guidance batch."""
    from evaluate.sampler import initial_noise, make_scheduler, sample
    from train.model import ModelConfig, UViT

    torch.manual_seed(0)
    cfg = ModelConfig(in_chans=3, img_size=8, patch_size=2, width=32, depth=3, heads=2, text_len=6, text_dim=16)
    model = UViT(cfg).eval()
    with torch.no_grad():  # sharpen attention: at init (std 0.02) it is near uniform, whatever the text
        for name, p in model.named_parameters():
            if name.endswith("qkv.weight"):
                p.mul_(40)
    g = torch.Generator().manual_seed(1)
    context, null = 4 * torch.randn(2, 6, 16, generator=g), torch.zeros(6, 16)
    stats = AttentionStats(grid=4)
    stats.batch = 2
    sample(model, context, null, steps=1, seeds=[3, 4], attention_callback=stats)

    scheduler = make_scheduler(1)
    x = initial_noise([3, 4], (3, 8, 8)) * scheduler.init_noise_sigma
    t = torch.full((2,), int(scheduler.timesteps[0]))

    def text_mass(ctx):
        with torch.no_grad():
            _, extras = model(x, t, ctx, record_attention=True)
        return {b: p.sum(-1).mean((0, 1)).view(4, 4) for b, p in extras["attention"].items()}

    cond, uncond = text_mass(context), text_mass(null.expand(2, -1, -1))
    got = stats.summary()
    assert set(got) == set(model.fused_block_names()) == set(cond)
    for block in cond:
        recorded = torch.tensor(got[block]["map"], dtype=torch.float64)
        assert torch.allclose(recorded, cond[block].double(), atol=1e-5)
        assert (recorded - uncond[block].double()).abs().max() > 0.05


@pytest.fixture(scope="module")
def runs(shapes_shards, tmp_path_factory):
    from tiny_runs import tiny_runs

    return tiny_runs(shapes_shards, tmp_path_factory.getbasetemp() / "tiny_runs")


@pytest.mark.slow
def test_cli_on_early_and_intermediate_runs(runs, tmp_path):
    from evaluate import attention
    from tiny_runs import one_thread

    out = tmp_path / "attention"
    with one_thread():
        attention.main(["--run", str(runs["early_concat"]), "--run", str(runs["if_concat"]), "--num-prompts", "2",
                        "--steps", "2", "--no-border", "--out", str(out)])
    for name in ("attention_maps.png", "attention_spectra.png", "attention_compare.png"):
        assert (out / name).stat().st_size > 1000
    early, inter = json.loads((out / "attention.json").read_text())["runs"]
    assert list(early["blocks"]) == ["in0", "in1", "mid", "out0", "out1"]  # early fusion: every block sees text
    assert list(inter["blocks"]) == ["in1", "mid", "out0"]  # [1, 1] at depth 5: one image-only block a side
    for res in (early, inter):
        assert res["border_removed"] and res["grid"] == 8
        for block in res["blocks"].values():
            assert np.array(block["map"]).shape == (6, 6)  # the 8x8 latent grid without its border
            assert block["matrices"] == 2 * 2 * 2  # prompts x heads x steps, each its own spectrum
            assert block["singular_values"] == sorted(block["singular_values"], reverse=True)
    assert early["prompts"] == inter["prompts"]  # the same prompts and seeds for both runs
