"""Convert checkpoints between U-ViT (or the paper's fork) and this project's run directories (docs/uvit.md).

    python -m train.convert --from uvit ckpts/1000000.ckpt --variant early_concat --out runs/uvit_small \\
        --shards shards/coco256
    python -m train.convert --from uvit-fusion if_concat.pth --variant if_concat --out runs/fork_if_concat
    python -m train.convert --to uvit-fusion runs/if_xattn if_xattn.pth

--from reads a U-ViT state dict (a .pth file, `module.` / `_orig_mod.` prefixes allowed, or U-ViT's
`ckpts/N.ckpt/` folder, whose nnet_ema.pth is taken) with torch.load(weights_only=True): nothing pickled
runs. Every tensor's name, shape and dtype is checked against --variant; a checkpoint of another variant is
refused with the --variant it fits. The run it writes is used like a trained one (evaluate, evaluate.sample,
make eval); its network adds U-ViT's time-label offset (+1) itself. --shards names the shard set whose text
encoder, null text and image codec evaluation uses (without it, evaluation asks for --shards).

--to writes the reverse, for U-ViT's own scripts; what the target code cannot compute is refused.
"""
from __future__ import annotations

import argparse
import hashlib
import re
import sys
from pathlib import Path

import torch

from ifvit.cli import ArgumentParser, entry_point
from ifvit.errors import BadConfig, MissingPath
from ifvit.files import atomic_path
from train import uvit_format
from train.model import ABLATIONS, PAPER, VARIANTS, ModelConfig, variant_config, variant_name

EMA_FILE = "nnet_ema.pth"  # inside U-ViT's ckpts/N.ckpt/ folder: the weights its evaluation samples with
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# What a U-ViT network was trained on (its MS-COCO config): epsilon prediction, raw CLIP token states,
# SD-VAE latents times the shard set's scale (0.23010). TrainConfig gains these fields (issue 13).
UVIT_TRAINING = {"prediction": "epsilon", "text_norm": "none", "image_norm": "scale"}
TRAINING_DEFAULTS = UVIT_TRAINING  # what a run that records none of them was trained with


def from_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m train.convert --from {uvit,uvit-fusion}", description=__doc__.split("\n\n")[0],
                       epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", required=True, choices=uvit_format.SOURCES,
                   help="uvit: baofff/U-ViT libs/uvit_t2i.py; uvit-fusion: the paper's fork "
                        "(libs/uvit_t2i.py, libs/uvit_t2i_cross.py)")
    p.add_argument("checkpoint", metavar="CKPT", help="state-dict file, or U-ViT's ckpts/N.ckpt/ folder")
    p.add_argument("--variant", metavar="NAME",
                   help=f"{', '.join([*VARIANTS, *ABLATIONS])} or if_{{concat|xattn}}_tNiM (default: the "
                        "variant the checkpoint's tensors fit; early_concat for --from uvit)")
    p.add_argument("--out", required=True, help="run directory to write (must not exist)")
    p.add_argument("--shards", help="shard set evaluation encodes prompts and decodes images with")
    p.add_argument("--heads", type=int, default=PAPER.heads,
                   help=f"attention heads (weights cannot tell; default {PAPER.heads}, U-ViT-S)")
    p.add_argument("--text-len", type=int,
                   help=f"text tokens (default: the shard set's, else {PAPER.text_len})")
    return p


def to_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m train.convert --to {uvit,uvit-fusion}", description=__doc__.split("\n\n")[0],
                       epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--to", dest="target", required=True, choices=uvit_format.SOURCES,
                   help="uvit: baofff/U-ViT libs/uvit_t2i.py (early_concat only); uvit-fusion: the paper's fork")
    p.add_argument("run", metavar="RUN_DIR", help="run directory of this project")
    p.add_argument("out", metavar="OUT.pth", help="state-dict file to write")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest); EMA weights are exported")
    return p


# ------------------------------------------------------------------------------------------------ reading

def checkpoint_file(path: Path) -> Path:
    if path.is_dir():
        if not (path / EMA_FILE).is_file():
            raise MissingPath(f"{path} is a folder without {EMA_FILE}: pass U-ViT's ckpts/N.ckpt/ folder or a "
                              "state-dict file")
        return path / EMA_FILE
    if not path.is_file():
        raise MissingPath(f"no checkpoint at {path}: pass a state-dict file or U-ViT's ckpts/N.ckpt/ folder")
    return path


def read_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a state-dict file, read without running any pickled code, wrapper prefixes removed."""
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- an untrusted file can fail inside torch in any way
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found:  # weights_only meets a global it does not allow before calling it: nothing in the file ran
            raise BadConfig(f"{file} needs pickled Python objects to load (it refers to {found[1]}), so it was "
                            "refused unread: only plain state dicts are converted; where it was made, save one "
                            "with torch.save(model.state_dict(), PATH)") from None
        raise BadConfig(f"{file} is not a readable torch checkpoint ({type(exc).__name__}): pass a state-dict "
                        f"file written by torch.save, or U-ViT's ckpts/N.ckpt/ folder") from None
    if not isinstance(loaded, dict) or not loaded:
        raise BadConfig(f"{file} holds a {type(loaded).__name__}, not a state dict (tensors by name)")
    state = {}
    for name, value in loaded.items():
        if not isinstance(value, torch.Tensor):
            raise BadConfig(f"{file}: {name!r} is a {type(value).__name__}, not a tensor: pass the network's "
                            f"state dict (U-ViT's {EMA_FILE}), not a training checkpoint")
        if value.dtype not in FLOAT_DTYPES:
            raise BadConfig(f"{file}: {name} has dtype {value.dtype}; a network's weights are floating point")
        key = str(name)
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        state[key] = value.float()
    return state


def checkpoint_step(path: Path) -> int:
    """U-ViT's checkpoint folders are named by training step (ckpts/1000000.ckpt/); 0 when unknown."""
    for part in (path.name, path.parent.name):
        if m := re.fullmatch(r"(\d+)\.ckpt", part):
            return int(m[1])
    return 0


def sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ --from

def config_for(foreign: dict, source: str, variant: str | None, heads: int, text_len: int) -> ModelConfig:
    """The ModelConfig of --variant at the checkpoint's geometry, once its layout is checked tensor by tensor."""
    fits = uvit_format.implied_config(foreign, source, text_len=text_len, heads=heads)
    if variant is None:
        cfg = fits
    else:
        geometry = {k: getattr(fits, k) for k in ("in_chans", "img_size", "patch_size", "width", "depth", "heads",
                                                   "mlp_ratio", "text_len", "text_dim", "time_label_offset")}
        cfg = variant_config(variant, **geometry)
    fitting = variant_name(fits)
    try:
        expected = uvit_format.layout(cfg, source)
    except BadConfig as exc:
        raise BadConfig(f"--variant {variant_name(cfg)}: {exc}; this checkpoint fits --variant {fitting}") from None
    if problem := uvit_format.layout_mismatch(foreign, expected):
        if uvit_format.layout_mismatch(foreign, uvit_format.layout(fits, source)) is None:
            raise BadConfig(f"the checkpoint is not {variant_name(cfg)} ({problem}): its tensors fit "
                            f"--variant {fitting}")
        raise BadConfig(f"the checkpoint does not fit {variant_name(cfg)} or any variant ({problem}): pass the "
                        "checkpoint of a U-ViT text-to-image network")
    if cfg.conditioning == "xattn" and source == "uvit-fusion" and \
            cfg.num_patches + 1 != uvit_format.FORK_XATTN_QUERY_TOKENS:
        raise BadConfig(f"the fork's libs/uvit_t2i_cross.py lets its mid block query the first "
                        f"{uvit_format.FORK_XATTN_QUERY_TOKENS} tokens whatever the image size, so at "
                        f"{cfg.num_patches} patches it is not the network {variant_name(cfg)} describes")
    return cfg


def convert_from(argv: list[str]) -> int:
    from pipeline.reader import ShardSet
    from train.run_dir import RunDir

    args = from_parser().parse_args(argv)
    path, out = Path(args.checkpoint), Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise BadConfig(f"{out} exists and is not empty: pass a new --out (a conversion never writes into a run)")
    shard_set = None
    if args.shards is not None:
        if not Path(args.shards).is_dir():
            raise MissingPath(f"no shard set at {args.shards}: pass --shards DIR of a set written by python -m pipeline")
        shard_set = ShardSet(args.shards)
    text_len = args.text_len or (shard_set.text_len if shard_set else PAPER.text_len)

    file = checkpoint_file(path)
    foreign = read_state_dict(file)
    cfg = config_for(foreign, args.source, args.variant, args.heads, text_len)
    if shard_set is not None:
        check_fits_shards(cfg, shard_set)
    state = uvit_format.from_foreign(foreign, cfg, args.source)

    converted_from = {"source": args.source, "path": str(path.resolve()), "file": str(file.resolve()),
                      "sha256": sha256(file), "step": checkpoint_step(path)}
    config = {"model": cfg.to_dict(), "train": dict(UVIT_TRAINING), "converted_from": converted_from}
    with atomic_path(out) as tmp:  # the run appears whole or not at all
        run = RunDir.create(tmp, config, shards=args.shards)
        run.save_checkpoint({"model": state, "ema": state, "step": converted_from["step"]})
    print(f"{file} -> {out}: {variant_name(cfg)}, {sum(t.numel() for t in state.values()):,} parameters, "
          f"every tensor checked (names, shapes, dtypes); the network adds U-ViT's time-label offset (+1) itself")
    if args.source == "uvit" and variant_name(cfg) != "early_concat":
        print(f"note: U-ViT's libs/uvit_t2i.py computes early_concat with these tensors; as {variant_name(cfg)} "
              "they are another network (you chose it with --variant)")
    if shard_set is None:
        print(f"no --shards: evaluate it with python -m evaluate --run {out} --shards DIR (the set whose text "
              "encoder and image codec the network was trained with)")
    return 0


def check_fits_shards(cfg: ModelConfig, shard_set) -> None:
    data = {"in_chans": shard_set.latent_channels, "img_size": shard_set.latent_size,
            "text_len": shard_set.text_len, "text_dim": shard_set.text_dim}
    wrong = [f"{k} {getattr(cfg, k)} vs {v}" for k, v in data.items() if getattr(cfg, k) != v]
    if wrong:
        raise BadConfig(f"the checkpoint does not fit the shard set {shard_set.path} ({', '.join(wrong)}): pass "
                        "--shards of a set encoded as the network was trained (U-ViT: SD-VAE latents, CLIP ViT-L/14)")


# ------------------------------------------------------------------------------------------------ --to

def export_refusal(cfg: ModelConfig, train: dict, target: str) -> str | None:
    """Why `target`'s code cannot compute this run's network (None when it can)."""
    if target == "uvit" and cfg.conditioning == "xattn":
        return ("U-ViT's libs/uvit_t2i.py has only joint self-attention (concat), not cross-attention: use "
                "--to uvit-fusion (the fork's libs/uvit_t2i_cross.py)")
    if target == "uvit" and cfg.fusion == "intermediate":
        return (f"U-ViT's libs/uvit_t2i.py has no text-only or image-only blocks ({variant_name(cfg)}: "
                f"{cfg.n_text} and {cfg.n_image} per side): use --to uvit-fusion")
    if target == "uvit-fusion" and cfg.conditioning == "xattn" and \
            cfg.num_patches + 1 != uvit_format.FORK_XATTN_QUERY_TOKENS:
        return (f"the fork's libs/uvit_t2i_cross.py lets its mid block query the first "
                f"{uvit_format.FORK_XATTN_QUERY_TOKENS} tokens whatever the image size, so it computes this "
                f"xattn network only at 256 patches (this one has {cfg.num_patches})")
    for field, default in TRAINING_DEFAULTS.items():
        value = train.get(field, default)
        if value != default:
            return (f"the run was trained with {field} {value!r}; U-ViT's scripts assume {default!r} "
                    "(epsilon prediction on raw CLIP states and latents times the VAE scale), so they would "
                    "sample another model from these weights")
    return None


def uvit_nnet_config(cfg: ModelConfig, target: str) -> str:
    """The `config.nnet` arguments that build this network in the target's code."""
    args = dict(img_size=cfg.img_size, in_chans=cfg.in_chans, patch_size=cfg.patch_size, embed_dim=cfg.width,
                depth=cfg.depth - 1, num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=False,
                mlp_time_embed=False, clip_dim=cfg.text_dim, num_clip_token=cfg.text_len)
    if target == "uvit-fusion":
        args |= dict(c=cfg.n_text, v=cfg.n_image if cfg.fusion == "intermediate" else 0)
        name = "uvit_t2i_cross" if cfg.conditioning == "xattn" else "uvit_t2i"
    else:
        name = "uvit_t2i"
    return f"name='{name}', " + ", ".join(f"{k}={v!r}" for k, v in args.items())


def convert_to(argv: list[str]) -> int:
    from train.run_dir import RunDir

    args = to_parser().parse_args(argv)
    run = RunDir.open(args.run)
    ckpt = run.load_checkpoint(args.step)
    cfg = ModelConfig(**ckpt["config"]["model"])
    if reason := export_refusal(cfg, ckpt["config"].get("train", run.train_config), args.target):
        raise BadConfig(f"{run.path} ({variant_name(cfg)}) cannot be exported --to {args.target}: {reason}")
    foreign = uvit_format.to_foreign({k: v.float() for k, v in ckpt["ema"].items()}, cfg, args.target)
    with atomic_path(args.out) as tmp:
        torch.save(foreign, tmp)
    print(f"{run.path} step {ckpt['step']} (EMA) -> {args.out}: {variant_name(cfg)} for "
          f"{'the fork (zizhao-hu/U-ViT)' if args.target == 'uvit-fusion' else 'U-ViT (baofff/U-ViT)'}; "
          f"config.nnet = d({uvit_nnet_config(cfg, args.target)})")
    print(time_label_note(cfg))
    return 0


def time_label_note(cfg: ModelConfig) -> str:
    if cfg.time_label_offset == 1:
        return ("time labels: exact -- the network came from U-ViT (trained on labels n = 1..1000), which is what "
                "U-ViT's scripts feed it")
    return ("time labels: off by one -- this network was trained here on t = 0..999 and U-ViT's scripts call it "
            "with n = t + 1 for the same noise level, so it sees every level one label (1/1000 of the schedule) "
            "late, unless the call in their sampler passes n - 1 (e.g. nnet(x, timesteps - 1, context))")


def _given(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


@entry_point
def main(argv: list[str]) -> int:
    if _given(argv, "--from") and _given(argv, "--to"):
        raise BadConfig("pass --from (into a run) or --to (out of one), not both")
    if _given(argv, "--from"):
        return convert_from(argv)
    if _given(argv, "--to"):
        return convert_to(argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return 0
    raise BadConfig("say which way: --from uvit|uvit-fusion CKPT --out RUN_DIR (into a run of this project) or "
                    "--to uvit|uvit-fusion RUN_DIR OUT.pth (out of one)")


if __name__ == "__main__":
    sys.exit(main())
