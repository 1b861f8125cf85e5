"""COCO and table sources through the Ray job, with tiny random encoders of the real classes.

The COCO-format fixture is written here: real JPEG and PNG files, captions JSON, and every kind of bad
input the job must survive (each either encoded or listed in the manifest's `skipped` with its reason).
"""
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from ifvit.lock import LOCK_FILE
from pipeline.__main__ import main
from pipeline.encoders import END_TOKEN, load_image_codec, load_text_encoder, weights_sha256
from pipeline.reader import ShardSet
from pipeline.sources import CocoSource, Preprocess, TableSource
from pipeline.verify import verify

LONG_CAPTION = "a very long caption about a dog " * 20  # ~140 tokens: truncated to 77 and counted
NON_ASCII = "Ein Hund läuft über die Straße 🐕 日本語のキャプション"
GOOD_CAPTIONS = ["a photo of a cat", "a cat on a sofa", "an orange cat sleeping", "a sleepy cat", "cat",
                 "a pet at home"]


def _image(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    gradient = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
    rgb = (0.7 * gradient + 0.3 * rng.integers(0, 255, (h, w, 3))).astype(np.uint8)
    return Image.fromarray(rgb).convert(mode)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """A 4-level AutoencoderKL with small channels (SD topology: /8, 4 latent channels) and an open_clip
    CLIP with a small text tower and the real vocabulary, saved where the CLI can load them offline."""
    import open_clip
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                  sample_size=256).save_pretrained(root / "vae")
    cfg = dict(embed_dim=32, quick_gelu=True, vision_cfg=dict(image_size=32, layers=1, width=64, patch_size=8),
               text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=2))
    (root / "clip").mkdir()
    (root / "clip" / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    torch.save(open_clip.CLIP(**cfg).state_dict(), root / "clip" / "open_clip_pytorch_model.bin")
    return {"vae": str(root / "vae"), "clip": f"local-dir:{root / 'clip'}"}


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    (root / "annotations").mkdir()
    (root / "train2014").mkdir()
    (root / "val2014").mkdir()
    splits = {"train": {"images": [], "annotations": []}, "val": {"images": [], "annotations": []}}

    def add(split, image_id, file_name, image=None, captions=(), fmt="JPEG", raw=None):
        if raw is not None:
            (root / f"{split}2014" / file_name).write_bytes(raw)
        elif image is not None:
            image.save(root / f"{split}2014" / file_name, format=fmt)
        splits[split]["images"].append({"id": image_id, "file_name": file_name})
        for c in captions:
            ann_id = len(splits["train"]["annotations"]) + len(splits["val"]["annotations"]) + 1
            splits[split]["annotations"].append({"id": ann_id, "image_id": image_id, "caption": c})

    for i in range(1, 7):  # good JPEGs, 5-6 captions each, portrait and landscape
        add("train", i, f"COCO_train2014_{i:012d}.jpg", _image(320 if i % 2 else 240, 240 if i % 2 else 320, seed=i),
            GOOD_CAPTIONS[: 5 + i % 2])
    jpeg = io.BytesIO()
    _image(300, 300, seed=7).save(jpeg, format="JPEG")
    add("train", 20, "truncated.jpg", raw=jpeg.getvalue()[: len(jpeg.getvalue()) // 2], captions=["a truncated jpeg"])
    add("train", 21, "garbage.jpg", raw=b"this is not an image" * 10, captions=["a corrupt jpeg"])
    add("train", 22, "missing.jpg", captions=["a missing file"])
    add("train", 23, "grey.jpg", _image(300, 260, "L", seed=8), ["a greyscale photo", LONG_CAPTION])
    add("train", 24, "cmyk.jpg", _image(280, 300, "CMYK", seed=9), ["a cmyk photo", NON_ASCII])
    add("train", 25, "tiny.png", _image(1, 1), ["a single pixel"], fmt="PNG")
    add("train", 26, "panorama.jpg", _image(1000, 40, seed=10), ["a very wide panorama"])
    add("train", 27, "nocaptions.jpg", _image(300, 300, seed=11))
    add("train", 28, "emptycaption.jpg", _image(300, 300, seed=12), ["", "   ", "one good caption"])
    add("train", 29, "onlyempty.jpg", _image(300, 300, seed=13), ["  "])
    add("train", 1, "COCO_train2014_duplicate.jpg", _image(300, 300, seed=14), ["a duplicate id"])
    splits["train"]["annotations"].append({"id": 999, "image_id": 12345, "caption": "an orphan caption"})
    rgba = _image(256, 300, "RGBA", seed=15)
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 256, dtype=np.uint8), (300, 1))))
    add("val", 30, "rgba.png", rgba, ["a transparent png"], fmt="PNG")
    add("val", 31, "palette.png", _image(300, 300, seed=16).quantize(16), ["a palette png"], fmt="PNG")
    for i in range(32, 34):
        add("val", i, f"COCO_val2014_{i:012d}.png", _image(260, 300, seed=i), GOOD_CAPTIONS[:5], fmt="PNG")
    for split, data in splits.items():
        (root / "annotations" / f"captions_{split}2014.json").write_text(json.dumps(data))
    return root


def coco_args(root, out, encoders, *extra):
    return ["coco", "--coco-root", str(root), "--out", str(out), "--vae", encoders["vae"], "--clip",
            encoders["clip"], "--shard-size", "3", "--batch-size", "4", *extra]


@pytest.fixture(scope="module")
def coco_shards(ray_local, coco_root, encoders, tmp_path_factory):
    """The COCO fixture built the hard way: a CLI job in its own process, SIGKILLed as soon as its first
    shard is written, then the same command run again to finish it. Every test below reads the result."""
    out = tmp_path_factory.mktemp("out") / "coco256"
    cmd = [sys.executable, "-m", "pipeline", *coco_args(coco_root, out, encoders, "--ray-address",
                                                         ray_local.get_runtime_context().gcs_address)]
    job = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 300
    while not list((out / ".staging").glob("*.tar.json")) and job.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGKILL)  # the driver dies mid-job; Ray reaps its tasks and actor
    job.wait()
    KILLED.update(shards_done=len(list((out / ".staging").glob("*.tar.json"))),
                  manifest=(out / "manifest.json").exists(),
                  lock=json.loads((out / LOCK_FILE).read_text()) if (out / LOCK_FILE).exists() else None)
    assert main(coco_args(coco_root, out, encoders)) == 0
    return out


KILLED = {}  # what the killed first run of `coco_shards` had finished


EXPECTED_SKIPS = {  # key -> reason prefix: one per bad input that cannot be encoded
    "000000000020": "unreadable image", "000000000021": "unreadable image", "000000000022": "missing file",
    "000000000025": "too small", "000000000026": "extreme aspect ratio", "000000000027": "no captions",
    "000000000029": "no captions", "000000000001": "duplicate id", "000000012345": "captions for an image id",
}


@pytest.mark.slow
def test_manifest_names_the_encoders(coco_shards, encoders):
    ss = ShardSet(coco_shards)
    image, text = ss.manifest["image_encoder"], ss.manifest["text_encoder"]
    assert image["kind"] == "sd-vae" and image["spec"] == encoders["vae"]
    assert image["weights_sha256"] == weights_sha256(load_image_codec(encoders["vae"]).vae)
    assert text["spec"] == encoders["clip"] and text["kind"] == "clip"
    assert text["weights_sha256"] == weights_sha256(load_text_encoder(encoders["clip"]).model)
    assert image["latent_shape"] == [8, 32, 32] and image["model_latent_shape"] == [4, 32, 32]
    assert (ss.latent_format, ss.latent_channels, ss.latent_size) == ("moments", 4, 32)
    assert (ss.text_len, ss.text_dim) == (77, 64)
    # not the hub VAE, so the paper's 0.23010 does not apply: 1 / measured std
    assert ss.latent_scale == pytest.approx(1 / image["latent_std"])
    assert "LANCZOS" in image["preprocessing"] and "49407" in text["padding"]


@pytest.mark.slow
def test_latents_and_text_states_have_the_contracted_shapes(coco_shards, coco_root, encoders):
    ss = ShardSet(coco_shards)
    annotations = json.loads((coco_root / "annotations" / "captions_train2014.json").read_text())
    per_image = {}
    for ann in annotations["annotations"]:
        per_image.setdefault(ann["image_id"], []).append(ann["caption"])
    train = {r["key"]: r for r in ss.records("train")}
    for i in range(1, 7):  # every caption of every image, not just the first
        record = train[f"{i:012d}"]
        assert record["json"]["captions"] == per_image[i] and record["text"].shape == (len(per_image[i]), 77, 64)
        assert record["latent"].dtype == np.float16 and record["latent"].shape == (8, 32, 32)
        assert record["text"].dtype == np.float16 and "png" not in record
    codec = ss.image_codec()
    for record in ss.records("val"):  # val keeps the preprocessed 256 px image; the moments are its encoding
        pixels = np.asarray(Image.open(io.BytesIO(record["png"])))
        assert pixels.shape == (256, 256, 3)
        moments = codec.encode(torch.from_numpy(pixels.transpose(2, 0, 1).copy())[None])[0]
        torch.testing.assert_close(torch.from_numpy(record["latent"]).float(), moments, atol=2e-2, rtol=1e-2)


@pytest.mark.slow
def test_padding_rule(coco_shards, encoders):
    """Up to the end token: exactly plain open_clip's states (0-padded tokens, causal mask). After it: the
    states of the end token 49407 at those positions (SD/U-ViT), not open_clip's 0-padding states."""
    import open_clip

    record = next(r for r in ShardSet(coco_shards).records("train") if r["key"] == "000000000002")
    name = encoders["clip"]
    model = open_clip.create_model(name).eval()
    tokens = open_clip.get_tokenizer(name)(record["json"]["captions"])

    def states(t):
        with torch.no_grad():
            x = model.token_embedding(t) + model.positional_embedding
            return model.ln_final(model.transformer(x, attn_mask=model.attn_mask))

    plain = states(tokens)
    sd_tokens = tokens.masked_fill(tokens == 0, END_TOKEN)
    sd = states(sd_tokens)
    stored = torch.from_numpy(record["text"]).float()
    for k, t in enumerate(tokens):
        end = int((t == END_TOKEN).nonzero()[0])
        # float16 storage: one half-precision step of tolerance
        torch.testing.assert_close(stored[k, : end + 1], plain[k, : end + 1], atol=4e-3, rtol=2e-3)
        torch.testing.assert_close(stored[k, end + 1:], sd[k, end + 1:], atol=4e-3, rtol=2e-3)
        assert not torch.allclose(stored[k, end + 1:], plain[k, end + 1:], atol=1e-2)


@pytest.mark.slow
def test_every_bad_input_is_encoded_or_listed(coco_shards):
    m = ShardSet(coco_shards).manifest
    keys = {r["key"]: r for split in ("train", "val") for r in ShardSet(coco_shards).records(split)}
    listed = {}
    for entry in m["skipped"]:
        listed.setdefault(entry["key"], []).append(entry["reason"])
    for key, reason in EXPECTED_SKIPS.items():
        assert any(r.startswith(reason) for r in listed.get(key, [])), (key, listed.get(key))
        if key != "000000000001":  # the duplicate's key is the first image's, which is encoded
            assert key not in keys
    converted = {"000000000023": "L", "000000000024": "CMYK", "000000000030": "RGBA", "000000000031": "P"}
    for key, mode in converted.items():
        assert keys[key]["json"]["original_mode"] == mode
    assert listed["000000000028"] == ["empty caption", "empty caption"]
    assert keys["000000000028"]["json"]["captions"] == ["one good caption"]
    assert NON_ASCII in keys["000000000024"]["json"]["captions"]
    assert m["truncated_captions"] == [{"key": "000000000023", "caption": 1, "text": " ".join(LONG_CAPTION.split())}]
    # 21 image entries (one a duplicate id) + 1 orphan caption: 20 inputs to load, 13 encoded
    assert len(keys) == m["counts"]["records"] == 13 and m["counts"]["inputs"] == 20
    white = np.asarray(Image.open(io.BytesIO(keys["000000000030"]["png"])))[:, :8]  # alpha 0 at the left edge
    assert white.min() > 200
    assert main(["verify", str(coco_shards)]) == 0


@pytest.mark.slow
def test_strict_exits_nonzero(coco_shards, coco_root, encoders, capsys):
    assert main(coco_args(coco_root, coco_shards, encoders, "--strict")) == 1
    assert "--strict" in capsys.readouterr().err


@pytest.mark.slow
def test_verify_detects_a_corrupted_shard(coco_shards, tmp_path):
    assert verify(coco_shards)
    copy = tmp_path / "copy"
    shutil.copytree(coco_shards, copy)
    shard = copy / ShardSet(copy).manifest["splits"]["train"]["shards"][0]
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF  # one flipped byte inside the first record
    shard.write_bytes(bytes(data))
    assert main(["verify", str(copy)]) == 1
    shard.unlink()
    assert not verify(copy)


@pytest.mark.slow
def test_killed_job_resumes_with_every_key_once(coco_shards):
    assert KILLED["shards_done"] >= 1 and not KILLED["manifest"]  # killed midway: some shards, no manifest
    # The killed driver's lock stayed behind; the re-run found its holder dead and took it over.
    assert KILLED["lock"] and KILLED["lock"]["host"] == socket.gethostname() and not (coco_shards / LOCK_FILE).exists()
    ss = ShardSet(coco_shards)
    assert KILLED["shards_done"] < len(ss.manifest["shards"])
    keys = [r["key"] for split in ("train", "val") for r in ss.records(split)]
    assert len(keys) == len(set(keys)) == ss.manifest["counts"]["records"] == 13
    assert verify(coco_shards)


@pytest.mark.slow
def test_table_source(ray_local, coco_root, encoders, tmp_path):
    import pandas as pd

    images = coco_root / "train2014"
    rows = pd.DataFrame({
        "id": [1, 2, 3, 3, 4],
        "file_name": [f"COCO_train2014_{i:012d}.jpg" for i in (1, 2, 3, 4, 5)],
        "captions": [["a cat", "a pet"], ["two cats"], ["a dog", "", "a sofa"], ["a duplicate"], ["a bird"]],
        "split": ["train", "train", "val", "val", "test"],
    })
    rows.to_parquet(tmp_path / "t.parquet")
    rows.drop(columns="captions").assign(caption=["x", "y", "z", "w", "v"], caption_2=["x2", "", "z2", "", "v2"]) \
        .to_csv(tmp_path / "t.csv", index=False)
    rows.to_json(tmp_path / "t.jsonl", orient="records", lines=True)

    listed, skipped = TableSource(str(tmp_path / "t.parquet"), str(images)).rows()
    assert [r["captions"] for r in listed] == [["a cat", "a pet"], ["two cats"], ["a dog", "", "a sofa"]]
    assert [s["reason"] for s in skipped] == ["duplicate id 3", "unknown split 'test' (use train or val)"]
    assert TableSource(str(tmp_path / "t.jsonl"), str(images)).rows()[0] == listed
    csv_rows, _ = TableSource(str(tmp_path / "t.csv"), str(images)).rows()
    assert [r["captions"] for r in csv_rows] == [["x", "x2"], ["y", ""], ["z", "z2"]]

    out = tmp_path / "table"
    assert main(["table", "--table", str(tmp_path / "t.parquet"), "--image-root", str(images), "--out", str(out),
                 "--vae", encoders["vae"], "--clip", encoders["clip"], "--batch-size", "4"]) == 0
    ss = ShardSet(out)
    assert ss.splits == ["train", "val"] and ss.manifest["counts"]["records"] == 3
    val = next(ss.records("val"))
    assert val["json"]["captions"] == ["a dog", "a sofa"] and val["text"].shape == (2, 77, 64)
    assert [s["reason"] for s in ss.manifest["skipped"]].count("empty caption") == 1


def test_coco_without_annotations_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="annotations_trainval2014.zip"):
        CocoSource(str(tmp_path)).rows()


def test_preprocess_crops_the_center_square():
    from pipeline.sources import center_square, to_rgb

    wide = np.zeros((100, 300, 3), np.uint8)
    wide[:, 100:200] = 255  # the center square is white, the sides black
    out = np.asarray(center_square(Image.fromarray(wide), 50))
    assert out.shape == (50, 50, 3) and out[:, 2:-2].min() > 240
    assert to_rgb(Image.new("LA", (4, 4), (0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert Preprocess().resolution == 256


def test_local_executor_writes_the_ray_jobs_bytes(coco_shards, coco_root, encoders, tmp_path):
    """The same COCO job (VAE moments, CLIP states, val PNGs, skipped inputs) without Ray: byte-identical shard
    files to the Ray job's killed-and-resumed build."""
    from shard_sets import assert_same_shard_set

    out = tmp_path / "coco256"  # the same folder name: the manifest records it
    assert main(coco_args(coco_root, out, encoders, "--executor", "local", "--workers", "2")) == 0
    assert ShardSet(out).manifest["timing"]["executor"] == "local"
    assert_same_shard_set(out, coco_shards)


def test_a_shards_text_states_do_not_depend_on_the_shards_encoded_before(encoders):
    """The encoder's output for a shard is a function of that shard alone. Its float16 text states may move by
    one ulp with the batch a caption is encoded in (matmul kernels are chosen by shape), so states reused from
    earlier shards made a shard's bytes depend on the order the executor delivered shards in (and on where a
    killed job resumed): the local and the Ray build of one set then differed."""
    from pipeline.stages import EncodeShard

    def encoder():
        return EncodeShard(image_spec="pixels", text_spec=encoders["clip"], batch_size=4, seed=0)

    fresh = encoder().encode_captions(GOOD_CAPTIONS)[0]
    seasoned = encoder()
    seasoned.encode_captions(["a transparent png", "a palette png", *GOOD_CAPTIONS[:5]])  # e.g. a val shard first
    after = seasoned.encode_captions(GOOD_CAPTIONS)[0]
    assert [c for c in GOOD_CAPTIONS if not torch.equal(after[c], fresh[c])] == []
