"""U-ViT's and the paper fork's checkpoint layouts, mapped to and from this project's UViT (train/model.py).

    layout(cfg, source)                    {foreign name: shape}: what a checkpoint of that network holds
    to_foreign(state, cfg, source)         our state dict -> the foreign one (renames, splits, row reorder)
    from_foreign(foreign, cfg, source)     the inverse; both are exact (no arithmetic on values)
    implied_config(foreign, source, ...)   the ModelConfig a foreign checkpoint's names and shapes describe

The two sources (read from baofff/U-ViT and zizhao-hu/U-ViT; none of their code is used here):

- "uvit": baofff/U-ViT `libs/uvit_t2i.py`, which computes early_concat (mscoco_uvit_small: 44,692,644
  parameters, as ours). Blocks are named as ours (`in_blocks.i`, `mid_block`, `out_blocks.j`); only
  `patch_embed.proj.*` (ours `patch_embed.*`) and the MLP's `fc1` / `fc2` (ours `mlp.0` / `mlp.2`) differ.
- "uvit-fusion": the paper authors' fork, `libs/uvit_t2i.py` (joint self-attention = our concat) and
  `libs/uvit_t2i_cross.py` (joint cross-attention = our xattn). It has `c` text-only blocks
  (`caption_blocks`) and `v` image-only blocks per side (`image_blocks` in, `image_skip_blocks` out) around
  `joint_blocks`, `mid_block`, `joint_skip_blocks`; the cross-attention file splits every block's qkv
  projection into `attn.q` and `attn.kv`. Its position embedding is laid out [patches ; time ; caption],
  ours [time ; caption ; patches], so `pos_embed` rows are reordered.

Block roles do not change tensor shapes: in the "uvit" layout early_concat, early_xattn and the
if_*_t0i* ablations hold the same tensors, and the config (the user's --variant) decides which network
they are. In the fork's layout the names and the q/kv split tell every variant apart.
"""
from __future__ import annotations

import math
import re

import torch

from ifvit.errors import BadConfig
from train.model import ModelConfig, UViT, variant_name

SOURCES = ("uvit", "uvit-fusion")
# The fork's cross-attention file builds its mid block with the default query length 257 (256 patches + the
# time token) whatever the image size, so only that geometry is the network xattn describes.
FORK_XATTN_QUERY_TOKENS = 257

_BLOCK = re.compile(r"((?:text_blocks|in_blocks|out_blocks)\.\d+|mid_block)\.(.+)")
_OUR_TO_FOREIGN_TOP = {"patch_embed.weight": "patch_embed.proj.weight", "patch_embed.bias": "patch_embed.proj.bias"}
_OUR_TO_FOREIGN_MLP = {"mlp.0.": "mlp.fc1.", "mlp.2.": "mlp.fc2."}
FORK_ONLY_BLOCKS = ("caption_blocks", "image_blocks", "joint_blocks", "joint_skip_blocks", "image_skip_blocks")
UVIT_ONLY_BLOCKS = ("in_blocks", "out_blocks")


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise BadConfig(f"unknown U-ViT code base {source!r}: choose uvit (baofff/U-ViT) or uvit-fusion (the "
                        "paper's fork, zizhao-hu/U-ViT)")


def _block_names(cfg: ModelConfig, source: str) -> dict[str, str]:
    """Our block prefix -> the foreign one."""
    n_half = cfg.depth // 2
    if source == "uvit":
        if cfg.n_text:
            raise BadConfig(f"{variant_name(cfg)} has {cfg.n_text} text-only block(s), which U-ViT's "
                            "libs/uvit_t2i.py cannot hold: use the paper's fork (uvit-fusion)")
        names = {f"in_blocks.{i}": f"in_blocks.{i}" for i in range(n_half)}
        names |= {f"out_blocks.{j}": f"out_blocks.{j}" for j in range(n_half)}
        return names | {"mid_block": "mid_block"}
    outer = cfg.n_image if cfg.fusion == "intermediate" else 0
    joint = n_half - outer  # out-block j pairs with in-block n_half-1-j: the joint ones come first on the way out
    names = {f"text_blocks.{i}": f"caption_blocks.{i}" for i in range(cfg.n_text)}
    names |= {f"in_blocks.{i}": f"image_blocks.{i}" if i < outer else f"joint_blocks.{i - outer}"
              for i in range(n_half)}
    names |= {f"out_blocks.{j}": f"joint_skip_blocks.{j}" if j < joint else f"image_skip_blocks.{j - joint}"
              for j in range(n_half)}
    return names | {"mid_block": "mid_block"}


def _splits_qkv(cfg: ModelConfig, source: str) -> bool:
    return source == "uvit-fusion" and cfg.conditioning == "xattn"


def _foreign_names(name: str, cfg: ModelConfig, source: str, blocks: dict[str, str]) -> list[str]:
    """The foreign name(s) of our tensor `name`: two for a qkv weight the fork's cross-attention splits."""
    m = _BLOCK.fullmatch(name)
    if m is None:
        return [_OUR_TO_FOREIGN_TOP.get(name, name)]
    prefix, rest = blocks[m[1]], m[2]
    for ours, theirs in _OUR_TO_FOREIGN_MLP.items():
        if rest.startswith(ours):
            rest = theirs + rest[len(ours):]
    if rest == "attn.qkv.weight" and _splits_qkv(cfg, source):
        return [f"{prefix}.attn.q.weight", f"{prefix}.attn.kv.weight"]
    return [f"{prefix}.{rest}"]


def fork_token_order(pos: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """pos_embed rows [time ; caption ; patches] (ours) -> [patches ; time ; caption] (the fork's)."""
    T = cfg.text_len
    return torch.cat([pos[:, 1 + T:], pos[:, :1], pos[:, 1:1 + T]], dim=1)


def our_token_order(pos: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """The inverse of fork_token_order."""
    L = cfg.num_patches
    return torch.cat([pos[:, L:L + 1], pos[:, L + 1:], pos[:, :L]], dim=1)


def to_foreign(state: dict[str, torch.Tensor], cfg: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """Our UViT state dict as `source`'s code names and lays it out (fresh contiguous tensors)."""
    _check_source(source)
    blocks, out = _block_names(cfg, source), {}
    for name, tensor in state.items():
        names = _foreign_names(name, cfg, source, blocks)
        if len(names) == 2:
            parts = tensor.split([cfg.width, 2 * cfg.width])  # qkv rows are [q ; k ; v]; the fork's kv is [k ; v]
        elif name == "pos_embed" and source == "uvit-fusion":
            parts = [fork_token_order(tensor, cfg)]
        else:
            parts = [tensor]
        out.update((n, p.contiguous().clone()) for n, p in zip(names, parts))
    return out


def our_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # names and shapes only: no memory, no initialisation cost
        return {name: tuple(t.shape) for name, t in UViT(cfg).state_dict().items()}


def layout(cfg: ModelConfig, source: str) -> dict[str, tuple[int, ...]]:
    """{foreign name: shape} of the network `cfg` in `source`'s checkpoint layout."""
    with torch.device("meta"):
        state = UViT(cfg).state_dict()
    return {name: tuple(t.shape) for name, t in to_foreign(state, cfg, source).items()}


def from_foreign(foreign: dict[str, torch.Tensor], cfg: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """A foreign state dict (already checked against `layout(cfg, source)`) as our UViT's state dict."""
    _check_source(source)
    blocks, state = _block_names(cfg, source), {}
    for name in our_shapes(cfg):
        parts = [foreign[n] for n in _foreign_names(name, cfg, source, blocks)]
        tensor = torch.cat(parts) if len(parts) > 1 else parts[0]
        if name == "pos_embed" and source == "uvit-fusion":
            tensor = our_token_order(tensor, cfg)
        state[name] = tensor.contiguous().clone()
    return state


def _count(foreign: dict, prefix: str) -> int:
    found = {int(m[1]) for k in foreign if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def _shape(foreign: dict, name: str, source: str) -> tuple[int, ...]:
    if name not in foreign:
        raise BadConfig(f"no {name} in the checkpoint: it is not a complete {source} text-to-image network "
                        f"(it has {len(foreign)} tensors, e.g. {', '.join(sorted(foreign)[:3]) or 'none'})")
    return tuple(foreign[name].shape)


def implied_config(foreign: dict[str, torch.Tensor], source: str, *, text_len: int = 77, heads: int = 8,
                   time_label_offset: int = 1) -> ModelConfig:
    """The ModelConfig whose `source` layout these tensors have: the variant they fit ("uvit": early_concat,
    the network U-ViT's code computes from them). Attention heads and the text length cannot be read from
    weights and are given. A checkpoint of the other code base is refused with the option to pass."""
    _check_source(source)
    other = FORK_ONLY_BLOCKS if source == "uvit" else UVIT_ONLY_BLOCKS
    if any(k.split(".")[0] in other for k in foreign):
        hint = "uvit-fusion" if source == "uvit" else "uvit"
        fits = variant_name(implied_config(foreign, hint, text_len=text_len, heads=heads))
        code = "the paper's fork (zizhao-hu/U-ViT)" if source == "uvit" else "U-ViT (baofff/U-ViT)"
        raise BadConfig(f"this is a checkpoint of {code}, not --from {source}: pass --from {hint} --variant {fits}")
    if any(k.startswith("time_embed.") for k in foreign):
        raise BadConfig("the checkpoint has time_embed.* (trained with mlp_time_embed=True): this project's UViT "
                        "feeds the sinusoidal time embedding to the blocks as it is, so it cannot hold that network")

    if any(k.endswith((".attn.qkv.bias", ".attn.q.bias", ".attn.kv.bias")) for k in foreign):
        raise BadConfig("the checkpoint has attention biases (trained with qkv_bias=True): this project's UViT "
                        "has none, as U-ViT's MS-COCO configs, so it cannot hold that network")
    width = _shape(foreign, "pos_embed", source)[2]
    _, in_chans, patch, _ = _shape(foreign, "patch_embed.proj.weight", source)
    text_dim = _shape(foreign, "context_embed.weight", source)[1]
    if source == "uvit":
        n_text, n_image, n_half, xattn = 0, 0, _count(foreign, "in_blocks"), False
    else:
        n_text, n_image = _count(foreign, "caption_blocks"), _count(foreign, "image_blocks")
        n_half = n_image + _count(foreign, "joint_blocks")
        xattn = any(k.endswith(".attn.q.weight") for k in foreign)
    hidden = _shape(foreign, "mid_block.mlp.fc1.weight", source)[0]
    num_patches = _shape(foreign, "pos_embed", source)[1] - 1 - text_len
    side = math.isqrt(max(num_patches, 0))
    if num_patches <= 0 or side * side != num_patches:
        raise BadConfig(f"pos_embed has {num_patches + 1 + text_len} rows, which is not 1 time + {text_len} text "
                        f"+ a square number of patches: pass the text length it was trained with (--text-len)")
    fusion = "intermediate" if n_text or n_image else "early"
    try:
        return ModelConfig(fusion=fusion, conditioning="xattn" if xattn else "concat", n_text=n_text,
                           n_image=n_image, in_chans=in_chans, img_size=side * patch, patch_size=patch,
                           width=width, depth=2 * n_half + 1, heads=heads, mlp_ratio=hidden / width,
                           text_len=text_len, text_dim=text_dim, time_label_offset=time_label_offset)
    except BadConfig as exc:
        raise BadConfig(f"the checkpoint's shapes, with {heads} heads and {text_len} text tokens (--heads, "
                        f"--text-len), describe no UViT this project can build: {exc}") from None


def layout_mismatch(foreign: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> str | None:
    """What differs between a checkpoint and an expected layout (None when it fits exactly)."""
    missing = sorted(set(expected) - set(foreign))
    unexpected = sorted(set(foreign) - set(expected))
    shapes = [f"{k} is {tuple(foreign[k].shape)}, expected {expected[k]}" for k in sorted(set(expected) & set(foreign))
              if tuple(foreign[k].shape) != expected[k]]
    problems = ([f"{len(missing)} tensor(s) missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"]
                if missing else []) + \
               ([f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})"]
                if unexpected else []) + shapes[:3]
    return "; ".join(problems) or None
