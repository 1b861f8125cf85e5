"""FID through torch-fidelity, offline, with a registered tiny seeded feature extractor."""
import io
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

from evaluate import fid as fid_module
from evaluate.fid import (FIDFeatures, FIDReferenceError, FIDUnavailable, frechet_distance, load_statistics,
                          reference_statistics, save_statistics, statistics)
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


def test_a_shard_set_without_images_asks_for_a_reference_file(tmp_path, features):
    ss = FakeShardSet(tmp_path, random_images(4, 0), {"stores_images": False, "shards": {}})
    with pytest.raises(FIDUnavailable, match="--fid-ref FILE.npz"):
        reference_statistics(ss, features, "val")
    assert ss.reads == 0  # refused before reading the split


def test_missing_inception_weights_name_the_fix(tmp_path, monkeypatch):
    with pytest.raises(FIDUnavailable, match="--inception-weights"):
        FIDFeatures(weights_path=tmp_path / "nope.pth", device="cpu")

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(fid_module.torch_fidelity.utils, "create_feature_extractor", offline)
    with pytest.raises(FIDUnavailable, match="network access.*--inception-weights"):
        FIDFeatures(device="cpu")


# -- reference statistics files (pytorch-fid's format) ---------------------------------------------------

def pytorch_fid_style_file(path, features_np):
    """What pytorch-fid (and U-ViT's tools/fid_score.py) writes: float64 activations, np.mean / np.cov."""
    act = features_np.astype(np.float64)
    np.savez(path, mu=np.mean(act, axis=0), sigma=np.cov(act, rowvar=False))
    return path


def test_fid_against_an_npz_equals_fid_from_the_same_features(tmp_path, features):
    generated, reference = features(random_images(64, 0)), features(random_images(64, 1, shift=30))
    direct = frechet_distance(statistics(generated), statistics(reference))
    assert direct > 1e-3
    # Ours: written with save_statistics, read back without a warning.
    ours, warning = load_statistics(save_statistics(tmp_path / "ours.npz", statistics(reference), features.name),
                                    features)
    assert warning is None
    assert frechet_distance(statistics(generated), ours) == pytest.approx(direct, rel=1e-9)
    # pytorch-fid's / U-ViT's: float64 mu, no `features` entry -> used, with the resize warning.
    foreign, warning = load_statistics(pytorch_fid_style_file(tmp_path / "theirs.npz", reference.numpy()), features)
    assert "pytorch-fid" in warning and "--fid-features pytorch-fid" in warning
    assert frechet_distance(statistics(generated), foreign) == pytest.approx(direct, rel=1e-5)


def test_saved_statistics_are_pytorch_fids_format(tmp_path, features):
    path = save_statistics(tmp_path / "s.npz", statistics(features(random_images(8, 0))), features.name)
    with np.load(path, allow_pickle=False) as f:  # as pytorch-fid reads it: f["mu"][:], f["sigma"][:]
        assert f["mu"].dtype == np.float64 and f["sigma"].dtype == np.float64
        assert f["mu"].shape == (16,) and f["sigma"].shape == (16, 16)
        assert str(f["features"]) == features.name


def test_unusable_reference_files_are_refused_with_the_reason(tmp_path, features):
    mu, sigma = np.zeros(16), np.eye(16)
    cases = {
        "missing.npz": None,
        "no_sigma.npz": dict(mu=mu),
        "pickled.npz": dict(mu=np.array([{"x": 1}], dtype=object), sigma=sigma),
        "shape.npz": dict(mu=mu, sigma=np.eye(15)),
        "width.npz": dict(mu=np.zeros(2048), sigma=np.eye(2048)),
        "ints.npz": dict(mu=mu.astype(np.int64), sigma=sigma),
        "nan.npz": dict(mu=np.full(16, np.nan), sigma=sigma),
        "other_features.npz": dict(mu=mu, sigma=sigma, features=np.array("inception-v3-compat")),
    }
    expected = {"missing.npz": "no FID reference file", "no_sigma.npz": "has no sigma",
                "pickled.npz": "not a readable statistics", "shape.npz": "are not", "width.npz": "2048-d",
                "ints.npz": "int64", "nan.npz": "non-finite", "other_features.npz": "--fid-features inception"}
    for name, arrays in cases.items():
        if arrays is not None:
            np.savez(tmp_path / name, **arrays)  # np.savez pickles object arrays: the file itself is fine
        with pytest.raises(FIDReferenceError, match=expected[name]):
            load_statistics(tmp_path / name, features)
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(FIDReferenceError, match="not a readable"):
        load_statistics(tmp_path / "text.npz", features)


def test_pytorch_fid_features_are_pytorch_fids_own(tmp_path, monkeypatch):
    """Our pytorch-fid path gives pytorch-fid's activations for the PNGs of the same images (random weights)."""
    pfi = pytest.importorskip("pytorch_fid.inception")
    from pytorch_fid.fid_score import calculate_frechet_distance, get_activations

    built = []

    def recording(*args, **kwargs):  # the network fid_inception_v3 builds, so its "download" can be faked
        built.append(original(*args, **kwargs))
        return built[-1]

    original = pfi._inception_v3
    monkeypatch.setattr(pfi, "_inception_v3", recording)
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: built[-1].state_dict())
    torch.manual_seed(0)
    features = FIDFeatures(device="cpu", extractor=fid_module.PYTORCH_FID)
    images = random_images(4, 3)
    files = []
    for i, image in enumerate(images):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(files[-1])
    theirs = get_activations(files, features.model, batch_size=4, dims=2048, device="cpu", num_workers=0)
    ours = features(images)
    assert ours.shape == (4, 2048) and features.dims == 2048
    assert np.allclose(ours.numpy(), theirs, rtol=1e-4, atol=1e-5)
    # ... and the distance is pytorch-fid's (its sqrtm against torch-fidelity's eigenvalues).
    rng = np.random.default_rng(0)
    sa, sb = ({"mu": x.mean(0), "sigma": np.cov(x, rowvar=False)}
              for x in (rng.normal(0, 1, (200, 16)), rng.normal(0.3, 1.2, (200, 16))))
    assert frechet_distance(sa, sb) == pytest.approx(calculate_frechet_distance(sa["mu"], sa["sigma"], sb["mu"],
                                                                                sb["sigma"]), rel=1e-6)


def test_pytorch_fid_features_without_the_package_name_the_fix(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_pytorch_fid(name, *args, **kwargs):
        if name.startswith("pytorch_fid"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pytorch_fid)
    with pytest.raises(FIDUnavailable, match="pip install pytorch-fid"):
        FIDFeatures(device="cpu", extractor=fid_module.PYTORCH_FID)
