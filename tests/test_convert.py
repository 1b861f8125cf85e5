"""train.convert: U-ViT and fork checkpoints in and out, tensor for tensor.

The foreign checkpoints here are random tensors under the names and shapes U-ViT's and the fork's modules
register (written out below from reading baofff/U-ViT and zizhao-hu/U-ViT, independently of
train/uvit_format.py), so the converter is checked against a separate statement of the layout.
"""
from pathlib import Path

import pytest
import torch

from train.checkpoint import load_run
from train.convert import main as convert
from train.model import PAPER, UViT, count_params, variant_config, variant_name

# A tiny geometry; 256 patches because the fork's cross-attention file hard-codes 257 query tokens.
W, HEADS, C, P, IMG, T, D = 16, 2, 4, 2, 32, 8, 16
HIDDEN, L = 4 * W, (IMG // P) ** 2
FLAGS = ["--heads", str(HEADS), "--text-len", str(T)]


def block(prefix: str, skip: bool, split_qkv: bool, w: int = W, hidden: int = HIDDEN) -> dict:
    """The tensors of one U-ViT Block (libs/uvit_t2i*.py): pre-norm attention + timm Mlp (+ skip_linear)."""
    out = {f"{prefix}.norm1.weight": (w,), f"{prefix}.norm1.bias": (w,),
           f"{prefix}.norm2.weight": (w,), f"{prefix}.norm2.bias": (w,),
           f"{prefix}.attn.proj.weight": (w, w), f"{prefix}.attn.proj.bias": (w,),
           f"{prefix}.mlp.fc1.weight": (hidden, w), f"{prefix}.mlp.fc1.bias": (hidden,),
           f"{prefix}.mlp.fc2.weight": (w, hidden), f"{prefix}.mlp.fc2.bias": (w,)}
    if split_qkv:  # libs/uvit_t2i_cross.py
        out |= {f"{prefix}.attn.q.weight": (w, w), f"{prefix}.attn.kv.weight": (2 * w, w)}
    else:
        out[f"{prefix}.attn.qkv.weight"] = (3 * w, w)
    if skip:
        out |= {f"{prefix}.skip_linear.weight": (w, 2 * w), f"{prefix}.skip_linear.bias": (w,)}
    return out


def foreign_shapes(source: str, c: int = 0, v: int = 0, xattn: bool = False, half: int = 6, w: int = W,
                   chans: int = C, patch: int = P, img: int = IMG, text_len: int = T, text_dim: int = D) -> dict:
    """{name: shape} of a U-ViT (source "uvit") or fork ("uvit-fusion", c caption blocks, v image blocks per
    side, xattn = the cross-attention file) text-to-image network with `half` blocks per side of the U."""
    hidden, patches = 4 * w, (img // patch) ** 2
    out = {"pos_embed": (1, 1 + text_len + patches, w), "patch_embed.proj.weight": (w, chans, patch, patch),
           "patch_embed.proj.bias": (w,), "context_embed.weight": (w, text_dim), "context_embed.bias": (w,),
           "norm.weight": (w,), "norm.bias": (w,), "decoder_pred.weight": (patch * patch * chans, w),
           "decoder_pred.bias": (patch * patch * chans,), "final_layer.weight": (chans, chans, 3, 3),
           "final_layer.bias": (chans,)}
    kw = dict(split_qkv=xattn, w=w, hidden=hidden)
    out |= block("mid_block", False, **kw)
    if source == "uvit":
        for i in range(half):
            out |= block(f"in_blocks.{i}", False, **kw) | block(f"out_blocks.{i}", True, **kw)
        return out
    for i in range(c):
        out |= block(f"caption_blocks.{i}", False, **kw)
    for i in range(v):
        out |= block(f"image_blocks.{i}", False, **kw) | block(f"image_skip_blocks.{i}", True, **kw)
    for i in range(half - v):
        out |= block(f"joint_blocks.{i}", False, **kw) | block(f"joint_skip_blocks.{i}", True, **kw)
    return out


def random_checkpoint(shapes: dict, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


# (variant, source, c, v, xattn of the foreign file)
CASES = [
    ("early_concat", "uvit", 0, 0, False),
    ("early_concat", "uvit-fusion", 0, 0, False),
    ("early_xattn", "uvit-fusion", 0, 0, True),
    ("if_concat", "uvit-fusion", 1, 4, False),
    ("if_xattn", "uvit-fusion", 1, 4, True),
    ("if_concat_t0i4", "uvit-fusion", 0, 4, False),
    ("if_concat_t1i0", "uvit-fusion", 1, 0, False),
    ("if_xattn_t0i4", "uvit-fusion", 0, 4, True),
    ("if_xattn_t1i0", "uvit-fusion", 1, 0, True),
]


def test_the_official_checkpoint_layout_has_u_vits_parameter_count():
    shapes = foreign_shapes("uvit", w=512, text_dim=768, text_len=77)  # configs/mscoco_uvit_small.py
    total = sum(torch.Size(s).numel() for s in shapes.values())
    assert total == 44_692_644
    with torch.device("meta"):
        assert count_params(UViT(PAPER)) == total


@pytest.mark.parametrize("variant, source, c, v, xattn", CASES, ids=[f"{c[1]}:{c[0]}" for c in CASES])
def test_round_trip_loads_strictly_and_gives_back_the_same_tensors(variant, source, c, v, xattn, tmp_path):
    foreign = random_checkpoint(foreign_shapes(source, c, v, xattn))
    path = tmp_path / "ckpts" / "1000.ckpt" / "nnet_ema.pth"  # U-ViT's folder, DDP-prefixed names
    path.parent.mkdir(parents=True)
    torch.save({f"module.{k}": t for k, t in foreign.items()}, path)

    run = tmp_path / "run"
    assert convert(["--from", source, str(path.parent), "--variant", variant, "--out", str(run), *FLAGS]) == 0
    model, config = load_run(run)  # load_state_dict(strict=True) inside
    assert variant_name(model.cfg) == config["variant"] == variant and model.cfg.time_label_offset == 1
    assert config["converted_from"]["source"] == source and config["converted_from"]["step"] == 1000
    assert config["train"]["prediction"] == "epsilon" and config["shards"] is None

    back = tmp_path / "back.pth"
    assert convert(["--to", source, str(run), str(back)]) == 0
    exported = torch.load(back, weights_only=True)
    assert exported.keys() == foreign.keys()
    assert all(torch.equal(exported[k], foreign[k]) for k in foreign)


def test_the_config_decides_where_shapes_cannot_tell(tmp_path, capsys):
    """U-ViT's layout holds early_concat's tensors, which are also early_xattn's and t0i4's."""
    path = tmp_path / "uvit.pth"
    torch.save({f"_orig_mod.{k}": t for k, t in random_checkpoint(foreign_shapes("uvit")).items()}, path)
    for variant in ("early_xattn", "if_concat_t0i4"):
        assert convert(["--from", "uvit", str(path), "--variant", variant, "--out", str(tmp_path / variant),
                        *FLAGS]) == 0
        assert load_run(tmp_path / variant)[0].cfg == variant_config(variant, in_chans=C, img_size=IMG,
                                                                     patch_size=P, width=W, heads=HEADS,
                                                                     text_len=T, text_dim=D, time_label_offset=1)
    assert "U-ViT's libs/uvit_t2i.py computes early_concat" in capsys.readouterr().out
    assert convert(["--from", "uvit", str(path), "--out", str(tmp_path / "default"), *FLAGS]) == 0
    assert load_run(tmp_path / "default")[1]["variant"] == "early_concat"


def test_pos_embed_rows_are_reordered_from_the_forks_token_order(tmp_path):
    """Fork rows are [patches ; time ; caption], ours [time ; caption ; patches]: label row i with i."""
    foreign = random_checkpoint(foreign_shapes("uvit-fusion", 1, 4))
    rows = foreign["pos_embed"].shape[1]
    foreign["pos_embed"] = torch.arange(rows, dtype=torch.float32)[None, :, None].expand(1, rows, W).clone()
    torch.save(foreign, tmp_path / "fork.pth")
    assert convert(["--from", "uvit-fusion", str(tmp_path / "fork.pth"), "--out", str(tmp_path / "run"), *FLAGS]) == 0
    pos = load_run(tmp_path / "run")[0].pos_embed[0, :, 0]
    assert pos[0] == L  # the time token's row follows the patches in the fork
    assert pos[1:1 + T].tolist() == list(range(L + 1, L + 1 + T))  # then the caption's
    assert pos[1 + T:].tolist() == list(range(L))  # the patches come first there


def test_u_vits_rows_are_already_in_our_order(tmp_path):
    foreign = random_checkpoint(foreign_shapes("uvit"))
    foreign["pos_embed"] = torch.arange(1 + T + L, dtype=torch.float32)[None, :, None].expand(1, -1, W).clone()
    torch.save(foreign, tmp_path / "uvit.pth")
    assert convert(["--from", "uvit", str(tmp_path / "uvit.pth"), "--out", str(tmp_path / "run"), *FLAGS]) == 0
    assert load_run(tmp_path / "run")[0].pos_embed[0, :, 0].tolist() == list(range(1 + T + L))


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("foreign_args, source, variant, words", [
    (("uvit-fusion", 1, 4, False), "uvit-fusion", "early_concat", "fit --variant if_concat"),
    (("uvit-fusion", 1, 4, False), "uvit-fusion", "if_xattn", "fit --variant if_concat"),
    (("uvit-fusion", 0, 4, True), "uvit-fusion", "if_xattn", "fit --variant if_xattn_t0i4"),
    (("uvit-fusion", 1, 4, True), "uvit", "early_concat", "pass --from uvit-fusion --variant if_xattn"),
    (("uvit", 0, 0, False), "uvit-fusion", "early_concat", "pass --from uvit --variant early_concat"),
    (("uvit", 0, 0, False), "uvit", "if_concat", "fits --variant early_concat"),
], ids=["fork-as-early_concat", "concat-as-xattn", "t0i4-as-if_xattn", "fork-as-uvit", "uvit-as-fork",
        "uvit-as-if_concat"])
def test_a_wrong_variant_is_refused_naming_the_one_that_fits(foreign_args, source, variant, words, tmp_path, capsys):
    torch.save(random_checkpoint(foreign_shapes(*foreign_args)), tmp_path / "ckpt.pth")
    out = tmp_path / "run"
    assert convert(["--from", source, str(tmp_path / "ckpt.pth"), "--variant", variant, "--out", str(out),
                    *FLAGS]) == 2
    assert words in one_error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("extra, words", [
    ({"time_embed.0.weight": (4 * W, W)}, "mlp_time_embed=True"),
    ({"in_blocks.0.attn.qkv.bias": (3 * W,)}, "qkv_bias=True"),
])
def test_u_vit_options_this_model_lacks_are_refused(extra, words, tmp_path, capsys):
    torch.save(random_checkpoint(foreign_shapes("uvit") | extra), tmp_path / "ckpt.pth")
    assert convert(["--from", "uvit", str(tmp_path / "ckpt.pth"), "--out", str(tmp_path / "run"), *FLAGS]) == 2
    assert words in one_error_line(capsys)


def _write_marker(path):
    Path(path).write_text("pickled code ran")


class RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return _write_marker, (self.marker,)


def test_a_checkpoint_carrying_a_pickled_object_is_refused_without_running_it(tmp_path, capsys):
    marker = tmp_path / "marker"
    state = random_checkpoint(foreign_shapes("uvit")) | {"extra": RunsCodeWhenUnpickled(marker)}
    torch.save(state, tmp_path / "evil.pth")
    assert convert(["--from", "uvit", str(tmp_path / "evil.pth"), "--out", str(tmp_path / "run"), *FLAGS]) == 2
    line = one_error_line(capsys)
    assert "needs pickled Python objects" in line and "_write_marker" in line and "refused unread" in line
    assert not marker.exists() and not (tmp_path / "run").exists()
    torch.load(tmp_path / "evil.pth", weights_only=False)  # the object is real: unpickled freely, it runs
    assert marker.read_text() == "pickled code ran"


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path, capsys):
    for i, data in enumerate([b"hello", bytes(range(256)) * 4]):
        (tmp_path / f"{i}.pth").write_bytes(data)
        assert convert(["--from", "uvit", str(tmp_path / f"{i}.pth"), "--out", str(tmp_path / "run")]) == 2
        assert "is not a readable torch checkpoint" in one_error_line(capsys)


def test_dtypes_are_checked(tmp_path, capsys):
    state = random_checkpoint(foreign_shapes("uvit"))
    state["norm.weight"] = state["norm.weight"].long()
    torch.save(state, tmp_path / "int.pth")
    assert convert(["--from", "uvit", str(tmp_path / "int.pth"), "--out", str(tmp_path / "run"), *FLAGS]) == 2
    assert "norm.weight has dtype torch.int64" in one_error_line(capsys)


def _our_run(tmp_path, variant, train=None, **geometry):
    from train.run_dir import RunDir

    geometry = dict(in_chans=C, img_size=IMG, patch_size=P, width=W, heads=HEADS, text_len=T, text_dim=D) | geometry
    cfg = variant_config(variant, **geometry)
    run = RunDir.create(tmp_path / variant, {"model": cfg.to_dict(), "train": train or {}})
    state = UViT(cfg).state_dict()
    run.save_checkpoint({"model": state, "ema": state, "step": 3})
    return run.path


@pytest.mark.parametrize("variant, target, train, geometry, words", [
    ("early_xattn", "uvit", {}, {}, "only joint self-attention"),
    ("if_concat", "uvit", {}, {}, "no text-only or image-only blocks"),
    ("if_concat", "uvit-fusion", {"prediction": "v"}, {}, "trained with prediction 'v'"),
    ("early_concat", "uvit", {"text_norm": "token"}, {}, "trained with text_norm 'token'"),
    ("early_concat", "uvit", {"image_norm": "channel"}, {}, "trained with image_norm 'channel'"),
    ("if_xattn", "uvit-fusion", {}, {"patch_size": 4}, "only at 256 patches"),
])
def test_export_refuses_what_the_target_cannot_compute(variant, target, train, geometry, words, tmp_path, capsys):
    run = _our_run(tmp_path, variant, train, **geometry)
    assert convert(["--to", target, str(run), str(tmp_path / "out.pth")]) == 2
    assert words in one_error_line(capsys)
    assert not (tmp_path / "out.pth").exists()


def test_export_of_a_run_trained_here_says_the_labels_are_off_by_one(tmp_path, capsys):
    run = _our_run(tmp_path, "if_concat")
    assert convert(["--to", "uvit-fusion", str(run), str(tmp_path / "out.pth")]) == 0
    out = capsys.readouterr().out
    assert "off by one" in out and "c=1, v=4" in out and "depth=12" in out
    assert torch.load(tmp_path / "out.pth", weights_only=True).keys() == foreign_shapes("uvit-fusion", 1, 4).keys()


@pytest.mark.parametrize("argv, words", [
    ([], "say which way"),
    (["--from", "uvit", "{tmp}/none.pth", "--out", "{tmp}/run"], "no checkpoint at"),
    (["--from", "uvit", "{tmp}", "--out", "{tmp}/run"], "without nnet_ema.pth"),
    (["--from", "uvit", "{tmp}/none.pth", "--to", "uvit"], "not both"),
    (["--from", "uvit", "{tmp}/none.pth"], "required: --out"),
    (["--to", "uvit", "{tmp}/none", "{tmp}/out.pth"], "no run at"),
    (["--from", "vit", "{tmp}/none.pth", "--out", "{tmp}/run"], "invalid choice"),
])
def test_cli_errors_are_one_line_and_status_2(argv, words, tmp_path, capsys):
    assert convert([a.format(tmp=tmp_path) for a in argv]) == 2
    assert words in one_error_line(capsys)


def test_time_label_offset_shifts_the_label_and_nothing_else():
    from dataclasses import replace

    from train.flops import paper_flops, true_flops

    cfg = variant_config("if_concat", in_chans=C, img_size=8, patch_size=P, width=W, heads=HEADS, text_len=T,
                         text_dim=D, depth=5)
    converted = replace(cfg, time_label_offset=1)
    ours, theirs = UViT(cfg).eval(), UViT(converted).eval()
    theirs.load_state_dict(ours.state_dict())
    x, ctx, t = torch.randn(2, C, 8, 8), torch.randn(2, T, D), torch.tensor([0, 998])
    with torch.no_grad():
        torch.testing.assert_close(theirs(x, t, ctx), ours(x, t + 1, ctx), rtol=0, atol=0)
    assert variant_name(converted) == variant_name(cfg) == "if_concat"
    assert count_params(theirs) == count_params(ours)
    assert (true_flops(converted), paper_flops(converted)) == (true_flops(cfg), paper_flops(cfg))


# ----------------------------------------------------------------------------------------- a converted run samples

def _shapes_sized_fork_checkpoint(tmp_path) -> Path:
    """A fork if_concat checkpoint at the test shard set's sizes (pixels 3x32x32, text 77x64), patch 4."""
    path = tmp_path / "fork.pth"
    torch.save(random_checkpoint(foreign_shapes("uvit-fusion", 1, 1, half=2, chans=3, patch=4, text_len=77,
                                                text_dim=64)), path)
    return path


def test_evaluate_and_evaluate_sample_run_on_a_converted_run(shapes_shards, tmp_path, capsys):
    import json

    from evaluate.__main__ import main as evaluate
    from evaluate.sample import main as sample

    ckpt = _shapes_sized_fork_checkpoint(tmp_path)
    run = tmp_path / "run"
    assert convert(["--from", "uvit-fusion", str(ckpt), "--variant", "if_concat", "--out", str(run),
                    "--heads", str(HEADS), "--shards", str(shapes_shards)]) == 0
    out = tmp_path / "samples"
    assert sample(["--run", str(run), "--prompt", "a red circle", "--num", "2", "--steps", "2", "--out", str(out)]) == 0
    assert len(list(out.glob("a_red_circle_seed*.png"))) == 2
    assert evaluate(["--run", str(run), "--num-samples", "2", "--steps", "2", "--batch-size", "2", "--clip", "none"]) == 0
    assert json.loads((run / "eval" / "metrics.json").read_text())["variant"] == "if_concat"


def test_without_shards_evaluation_asks_for_them(shapes_shards, tmp_path, capsys):
    from evaluate.sample import main as sample

    run = tmp_path / "run"
    assert convert(["--from", "uvit-fusion", str(_shapes_sized_fork_checkpoint(tmp_path)), "--out", str(run),
                    "--heads", str(HEADS)]) == 0
    assert "--shards DIR" in capsys.readouterr().out
    assert sample(["--run", str(run), "--prompt", "a red circle", "--num", "1", "--steps", "1"]) == 2
    assert "pass --shards DIR" in one_error_line(capsys)
    out = tmp_path / "samples"
    assert sample(["--run", str(run), "--prompt", "a red circle", "--num", "1", "--steps", "1",
                   "--shards", str(shapes_shards), "--out", str(out)]) == 0


def test_a_checkpoint_that_does_not_fit_the_shard_set_is_refused(shapes_shards, tmp_path, capsys):
    torch.save(random_checkpoint(foreign_shapes("uvit")), tmp_path / "uvit.pth")  # 4 channels, text dim 16
    assert convert(["--from", "uvit", str(tmp_path / "uvit.pth"), "--out", str(tmp_path / "run"), *FLAGS,
                    "--shards", str(shapes_shards)]) == 2
    assert "does not fit the shard set" in one_error_line(capsys)


def test_training_does_not_resume_a_converted_run(shapes_shards, tmp_path, capsys):
    from train.__main__ import main as train

    run = tmp_path / "run"
    assert convert(["--from", "uvit-fusion", str(_shapes_sized_fork_checkpoint(tmp_path)), "--out", str(run),
                    "--heads", str(HEADS), "--shards", str(shapes_shards)]) == 0
    assert train(["--variant", "if_concat", "--shards", str(shapes_shards), "--out", str(run), "--preset", "tiny"]) == 2
    assert "converted from uvit-fusion" in one_error_line(capsys)
