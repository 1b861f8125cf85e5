"""The U-ViT's numbers (paper Table 1) and the semantics of its two switches."""
import json
import math
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from train.flops import paper_flops, table, true_flops
from train.model import ABLATIONS, VARIANTS, ModelConfig, UViT, count_params, variant_config, variant_name

TINY = ModelConfig(in_chans=3, img_size=8, patch_size=2, width=32, depth=5, heads=2, text_len=6, text_dim=16)
TINY_VARIANTS = {
    "early_concat": replace(TINY, fusion="early", conditioning="concat"),
    "early_xattn": replace(TINY, fusion="early", conditioning="xattn"),
    "if_concat": replace(TINY, fusion="intermediate", conditioning="concat", n_text=1, n_image=1),
    "if_xattn": replace(TINY, fusion="intermediate", conditioning="xattn", n_text=1, n_image=1),
}


def tiny_inputs(cfg, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    ctx = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g)
    return x, t, ctx


def tiny_model(name, seed=0):
    torch.manual_seed(seed)
    return UViT(TINY_VARIANTS[name]).eval()


@pytest.mark.parametrize("name,expected", [
    ("early_concat", 44_692_644), ("early_xattn", 44_692_644),
    ("if_concat", 47_843_492), ("if_xattn", 47_843_492),
])
def test_parameter_counts_match_paper(name, expected):
    with torch.device("meta"):
        assert count_params(UViT(VARIANTS[name])) == expected


@pytest.mark.parametrize("name,paper,true", [
    ("early_concat", 29.56, 32.46), ("early_xattn", 23.81, 26.04),
    ("if_concat", 25.84, 28.01), ("if_xattn", 23.65, 25.57),
])
def test_gflops_match_paper_in_both_conventions(name, paper, true):
    cfg = VARIANTS[name]
    assert abs(paper_flops(cfg) / 1e9 - paper) <= 0.02
    assert abs(true_flops(cfg) / 1e9 - true) <= 0.005 * true


def test_flops_cli_writes_json_rows(tmp_path):
    out = tmp_path / "flops.json"
    subprocess.run([sys.executable, "-m", "train.flops", "--json", str(out)], check=True, capture_output=True)
    rows = json.loads(out.read_text())
    names = {r["variant"] for r in rows}
    assert set(VARIANTS) | set(ABLATIONS) == names
    for r in rows:
        assert {"variant", "n_text", "n_image", "params", "gflops_true", "gflops_paper"} <= set(r)
    ablations = {(r["n_text"], r["n_image"]) for r in rows if r["variant"] in ABLATIONS}
    assert ablations == {(0, 4), (1, 0)}


def test_table_savings_are_relative_to_baseline():
    rows = {r.variant: r for r in table(include_ablations=False)}
    assert rows["early_concat"].saving_true_pct == 0.0
    assert rows["if_xattn"].saving_true_pct == pytest.approx(100 * (1 - 25.567 / 32.458), abs=0.1)


@pytest.mark.parametrize("name", ["early_xattn", "if_xattn"])
def test_xattn_never_updates_text_inside_fused_blocks(name):
    model = tiny_model(name)
    seen = []

    def hook(block, args, output):
        if block.role == "fused":
            seen.append(torch.equal(args[1], output[1]))

    for blk in [*model.in_blocks, model.mid_block, *model.out_blocks]:
        blk.register_forward_hook(hook)
    model(*tiny_inputs(model.cfg))
    assert seen and all(seen)


@pytest.mark.parametrize("name", ["early_concat", "if_concat"])
def test_concat_does_update_text_inside_fused_blocks(name):
    """The counterpart of the xattn test: it shows the hook can see an update."""
    model = tiny_model(name)
    changed = []
    model.mid_block.register_forward_hook(lambda b, a, o: changed.append(not torch.equal(a[1], o[1])))
    model(*tiny_inputs(model.cfg))
    assert changed == [True]


@pytest.mark.parametrize("name", ["if_concat", "if_xattn"])
def test_intermediate_image_only_blocks_ignore_text(name):
    model = tiny_model(name)
    x, t, ctx = tiny_inputs(model.cfg)
    _, a = model(x, t, ctx, return_hidden=True)
    _, b = model(x, t, ctx + 1.0, return_hidden=True)
    n_image = model.cfg.n_image
    names = model.block_names()
    for blk in names[:n_image]:
        assert torch.equal(a["hidden"][blk], b["hidden"][blk]), blk
    # The first fused block already sees the text, and the last image-only out-blocks inherit it.
    assert not torch.allclose(a["hidden"][names[n_image]], b["hidden"][names[n_image]])


@pytest.mark.parametrize("name", list(TINY_VARIANTS))
def test_output_depends_on_text(name):
    model = tiny_model(name)
    x, t, ctx = tiny_inputs(model.cfg)
    assert not torch.allclose(model(x, t, ctx), model(x, t, ctx.flip(0)), atol=1e-6)


@pytest.mark.parametrize("name", list(TINY_VARIANTS))
def test_recorded_attention_keeps_output_and_equals_softmax(name):
    model = tiny_model(name)
    cfg = model.cfg
    x, t, ctx = tiny_inputs(cfg)
    # Capture each fused block's attention inputs to recompute softmax(QK^T / sqrt(d)) independently.
    captured = {}
    blocks = dict(zip(model.block_names(), [*model.in_blocks, model.mid_block, *model.out_blocks]))
    for bname, blk in blocks.items():
        if blk.role == "fused":
            blk.attn.register_forward_hook(lambda m, a, o, bname=bname: captured.__setitem__(bname, a))
    plain = model(x, t, ctx)
    out, extras = model(x, t, ctx, record_attention=True)
    assert torch.allclose(plain, out, atol=1e-6)
    attn = extras["attention"]
    assert sorted(attn) == sorted(model.fused_block_names())

    d = cfg.width // cfg.heads
    patches = model.token_slices()["patches"]
    for bname, probs in attn.items():
        xq, xkv = captured[bname][0], captured[bname][1] if len(captured[bname]) > 1 else None
        xkv = xq if xkv is None else xkv
        w = blocks[bname].attn.qkv.weight
        wq, wk, _ = w.split(cfg.width)
        B = x.shape[0]
        q = (xq[:, patches] @ wq.T).view(B, -1, cfg.heads, d).transpose(1, 2)
        k = (xkv @ wk.T).view(B, -1, cfg.heads, d).transpose(1, 2)
        expected = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1)[..., -cfg.text_len:]
        assert probs.shape == (B, cfg.heads, cfg.num_patches, cfg.text_len)
        assert probs.dtype == torch.float32
        assert torch.allclose(probs, expected, atol=1e-5), bname


def test_token_slices_describe_the_layout():
    model = tiny_model("if_xattn")
    s = model.token_slices()
    n = model.cfg.num_patches
    assert (s["time"], s["patches"], s["text_keys"]) == (slice(0, 1), slice(1, 1 + n), slice(1 + n, 1 + n + 6))


def test_variant_config_overrides_and_errors():
    assert variant_config("if_xattn", width=64).width == 64
    with pytest.raises(KeyError, match="choose one of"):
        variant_config("late_fusion")
    with pytest.raises(ValueError, match="n_image"):
        ModelConfig(fusion="intermediate", n_image=7)


def test_variant_identity_comes_from_the_model_config_alone():
    """The name a model reports is derived from its config, so it cannot disagree with what was built;
    knob overrides either name the split they build or are refused."""
    for name, cfg in {**VARIANTS, **ABLATIONS}.items():
        assert variant_name(cfg) == name
    # A preset's depth scales the default split; the model keeps its registry name at every depth.
    for depth in (3, 5, 7, 11, 13):
        for name in ("early_xattn", "if_concat", "if_xattn_t0i4", "if_concat_t1i0"):
            assert variant_name(variant_config(name, depth=depth)) == name
    assert (variant_config("if_concat", depth=7).n_text, variant_config("if_concat", depth=7).n_image) == (1, 2)
    # Overrides that build another split name it: the ablation's registry name, or if_<cond>_t<N>i<M>.
    assert variant_name(variant_config("if_concat", n_text=0)) == "if_concat_t0i4"
    assert variant_name(variant_config("if_xattn", n_image=0)) == "if_xattn_t1i0"
    assert variant_name(variant_config("if_concat", n_text=2)) == "if_concat_t2i4"
    assert variant_name(variant_config("if_concat", n_image=3, depth=7)) == "if_concat_t1i3"
    assert variant_config("if_xattn_t2i1") == replace(VARIANTS["if_xattn"], n_text=2, n_image=1)  # such a name is accepted
    # ... an intermediate config without a split is early fusion, and says so.
    assert variant_name(replace(VARIANTS["if_concat"], n_text=0, n_image=0)) == "early_concat"
    # Refused: an early variant with a split (it would silently build an intermediate model), and an
    # intermediate one with none (that is early fusion under another name).
    with pytest.raises(ValueError, match="use --variant if_concat_t1i0"):
        variant_config("early_concat", n_text=1)
    with pytest.raises(ValueError, match="use --variant early_xattn"):
        variant_config("if_xattn", n_text=0, n_image=0)


def test_model_imports_with_torch_alone():
    """A GPU machine has no diffusers/open_clip/webdataset/ray: the model and FLOP counter must not need them."""
    code = (
        "import sys\n"
        "for name in ('diffusers', 'open_clip', 'webdataset', 'ray', 'transformers'):\n"
        "    sys.modules[name] = None  # makes `import name` raise ImportError\n"
        "import importlib.util\n"
        "import train.model, train.diffusion, train.flops\n"
        "mods = ['train.bench', 'train.trainer']\n"
        "for m in mods:\n"
        "    if importlib.util.find_spec(m) is not None:\n"
        "        __import__(m)\n"
        "m = train.model.build_model('if_xattn', width=64, heads=2, depth=3, n_image=1)\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_readme_variants_table_is_the_commands_output():
    from pathlib import Path

    from train.flops import format_table

    readme = Path(__file__).resolve().parents[1] / "README.md"
    assert format_table(table()) in readme.read_text(), "regenerate it: python -m train.flops --markdown"
