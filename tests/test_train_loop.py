"""The training loop end to end on the shapes fixture: outputs, exact resume after SIGTERM and SIGKILL, the
non-finite-loss stop, and two-process DDP through torchrun (gloo)."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from ifvit.lock import LOCK_FILE
from train.checkpoint import list_checkpoints, load_checkpoint, load_run
from train.trainer import NonFiniteLoss, train

ROOT = Path(__file__).resolve().parents[1]
# A model small enough for ~100 steps/s on one core; every step logged so losses compare step by step.
SMALL = dict(width=32, depth=3, heads=2, patch_size=8, batch_size=4, log_every=1, preview_every=0, seed=3)


@pytest.fixture
def one_thread():
    """In-process runs must match subprocess runs (OMP_NUM_THREADS=1) bit for bit: same thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cli_args(shards, out, **options):
    args = ["--variant", "if_concat", "--shards", str(shards), "--out", str(out), "--preset", "tiny"]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def losses(run_dir) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())]


def start_cli(shards, out, **options) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # A session of its own: signals go to the whole process group (loader workers included), as a job
    # scheduler or Ctrl-C would send them.
    return subprocess.Popen([sys.executable, "-m", "train", *cli_args(shards, out, **options)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(condition, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be interrupted:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for the run")
        time.sleep(0.01)


def logged_steps(run_dir) -> int:
    path = Path(run_dir) / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_tiny_run_writes_the_run_directory(shapes_shards, tmp_path, one_thread):
    out = tmp_path / "run"
    result = train("if_xattn", shapes_shards, out, preset="tiny",
                   overrides=dict(SMALL, steps=6, log_every=2, ckpt_every=4, preview_every=6, preview_prompts=3,
                                  preview_steps=3, num_workers=0))
    assert result.stopped == "finished" and result.step == 6
    config = json.loads((out / "config.json").read_text())
    assert config["variant"] == "if_xattn" and config["train"]["preset"] == "tiny"
    assert config["model"]["in_chans"] == 3 and config["model"]["text_dim"] == 64 and config["model"]["width"] == 32
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    assert set(records[0]) >= {"step", "loss", "lr", "steps_per_s", "samples_per_s", "mfu"}
    assert records[0]["mfu"] is None and records[0]["samples_per_s"] == pytest.approx(4 * records[0]["steps_per_s"])
    assert [s for s, _ in list_checkpoints(out)] == [4, 6]
    ckpt = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["config"] == config
    model, _ = load_run(out)
    for a, b in zip(model.parameters(), result.ema.parameters()):
        assert torch.equal(a, b)
    assert (out / "previews" / "step_00000006.png").stat().st_size > 1000
    assert list((out / "tb").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_resume_after_sigterm_and_sigkill_is_exact(shapes_shards, tmp_path, one_thread):
    """Three runs of the same 160 steps: uninterrupted; SIGTERM mid-segment then resumed; SIGKILL after a
    checkpoint (losing the steps logged after it) then resumed. Same per-step losses, same final weights."""
    options = dict(SMALL, steps=160, ckpt_every=32, num_workers=1)
    train("if_concat", shapes_shards, tmp_path / "reference", preset="tiny", overrides=options)
    reference = losses(tmp_path / "reference")
    assert [s for s, _ in reference] == list(range(1, 161))

    # SIGTERM: the run writes a checkpoint at the next step and exits cleanly.
    proc = start_cli(shapes_shards, tmp_path / "term", **options)
    wait_for(lambda: logged_steps(tmp_path / "term") >= 40, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, output[-3000:]
    stopped_at = load_checkpoint(tmp_path / "term" / "checkpoints" / "latest.pt")["step"]
    assert 40 <= stopped_at < 160 and "re-run the same command to resume" in output
    assert logged_steps(tmp_path / "term") == stopped_at

    # SIGKILL after the step-64 checkpoint: the steps logged after the checkpoint are redone on resume.
    proc = start_cli(shapes_shards, tmp_path / "kill", **options)
    wait_for(lambda: (tmp_path / "kill" / "checkpoints" / "step_00000064.pt").exists()
             and logged_steps(tmp_path / "kill") >= 70, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    killed_at = load_checkpoint(tmp_path / "kill" / "checkpoints" / "latest.pt")["step"]
    assert 64 <= killed_at < 160 and logged_steps(tmp_path / "kill") > killed_at
    assert json.loads((tmp_path / "kill" / LOCK_FILE).read_text())["pid"] == proc.pid  # stale: its holder is dead

    for name in ("term", "kill"):
        train("if_concat", shapes_shards, tmp_path / name, preset="tiny", overrides=options)  # kill: takes the lock over
        assert losses(tmp_path / name) == reference, f"{name}: resumed losses differ from the uninterrupted run"
        assert not (tmp_path / name / LOCK_FILE).exists()
        final = load_checkpoint(tmp_path / name / "checkpoints" / "latest.pt")
        expected = load_checkpoint(tmp_path / "reference" / "checkpoints" / "latest.pt")
        for key in ("model", "ema"):
            for param, value in expected[key].items():
                assert torch.equal(final[key][param], value), f"{name}: {key}.{param} differs"


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(shapes_shards, tmp_path, one_thread):
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLoss, match=r"loss became nan .*step_00000005\.pt \(kept\)"):
        train("if_concat", shapes_shards, out, preset="tiny",
              overrides=dict(SMALL, steps=20, log_every=4, ckpt_every=5, num_workers=0, inject_nan_at_step=8))
    assert [s for s, _ in list_checkpoints(out)] == [5]
    ckpt = load_checkpoint(out / "checkpoints" / "latest.pt")
    assert ckpt["step"] == 5
    assert all(torch.isfinite(v).all() for v in [*ckpt["model"].values(), *ckpt["ema"].values()])
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [4, 5]


DDP_DRIVER = """
import sys, torch, torch.distributed as dist
from train.trainer import train
shards, out = sys.argv[1], sys.argv[2]
result = train("if_concat", shards, out, preset="tiny", overrides=dict(
    width=32, depth=3, heads=2, patch_size=8, batch_size=8, steps=4, log_every=1, ckpt_every=4,
    preview_every=0, num_workers=0))
torch.save({"model": result.model.state_dict(), "history": result.history}, f"{out}/rank{dist.get_rank()}.pt")
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_process_ddp_keeps_ranks_identical_and_logs_the_mean_loss(shapes_shards, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(DDP_DRIVER))
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run([*torchrun, str(driver), str(shapes_shards), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for name, value in ranks[0]["model"].items():
        assert torch.equal(value, ranks[1]["model"][name]), f"{name} differs between ranks"
    logged = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 4
    for step, (h0, h1) in enumerate(zip(ranks[0]["history"], ranks[1]["history"])):
        assert h0["loss"] == h1["loss"] == logged[step]
        assert h0["loss"] == pytest.approx((h0["loss_local"] + h1["loss_local"]) / 2, rel=1e-6)
        assert h0["loss_local"] != h1["loss_local"], "ranks must see different data"


class VAEShardSetStub:
    """A shard set of VAE moments (8 channels = mean ‖ logvar) whose VAE cannot be loaded, as offline."""
    latent_format, latent_channels, latent_size, latent_scale = "moments", 4, 8, 0.23
    text_len, text_dim, splits = 77, 32, ["train", "val"]

    def __init__(self, path):
        self.path, self.manifest = Path(path), {"config_hash": "vae-stub"}
        self.path.mkdir(exist_ok=True)
        (self.path / "manifest.json").write_text(json.dumps(self.manifest))

    def null_text(self):
        return torch.zeros(77, 32)

    def loader(self, split="train", batch_size=4, seed=0, num_workers=0, resampled=True):
        g = torch.Generator().manual_seed(seed)
        while True:
            yield {"latent": torch.randn(batch_size, 8, 8, 8, generator=g).half(),
                   "text": torch.randn(batch_size, 77, 32, generator=g).half(), "key": ["k"] * batch_size}

    def records(self, split):
        for i in range(4):
            yield {"json": {"captions": [f"caption {i}"]}, "text": torch.randn(5, 77, 32).numpy(),
                   "latent": torch.randn(8, 8, 8).half().numpy()}

    def image_codec(self, device):
        raise OSError("no VAE at stabilityai/sd-vae-ft-ema")


def test_vae_shard_set_trains_and_skips_previews_it_cannot_decode(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("pipeline.reader.ShardSet", VAEShardSetStub)
    result = train("if_xattn", tmp_path / "stub", tmp_path / "vae", overrides=dict(SMALL, patch_size=2, steps=4, ckpt_every=4,
                                                                         preview_every=2, num_workers=0))
    assert result.stopped == "finished" and json.loads((tmp_path / "vae" / "config.json").read_text())["train"][
        "preset"] == "coco"  # chosen from the shard set: VAE latents mean the paper's recipe
    assert result.model.cfg.in_chans == 4 and result.model.cfg.img_size == 8  # moments are sampled to 4 channels
    assert "previews disabled (OSError: no VAE" in capsys.readouterr().out
    assert not (tmp_path / "vae" / "previews").exists() and losses(tmp_path / "vae")[-1][0] == 4
