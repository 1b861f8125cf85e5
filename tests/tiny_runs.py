"""Two tiny runs, trained and evaluated once per test session, for the analysis tests (compare, attention,
human). Not a conftest: each of those test modules wraps `tiny_runs` in its own fixture, and the cache here
makes them share one pair (~30 s on 2 cores instead of three times that).

The runs are early_concat and if_concat at width 32, depth 5 (in intermediate fusion: one image-only block
each side, one text block), patch 4 on the 32 px shapes set (an 8x8 latent grid), 2 training steps with a
checkpoint at each, evaluated on 4 prompts with 2 sampler steps, a guidance sweep and every checkpoint.
FID and CLIP score are skipped (no Inception or CLIP weights offline); the shapes judge runs.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

VARIANTS = ("early_concat", "if_concat")
TRAIN_ARGS = ["--preset", "tiny", "--width", "32", "--depth", "5", "--heads", "2", "--patch-size", "4",
              "--steps", "2", "--batch-size", "8", "--log-every", "1", "--ckpt-every", "1", "--preview-every", "0",
              "--num-workers", "0", "--warmup-steps", "1"]
EVAL_ARGS = ["--num-samples", "4", "--steps", "2", "--batch-size", "4", "--clip", "none", "--scales", "0,3",
             "--checkpoints", "all"]

_cache: dict[Path, dict[str, Path]] = {}


@contextlib.contextmanager
def one_thread():
    """Models this small run 5-10x faster on one intra-op thread when the cores are shared (measured: a
    training step 0.07 s on one thread, 0.43 s on two, with other jobs running)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_runs(shards: Path, root: Path) -> dict[str, Path]:
    """{variant: run directory}, trained and evaluated in-process (no interpreter start-up per step)."""
    if root not in _cache:
        from evaluate.__main__ import main as evaluate
        from train.__main__ import main as train

        runs = {}
        with one_thread():
            for variant in VARIANTS:
                run = root / variant
                assert train(["--variant", variant, "--shards", str(shards), "--out", str(run), *TRAIN_ARGS]) == 0
                assert evaluate(["--run", str(run), *EVAL_ARGS]) == 0
                runs[variant] = run
        _cache[root] = runs
    return _cache[root]
