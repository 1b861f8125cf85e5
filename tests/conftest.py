"""Session fixtures shared by every test file: one local Ray, and a small shapes shard set built once.

    def test_something(shapes_shards):            # Path of a finished shard set (pipeline/reader.ShardSet)
        ss = ShardSet(shapes_shards)               # 256 train / 64 val / 32 holdout at 32 px, random text tower
"""
import logging
import os
import tempfile

# Set before anything imports huggingface_hub: a missed hub call then fails at once instead of retrying
# for 20-45 s.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# FID reference statistics go to the cache folder: a fresh one per session, never the user's ~/.cache/ifvit.
os.environ["IFVIT_CACHE"] = tempfile.mkdtemp(prefix="ifvit-test-cache-")

import pytest  # noqa: E402

SHAPES_FIXTURE = dict(train_images=256, val_images=64, holdout_images=32, seed=0, resolution=32)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (~3-5 s to start). 4 logical CPUs on a 2-core machine: the
    pipeline's fractional-CPU actor plus its load and write tasks must fit without starving each other."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
             object_store_memory=512 << 20)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shapes_shards(request, tmp_path_factory):
    """Path of a small finished shapes shard set (pixels 3x32x32, text [5, 77, 64] from a random tower),
    built by the default executor: the session's Ray where Ray is installed, else the local one (a bare
    GPU machine runs the GPU tests without Ray)."""
    from pipeline.executors import ray_installed
    from pipeline.job import JobConfig, run

    if ray_installed():
        request.getfixturevalue("ray_local")
    from pipeline.sources import Preprocess, ShapesSource

    out = tmp_path_factory.mktemp("shards") / "shapes"
    run(ShapesSource(**SHAPES_FIXTURE),
        JobConfig(out=str(out), image_encoder="pixels", text_encoder="random",
                  preprocess=Preprocess(resolution=32, min_side=32), shard_size=64, batch_size=256))
    return out
