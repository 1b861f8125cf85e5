"""The model learns: a very small run on a small `demo`-world set beats "predict the mean image" in x0 space
at every noise level, read from the diagnostic the trainer logs (train/diagnostic.py).

The paper's epsilon recipe on raw pixels fails this within the same budget at high t (where colour and layout
are decided): the x0 its noise prediction implies is worse than the mean image there. In the top bucket
(t >= 900) x_t keeps only 7-12% of x0's amplitude: the least any model can gain over the mean
image is there, so that bucket is held to matching it within 5% (the demo's run beats it by 27%).
"""
import json

import pytest

from train.trainer import train

MARGIN = 0.85  # buckets 0-8: x0 MSE at most 85% of the mean image's
TOP_BUCKET_TOLERANCE = 1.05  # bucket 9: within 5% of it
RUN = dict(width=64, depth=5, heads=4, patch_size=2, steps=240, batch_size=32, lr=1e-3, warmup_steps=20,
           ema_decay=0.95, log_every=40, ckpt_every=240, preview_every=240, preview_prompts=4, preview_steps=4,
           num_workers=0, device="cpu")


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory):
    from pipeline.job import JobConfig, run
    from pipeline.sources import Preprocess, ShapesSource

    out = tmp_path_factory.mktemp("demo") / "shapes-demo"
    run(ShapesSource(train_images=512, val_images=64, holdout_images=0, resolution=16, world="demo"),
        JobConfig(out=str(out), image_encoder="pixels", text_encoder="random", executor="local",
                  preprocess=Preprocess(resolution=16, min_side=16), shard_size=128, batch_size=128))
    return out


def last_diagnostic(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "x0_mse_by_t" in r]
    assert rows, "the diagnostic was not logged"
    return rows[-1]


def test_a_small_run_beats_the_mean_image_at_every_noise_level(demo_shards, tmp_path, capsys):
    train("if_concat", demo_shards, tmp_path / "run", preset="demo", overrides=RUN)
    diag = last_diagnostic(tmp_path / "run")
    assert [len(diag[k]) for k in ("x0_mse_by_t", "baseline_by_t", "caption_effect_by_t")] == [10, 10, 10]
    model, mean = diag["x0_mse_by_t"], diag["baseline_by_t"]
    for b in range(9):
        assert model[b] <= MARGIN * mean[b], f"t bucket {b}: x0 MSE {model[b]:.4f} vs the mean image {mean[b]:.4f}"
    assert model[9] <= TOP_BUCKET_TOLERANCE * mean[9]
    out = capsys.readouterr().out
    assert "diagnostic at step 240" in out and "mean image" in out  # the training summary shows the table
