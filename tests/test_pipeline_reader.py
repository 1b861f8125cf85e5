"""The shapes shard set (session fixture) read back through pipeline.reader: the trainer's contract."""
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import shapes
from pipeline.job import JobConfig, run
from pipeline.reader import ShardSet, to_model_input
from pipeline.sources import Preprocess, ShapesSource


def test_manifest_describes_the_set(shapes_shards):
    ss = ShardSet(shapes_shards)
    m = ss.manifest
    assert ss.splits == ["train", "val", "holdout"]
    assert [m["splits"][s]["records"] for s in ss.splits] == [256, 64, 32]
    assert m["splits"]["train"]["captions"] == 5 * 256
    assert (ss.latent_format, ss.latent_channels, ss.latent_size, ss.latent_scale) == ("pixels", 3, 32, 1.0)
    assert (ss.text_len, ss.text_dim) == (77, 64)
    assert m["image_encoder"]["latent_shape"] == [3, 32, 32] and m["image_encoder"]["dtype"] == "float16"
    assert 0.1 < m["image_encoder"]["latent_std"] < 1.0
    assert m["text_encoder"]["spec"] == "local-dir:text_encoder" and len(m["text_encoder"]["weights_sha256"]) == 64
    assert m["skipped"] == [] and m["counts"]["records"] == 352
    assert set(m["shards"]) == {n for s in m["splits"].values() for n in s["shards"]}
    assert not (shapes_shards / ".staging").exists()


def test_records_hold_the_generator_output(shapes_shards):
    ss = ShardSet(shapes_shards)
    encoder = ss.text_encoder()
    for record in list(ss.records("val"))[:3]:
        index = record["json"]["id"]
        source = ss.manifest["source"]
        example = shapes.make_example("val", index, source["seed"], source["resolution"])
        pixels = np.asarray(example.image).transpose(2, 0, 1)
        assert record["key"] == example.key and record["json"]["scene"] == example.scene
        assert record["json"]["captions"] == example.captions
        assert record["latent"].dtype == np.float16 and record["latent"].shape == (3, 32, 32)
        np.testing.assert_array_equal(record["latent"], (pixels / 127.5 - 1).astype(np.float16))
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(record["png"]))).transpose(2, 0, 1), pixels)
        assert record["text"].dtype == np.float16 and record["text"].shape == (5, 77, 64)
        np.testing.assert_array_equal(record["text"], encoder(example.captions).half().numpy())
    assert all("png" not in r for r in list(ss.records("train"))[:2])  # train keeps no image copy


def test_null_text_is_the_empty_caption(shapes_shards):
    ss = ShardSet(shapes_shards)
    null = ss.null_text()
    assert null.dtype == torch.float32 and null.shape == (77, 64)
    torch.testing.assert_close(null, ss.text_encoder()([""])[0].half().float())
    assert null.abs().sum() > 0


def test_loader_batches_are_fixed_shape_and_seeded(shapes_shards):
    ss = ShardSet(shapes_shards)

    def first_batches(seed, n=3):
        it = iter(ss.loader("train", batch_size=16, seed=seed, num_workers=0, shuffle_buffer=64))
        return [next(it) for _ in range(n)]

    a, b, c = first_batches(0), first_batches(0), first_batches(1)
    for batch in a:
        assert batch["latent"].shape == (16, 3, 32, 32) and batch["latent"].dtype == torch.float16
        assert batch["text"].shape == (16, 77, 64) and batch["text"].dtype == torch.float16
        assert all(k.startswith("shapes-train-") for k in batch["key"])
    assert [x["key"] for x in a] == [x["key"] for x in b]
    assert all(torch.equal(x["text"], y["text"]) for x, y in zip(a, b))
    assert [x["key"] for x in a] != [x["key"] for x in c]


def test_loader_picks_one_of_the_records_captions(shapes_shards):
    ss = ShardSet(shapes_shards)
    texts = {r["key"]: r["text"] for r in ss.records("train")}
    batch = next(iter(ss.loader("train", batch_size=32, num_workers=0)))
    for key, text in zip(batch["key"], batch["text"].numpy()):
        assert any(np.array_equal(text, candidate) for candidate in texts[key])


def test_loader_splits_by_node_and_worker(shapes_shards, monkeypatch):
    ss = ShardSet(shapes_shards)

    def keys(rank, resampled, num_workers=0):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        loader = ss.loader("train", batch_size=1, num_workers=num_workers, resampled=resampled)
        if resampled:
            it = iter(loader)
            return [next(it)["key"][0] for _ in range(32)]
        return [b["key"][0] for b in loader]

    rank0, rank1 = keys(0, False), keys(1, False)
    assert len(rank0) == len(rank1) == 128 and not set(rank0) & set(rank1)  # 4 shards: 2 per rank
    assert len(set(keys(0, False, num_workers=2))) == 128  # its 2 shards split over 2 workers, none repeated
    assert keys(0, True) != keys(1, True)  # resampled: each rank draws its own stream


def test_to_model_input():
    mean, logvar = torch.randn(2, 4, 8, 8), torch.full((2, 4, 8, 8), -2.0)
    moments = torch.cat([mean, logvar], 1).half()
    z = to_model_input(moments, "moments", 0.5, torch.Generator().manual_seed(0))
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(z, (mean.half().float() + np.exp(-1.0) * eps) * 0.5)
    assert z.dtype == torch.float32 and z.shape == (2, 4, 8, 8)
    torch.testing.assert_close(to_model_input(moments[:, :3], "pixels", 1.0), moments[:, :3].float())
    with pytest.raises(ValueError, match="latent format"):
        to_model_input(moments, "latents", 1.0)


def test_rerun_returns_without_rewriting(shapes_shards, capsys):
    options = {k: v for k, v in ShardSet(shapes_shards).manifest["source"].items() if k != "kind"}
    before = {p: p.stat().st_mtime_ns for p in shapes_shards.rglob("*")}
    run(ShapesSource(**options),
        JobConfig(out=str(shapes_shards), image_encoder="pixels", text_encoder="random",
                  preprocess=Preprocess(resolution=32, min_side=32), shard_size=64))
    assert "up to date" in capsys.readouterr().out
    assert before == {p: p.stat().st_mtime_ns for p in shapes_shards.rglob("*")}
    with pytest.raises(FileExistsError, match="other options"):
        run(ShapesSource(**{**options, "seed": 1}),
            JobConfig(out=str(shapes_shards), image_encoder="pixels", text_encoder="random",
                      preprocess=Preprocess(resolution=32, min_side=32), shard_size=64))


def test_missing_manifest_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="make shards"):
        ShardSet(tmp_path)
    assert not os.listdir(tmp_path)
