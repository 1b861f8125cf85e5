"""`python -m pipeline uvit-features`: U-ViT's feature folder read back as a standard shard set.

The folder is made here in U-ViT's layout (scripts/extract_mscoco_feature.py): train/ and val/ with {i}.npy
(float32 moments [8, 32, 32]) and {i}_{k}.npy (float32 [77, 768]), empty_context.npy at the root; image i is
the i-th image id of the annotation file in ascending order, its captions in the file's order.
"""
import json
import pickle

import numpy as np
import pytest

from evaluate.fid import FIDUnavailable, reference_statistics
from pipeline.__main__ import main
from pipeline.reader import ShardSet, to_model_input
from pipeline.uvit_features import UViTFeatureSource
from pipeline.verify import verify

MOMENTS, STATES = (8, 32, 32), (77, 768)
# image ids per split in the order the annotation file lists them (not sorted: U-ViT sorts them)
IMAGE_IDS = {"train": [57, 9, 391, 12, 200, 1001], "val": [42, 7, 300]}
BAD = {  # (split, U-ViT index) -> reason prefix of the whole image's skip
    ("train", 3): "unreadable .npy",  # a pickled object array
    ("train", 4): "wrong shape: moments",
    ("val", 2): "missing file",
}


def captions_of(image_id: int) -> list[str]:
    return [f"caption {j} of image {image_id}" for j in range(5 + image_id % 2)]


@pytest.fixture(scope="module")
def feature_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco256_features")
    rng = np.random.default_rng(0)
    expected = {}
    annotations = tmp_path_factory.mktemp("annotations")
    for split, ids in IMAGE_IDS.items():
        (root / split).mkdir()
        anns = [{"id": 1000 * image_id + j, "image_id": image_id, "caption": c}
                for image_id in ids for j, c in enumerate(captions_of(image_id))]
        rng.shuffle(anns)  # file order of the annotations is what pycocotools keeps per image
        (annotations / f"captions_{split}2014.json").write_text(json.dumps(
            {"images": [{"id": i, "file_name": f"{i}.jpg"} for i in ids], "annotations": anns}))
        for i, image_id in enumerate(sorted(ids)):
            moments = rng.standard_normal(MOMENTS).astype(np.float32)
            if (split, i) == ("train", 3):
                np.save(root / split / f"{i}.npy", np.array([{"evil": 1}], dtype=object), allow_pickle=True)
            elif (split, i) == ("train", 4):
                np.save(root / split / f"{i}.npy", moments[:4])
            elif (split, i) != ("val", 2):
                np.save(root / split / f"{i}.npy", moments)
            caps = [a["caption"] for a in anns if a["image_id"] == image_id]
            states = rng.standard_normal((len(caps), *STATES)).astype(np.float32)
            for k, state in enumerate(states):
                if (split, i, k) == ("train", 1, 2):
                    np.save(root / split / f"{i}_{k}.npy", state.astype(np.int32))  # a wrong dtype: caption 2 dropped
                else:
                    np.save(root / split / f"{i}_{k}.npy", state)
            expected[(split, i)] = {"id": image_id, "moments": moments, "states": states, "captions": caps}
    np.save(root / "train" / "99_0.npy", np.zeros(STATES, np.float32))  # states without moments
    (root / "train" / "notes.txt").write_text("not a feature")
    (root / "run_vis").mkdir()  # U-ViT's pickled prompt files: never read
    (root / "run_vis" / "0.npy").write_bytes(pickle.dumps(("a prompt", None)))
    empty = rng.standard_normal(STATES).astype(np.float32)
    np.save(root / "empty_context.npy", empty)
    return root, annotations, expected, empty


def test_features_become_a_shard_set_in_uvit_order(feature_root, tmp_path, capsys):
    root, annotations, expected, empty = feature_root
    out = tmp_path / "uvit"
    assert main(["uvit-features", "--root", str(root), "--out", str(out), "--annotations", str(annotations),
                 "--shard-size", "2", "--workers", "2"]) == 0
    ss = ShardSet(out)
    m = ss.manifest
    assert (ss.latent_format, ss.latent_channels, ss.latent_size, ss.text_dim) == ("moments", 4, 32, 768)
    assert ss.latent_scale == 0.23010 and "U-ViT" in m["image_encoder"]["latent_scale_source"]
    assert m["stores_images"] is False and m["captions_available"] is True
    assert "extract_mscoco_feature" in m["text_encoder"]["encoded_by"] and m["source"]["kind"] == "uvit-features"
    np.testing.assert_array_equal(ss.null_text().numpy(), empty.astype(np.float16).astype(np.float32))

    seen = set()
    for split in ("train", "val"):
        for record in ss.records(split):
            i = record["json"]["uvit_index"]
            want = expected[(split, i)]
            seen.add((split, i))
            assert record["key"] == f"{want['id']:012d}" and record["json"]["id"] == want["id"]
            np.testing.assert_array_equal(record["latent"], want["moments"].astype(np.float16))
            keep = [k for k in range(len(want["captions"])) if (split, i, k) != ("train", 1, 2)]
            assert record["json"]["captions"] == [want["captions"][k] for k in keep]
            np.testing.assert_array_equal(record["text"], want["states"][keep].astype(np.float16))
            assert "png" not in record
    assert seen == set(expected) - set(BAD)

    reasons = {(e.get("split"), e["key"]): e["reason"] for e in m["skipped"]}
    for (split, i), prefix in BAD.items():
        key = f"{expected[(split, i)]['id']:012d}"
        assert reasons[(split, key)].startswith(prefix), reasons
    assert any(e.get("caption") == 2 and "wrong dtype: caption states int32" in e["reason"] for e in m["skipped"])
    assert [e["key"] for e in m["skipped"] if "without an image" in e["reason"]] == ["train-000099"]
    assert any("not a U-ViT feature file" in e["reason"] and "notes.txt" in e["key"] for e in m["skipped"])
    assert m["counts"]["records"] == len(expected) - len(BAD)

    batch = next(iter(ss.loader("train", batch_size=2, num_workers=0)))
    assert to_model_input(batch["latent"], ss.latent_format, ss.latent_scale).shape == (2, 4, 32, 32)
    assert verify(out)
    capsys.readouterr()
    assert main(["uvit-features", "--root", str(root), "--out", str(out), "--annotations", str(annotations),
                 "--shard-size", "2"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_without_annotations_there_are_no_caption_texts(feature_root, tmp_path, capsys):
    root, _, expected, _ = feature_root
    out = tmp_path / "nocaps"
    assert main(["uvit-features", "--root", str(root), "--out", str(out), "--workers", "1",
                 "--vae", str(tmp_path / "autoencoder_kl.pth")]) == 0
    assert "no CLIP score" in capsys.readouterr().out
    ss = ShardSet(out)
    assert ss.manifest["captions_available"] is False and not ss.has_captions
    assert ss.manifest["image_encoder"]["spec"].endswith("autoencoder_kl.pth")
    record = next(ss.records("val"))
    assert record["key"] == "val-000000" and record["json"]["captions"] is None
    assert len(record["json"]["caption_files"]) == len(record["text"]) == len(expected[("val", 0)]["states"])
    assert verify(out)
    with pytest.raises(FIDUnavailable, match="--fid-ref"):
        reference_statistics(ss, features=None)


def test_wrong_inputs_are_one_line_errors(feature_root, tmp_path, capsys):
    root, annotations, _, _ = feature_root
    wrong = tmp_path / "captions_train2014.json"
    wrong.write_text(json.dumps({"images": [{"id": 1}], "annotations": []}))
    assert main(["uvit-features", "--root", str(root), "--out", str(tmp_path / "a"), "--captions-train", str(wrong),
                 "--captions-val", str(annotations / "captions_val2014.json")]) == 2
    assert "lists 1 images" in capsys.readouterr().err
    assert main(["uvit-features", "--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "b")]) == 2
    assert main(["uvit-features", "--root", str(root), "--out", str(tmp_path / "c"), "--captions-train",
                 str(wrong)]) == 2
    assert "both" in capsys.readouterr().err


def test_uvit_caption_order_is_file_order_per_image(feature_root):
    _, annotations, expected, _ = feature_root
    source = UViTFeatureSource(str(feature_root[0]), {s: str(annotations / f"captions_{s}2014.json")
                                                      for s in ("train", "val")})
    rows, _ = source.rows()
    row = next(r for r in rows if r["split"] == "val" and r["index"] == 0)
    assert row["id"] == min(IMAGE_IDS["val"]) and row["captions"] == expected[("val", 0)]["captions"]


def test_a_run_on_uvit_features_evaluates_and_says_what_is_missing(feature_root, tmp_path, capsys):
    """Train two steps on the converted set (no captions), evaluate decoding with an ldm FILE.pth through
    --vae: FID and CLIP score are skipped with the fix (--fid-ref, --annotations); samples are written."""
    import torch

    from evaluate.__main__ import main as evaluate
    from test_ldm_vae import tiny_vae, to_ldm
    from tiny_runs import TRAIN_ARGS, one_thread
    from train.__main__ import main as train

    root, _, _, _ = feature_root
    shards, run, vae_file = tmp_path / "set", tmp_path / "run", tmp_path / "autoencoder_kl.pth"
    torch.save(to_ldm(tiny_vae().state_dict(), levels=3), vae_file)
    assert main(["uvit-features", "--root", str(root), "--out", str(shards), "--workers", "1"]) == 0
    with one_thread():
        assert train(["--variant", "early_concat", "--shards", str(shards), "--out", str(run), *TRAIN_ARGS]) == 0
        assert evaluate(["--run", str(run), "--num-samples", "2", "--steps", "2", "--batch-size", "2",
                         "--vae", str(vae_file)]) == 0
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["fid"] is None and "--fid-ref" in metrics["fid_skipped"]
    assert metrics["clip_score"] is None and "--annotations" in metrics["clip_skipped"]
    assert metrics["decoder"] == str(vae_file) and metrics["num_samples"] == 2
    index = [json.loads(line) for line in (run / "eval" / "samples" / "index.jsonl").read_text().splitlines()]
    assert [e["prompt"] for e in index] == [None, None]
    from train.data import preview_prompts

    labels, text = preview_prompts(ShardSet(shards), 2)  # training previews of such a set label by key
    assert labels == ["val-000000 caption 0", "val-000001 caption 0"] and text.shape == (2, 77, 768)
