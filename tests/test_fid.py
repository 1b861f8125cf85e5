"""FID through torch-fidelity, offline, with a registered tiny seeded feature extractor."""
import io
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

from evaluate import fid as fid_module
from evaluate.fid import FIDFeatures, FIDUnavailable, frechet_distance, reference_statistics, statistics
from evaluate_helpers import register_tiny_fid


@pytest.fixture(scope="module")
def features():
    return FIDFeatures(device="cpu", extractor=register_tiny_fid())


def random_images(n, seed, shift=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 200, (n, 3, 32, 32), generator=g) + shift
    return x.clamp(0, 255).to(torch.uint8)


def test_identical_sets_give_zero_and_shifted_sets_more(features):
    a = statistics(features(random_images(128, 0)))
    assert abs(frechet_distance(a, statistics(features(random_images(128, 0))))) < 1e-4
    same_distribution = frechet_distance(a, statistics(features(random_images(128, 1))))
    shifted = frechet_distance(a, statistics(features(random_images(128, 1, shift=40))))
    more_shifted = frechet_distance(a, statistics(features(random_images(128, 1, shift=80))))
    assert shifted > 10 * same_distribution
    assert more_shifted > shifted


def test_statistics_are_torch_fidelitys_dtypes(features):
    stats = statistics(features(random_images(8, 0)))
    assert stats["mu"].dtype == np.float32 and stats["sigma"].dtype == np.float64
    with pytest.raises(ValueError, match="at least 2"):
        statistics(features(random_images(1, 0)))


def _png(image: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


class FakeShardSet:
    """What reference_statistics reads of a ShardSet: path, manifest, records(split) with png members."""

    def __init__(self, path, images, manifest):
        self.path, self.images, self.manifest, self.reads = path, images, manifest, 0

    def records(self, split):
        self.reads += 1
        for i, image in enumerate(self.images):
            yield {"key": f"{split}-{i}", "json": {}, "png": _png(image)}
        yield {"key": "no-png", "json": {}}  # reported and left out, never a crash


def test_reference_statistics_cached_and_invalidated(tmp_path, features, capsys):
    ss = FakeShardSet(tmp_path, random_images(40, 0), {"config_hash": "aaa", "shards": {"s0": "sha1"}})
    first = reference_statistics(ss, features, "val", batch_size=16)
    assert ss.reads == 1 and (tmp_path / "fid_reference" / f"val-{features.name}.npz").is_file()
    assert "no png member" in capsys.readouterr().out
    # Same images as a direct computation: the PNG round trip is lossless.
    direct = statistics(features(random_images(40, 0)))
    assert np.allclose(first["mu"], direct["mu"]) and np.allclose(first["sigma"], direct["sigma"])

    again = reference_statistics(ss, features, "val")
    assert ss.reads == 1  # served from the cache
    assert np.array_equal(again["sigma"], first["sigma"])

    # The set is rebuilt with other images: a new manifest (checksums) must invalidate the cache.
    ss.images, ss.manifest = random_images(40, 5, shift=50), {"config_hash": "aaa", "shards": {"s0": "sha2"}}
    changed = reference_statistics(ss, features, "val")
    assert ss.reads == 2
    assert np.allclose(changed["mu"], statistics(features(ss.images))["mu"])
    assert not np.allclose(changed["mu"], first["mu"])
    assert "older version of the shard set" in capsys.readouterr().out
    reference_statistics(ss, features, "val")
    assert ss.reads == 2


def test_missing_inception_weights_name_the_fix(tmp_path, monkeypatch):
    with pytest.raises(FIDUnavailable, match="--inception-weights"):
        FIDFeatures(weights_path=tmp_path / "nope.pth", device="cpu")

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(fid_module.torch_fidelity.utils, "create_feature_extractor", offline)
    with pytest.raises(FIDUnavailable, match="network access.*--inception-weights"):
        FIDFeatures(device="cpu")
