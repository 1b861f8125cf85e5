"""One U-ViT with two switches: where text is fused (early / intermediate) and how (concat / xattn).

The paper's four variants and its ablations are presets of the one `UViT` class (see `VARIANTS`).
Tokens travel in two streams so that every variant is the same loop over blocks:

    image stream  [time token ; patch tokens]   (1 + L tokens)
    text stream   [projected caption tokens]     (T tokens)

Each block has a *role*:
    "text"   -- text-only block (the trainable text encoder of intermediate fusion)
    "image"  -- image-only block (no text at all; the U's outer blocks in intermediate fusion)
    "fused"  -- image and text meet: `concat` runs self-attention and the MLP over [image ; text];
                `xattn` lets only image tokens query keys/values of [image ; text] through the same
                projections, text is not updated and skips the MLP (no extra parameters).

Only torch is imported here: the GPU machine that benchmarks this file has nothing else.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from ifvit.errors import BadConfig, UnknownName

FUSIONS = ("early", "intermediate")
CONDITIONINGS = ("concat", "xattn")


@dataclass(frozen=True)
class ModelConfig:
    fusion: str = "early"  # "early": text enters at block 0; "intermediate": see n_text / n_image
    conditioning: str = "concat"  # "concat" | "xattn"
    n_text: int = 0  # text-only blocks before fusion (intermediate only)
    n_image: int = 0  # image-only blocks at each end of the U (intermediate only)
    in_chans: int = 4
    img_size: int = 32
    patch_size: int = 2
    width: int = 512
    depth: int = 13  # in-blocks + 1 mid + out-blocks, so odd
    heads: int = 8
    mlp_ratio: float = 4.0
    text_len: int = 77
    text_dim: int = 768
    # Added to every time label before the timestep embedding. 0 for networks trained here (labels
    # t = 0..999); 1 for networks converted from U-ViT, which were trained on n = t + 1 (train/convert.py).
    time_label_offset: int = 0

    def __post_init__(self):
        if self.fusion not in FUSIONS:
            raise BadConfig(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.conditioning not in CONDITIONINGS:
            raise BadConfig(f"conditioning must be one of {CONDITIONINGS}, got {self.conditioning!r}")
        if self.depth % 2 != 1:
            raise BadConfig(f"depth must be odd (in-blocks, one mid block, out-blocks), got {self.depth}")
        if self.fusion == "early" and (self.n_text or self.n_image):
            raise BadConfig("early fusion has no text-only or image-only blocks: use fusion='intermediate' "
                             "for any (n_text, n_image) split, e.g. the [1, 0] ablation")
        if not 0 <= self.n_image <= self.depth // 2:
            raise BadConfig(f"n_image must be in [0, {self.depth // 2}] (blocks per side), got {self.n_image}")
        if self.n_text < 0:
            raise BadConfig(f"n_text must be >= 0, got {self.n_text}")
        if self.img_size % self.patch_size:
            raise BadConfig(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise BadConfig(f"width {self.width} is not divisible by heads {self.heads}")
        if self.time_label_offset not in (0, 1):
            raise BadConfig(f"time_label_offset must be 0 (trained here) or 1 (converted from U-ViT), "
                            f"got {self.time_label_offset}")

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)


# U-ViT-S/2 on 256 px SD latents with CLIP ViT-L/14 token states: the paper's configuration.
PAPER = ModelConfig()

VARIANTS: dict[str, ModelConfig] = {
    "early_concat": replace(PAPER, fusion="early", conditioning="concat"),
    "early_xattn": replace(PAPER, fusion="early", conditioning="xattn"),
    "if_concat": replace(PAPER, fusion="intermediate", conditioning="concat", n_text=1, n_image=4),
    "if_xattn": replace(PAPER, fusion="intermediate", conditioning="xattn", n_text=1, n_image=4),
}

# The paper's ablations (Fig. 7): [n_text, n_image] = [0, 4] fuses in the middle only, [1, 0] adds the
# text block but fuses from the start.
ABLATIONS: dict[str, ModelConfig] = {
    f"if_{cond}_t{t}i{i}": replace(PAPER, fusion="intermediate", conditioning=cond, n_text=t, n_image=i)
    for cond in CONDITIONINGS
    for t, i in ((0, 4), (1, 0))
}


_PATTERN = re.compile(r"if_(concat|xattn)_t(\d+)i(\d+)")


def default_n_image(n_image: int, depth: int) -> int:
    """Image-only blocks per side at `depth` for a split of `n_image` at the paper's depth: the same
    fraction of each side (4 of 6 -> 2 of 3 at depth 7), so intermediate fusion stays intermediate."""
    return round(n_image * (depth // 2) / (PAPER.depth // 2))


def variant_name(cfg: ModelConfig) -> str:
    """The name a model reports, from its config alone, so it cannot disagree with what was built:
    early_{concat|xattn} when nothing is split off (n_text = n_image = 0); the registry name when the split
    is that variant's default at this depth; otherwise if_{concat|xattn}_t{n_text}i{n_image}."""
    if cfg.n_text == 0 and cfg.n_image == 0:
        return f"early_{cfg.conditioning}"
    for name, registered in {**VARIANTS, **ABLATIONS}.items():
        if registered.fusion == "intermediate" and registered.conditioning == cfg.conditioning and \
                (registered.n_text, default_n_image(registered.n_image, cfg.depth)) == (cfg.n_text, cfg.n_image):
            return name
    return f"if_{cfg.conditioning}_t{cfg.n_text}i{cfg.n_image}"


def variant_config(name: str, **overrides) -> ModelConfig:
    """The config of variant `name` -- a registry name or any if_{concat|xattn}_t{N}i{M} -- with fields
    overridden (None values ignored). A depth other than the paper's scales the default image-only blocks
    (`default_n_image`) unless n_image is given. Overrides of n_text / n_image must keep the variant's
    kind: they may name another split of intermediate fusion (the model then reports that name), but an
    early variant with a split, or an intermediate one without any, is refused rather than built under a
    name that says otherwise."""
    table = {**VARIANTS, **ABLATIONS}
    if name in table:
        base = table[name]
    elif m := _PATTERN.fullmatch(name):
        base = replace(PAPER, fusion="intermediate", conditioning=m[1], n_text=int(m[2]), n_image=int(m[3]))
    else:
        raise UnknownName(f"unknown variant {name!r}: choose one of {', '.join(table)}, or name a split "
                             "as if_concat_t1i2 / if_xattn_t0i3 ([n_text, n_image])")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    depth = overrides.get("depth", base.depth)
    if base.fusion == "intermediate" and "n_image" not in overrides and depth != base.depth:
        overrides["n_image"] = default_n_image(base.n_image, depth)
    n_text, n_image = overrides.get("n_text", base.n_text), overrides.get("n_image", base.n_image)
    if base.fusion == "early" and (n_text or n_image):
        raise BadConfig(f"{name} has no text-only or image-only blocks, so n_text {n_text} / n_image {n_image} "
                        f"would build another model: use --variant if_{base.conditioning}_t{n_text}i{n_image} "
                        "(intermediate fusion with that split)")
    if base.fusion == "intermediate" and n_text == 0 and n_image == 0:
        raise BadConfig(f"{name} with n_text = n_image = 0 is early fusion: use --variant early_{base.conditioning}")
    return replace(base, **overrides)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) time steps, [B] -> [B, dim] (U-ViT's: cos then sin)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class Attention(nn.Module):
    """Multi-head attention through SDPA (no mask, so the flash kernel runs on GPU).

    `queries` may be a prefix-free subset of the tokens: q comes from `xq`, k and v from `xkv`, all
    through the one qkv projection, which is what makes the paper's joint cross-attention parameter-free.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, xq: torch.Tensor, xkv: torch.Tensor | None = None, record_text: int = 0, query_slice=None):
        """Attend `xq` over `xkv` (self-attention when xkv is None).

        With `record_text` > 0, also return the attention probabilities of the queries in `query_slice`
        over the last `record_text` keys (the text), softmax recomputed in fp32 over all keys.
        """
        B, Nq, C = xq.shape
        h, d = self.heads, C // self.heads
        if xkv is None:
            q, k, v = self.qkv(xq).view(B, Nq, 3, h, d).permute(2, 0, 3, 1, 4)
        else:
            w_q, w_kv = self.qkv.weight.split([C, 2 * C])
            q = F.linear(xq, w_q).view(B, Nq, h, d).transpose(1, 2)
            k, v = F.linear(xkv, w_kv).view(B, xkv.shape[1], 2, h, d).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        out = self.proj(out.transpose(1, 2).reshape(B, Nq, C))
        if not record_text:
            return out, None
        qs = q[:, :, query_slice] if query_slice is not None else q
        probs = torch.softmax((qs.float() @ k.float().transpose(-2, -1)) / math.sqrt(d), dim=-1)
        return out, probs[..., -record_text:]


class Mlp(nn.Sequential):
    def __init__(self, dim: int, hidden: int):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class Block(nn.Module):
    """Pre-LayerNorm transformer block; out-blocks of the U first merge their long skip."""

    def __init__(self, cfg: ModelConfig, role: str, skip: bool = False):
        super().__init__()
        assert role in ("text", "image", "fused")
        self.role, self.conditioning = role, cfg.conditioning
        dim = cfg.width
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, cfg.heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))

    def _merge_skip(self, x, skip):
        return self.skip_linear(torch.cat([x, skip], dim=-1)) if self.skip_linear is not None else x

    def _self(self, x):
        x = x + self.attn(self.norm1(x))[0]
        return x + self.mlp(self.norm2(x))

    def forward(self, img, txt, skip=None, record: bool = False, patch_slice=None):
        """Returns (img, txt, attention-or-None). `skip` is the matching in-block's (img, txt)."""
        if self.role == "text":
            return img, self._self(txt), None
        if self.role == "image":
            img = self._merge_skip(img, skip[0]) if skip is not None else img
            return self._self(img), txt, None
        n_img, n_txt = img.shape[1], txt.shape[1]
        if self.conditioning == "concat":
            x = torch.cat([img, txt], dim=1)
            if skip is not None:
                x = self._merge_skip(x, torch.cat(skip, dim=1))
            a, probs = self.attn(self.norm1(x), record_text=n_txt if record else 0, query_slice=patch_slice)
            x = x + a
            x = x + self.mlp(self.norm2(x))
            return x[:, :n_img], x[:, n_img:], probs
        # xattn: text is context only -- not updated, no MLP, no skip.
        if skip is not None:
            img = self._merge_skip(img, skip[0])
        kv = self.norm1(torch.cat([img, txt], dim=1))
        a, probs = self.attn(kv[:, :n_img], kv, record_text=n_txt if record else 0, query_slice=patch_slice)
        img = img + a
        img = img + self.mlp(self.norm2(img))
        return img, txt, probs


class UViT(nn.Module):
    """U-ViT noise predictor eps(x_t, t, text) for every fusion variant."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        C, n_half = cfg.width, cfg.depth // 2
        self.patch_embed = nn.Conv2d(cfg.in_chans, C, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.context_embed = nn.Linear(cfg.text_dim, C)
        # One learned position embedding over all tokens, ordered [time ; text ; patches] as in U-ViT.
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.text_len + cfg.num_patches, C))

        outer = cfg.n_image if cfg.fusion == "intermediate" else 0
        self.text_blocks = nn.ModuleList(Block(cfg, "text") for _ in range(cfg.n_text))
        self.in_blocks = nn.ModuleList(Block(cfg, "image" if i < outer else "fused") for i in range(n_half))
        self.mid_block = Block(cfg, "fused")
        # out-block j pairs with in-block n_half-1-j, so image-only meets image-only and fused meets fused.
        self.out_blocks = nn.ModuleList(
            Block(cfg, "image" if j >= n_half - outer else "fused", skip=True) for j in range(n_half)
        )
        self.norm = nn.LayerNorm(C)
        self.decoder_pred = nn.Linear(C, cfg.patch_size**2 * cfg.in_chans)
        self.final_layer = nn.Conv2d(cfg.in_chans, cfg.in_chans, 3, padding=1)
        self._init_weights()

    def _init_weights(self):
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -- token layout, for analysis code: never hard-code these slices elsewhere --------------------
    def token_slices(self) -> dict[str, slice]:
        """Slices into the image stream ([time ; patches]) and into the fused key sequence
        ([time ; patches ; text]); recorded attention has one row per patch and one column per text token."""
        L, T = self.cfg.num_patches, self.cfg.text_len
        return {"time": slice(0, 1), "patches": slice(1, 1 + L), "text_keys": slice(1 + L, 1 + L + T)}

    def block_names(self) -> list[str]:
        """Names of the U's blocks in forward order (text blocks excluded), e.g. 'in0', 'mid', 'out5'."""
        n = self.cfg.depth // 2
        return [f"in{i}" for i in range(n)] + ["mid"] + [f"out{j}" for j in range(n)]

    def fused_block_names(self) -> list[str]:
        blocks = [*self.in_blocks, self.mid_block, *self.out_blocks]
        return [name for name, b in zip(self.block_names(), blocks) if b.role == "fused"]

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        p, c, s = self.cfg.patch_size, self.cfg.in_chans, self.cfg.img_size // self.cfg.patch_size
        x = x.reshape(x.shape[0], s, s, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(x.shape[0], c, s * p, s * p)

    def forward(self, x, timesteps, context, record_attention: bool = False, return_hidden: bool = False):
        """x [B, C, H, W], timesteps [B], context [B, T, text_dim] -> eps [B, C, H, W].

        record_attention: also return {block name: [B, heads, L, T] fp32 probabilities of patch
        queries over text keys}, for every fused block. return_hidden: also return the image stream
        after every block (for tests of what depends on the text). The prediction is unchanged.
        """
        cfg = self.cfg
        T = cfg.text_len
        patches = self.patch_embed(x).flatten(2).transpose(1, 2)
        if cfg.time_label_offset:  # the sampler speaks this project's labels; the network its own
            timesteps = timesteps + cfg.time_label_offset
        time_tok = timestep_embedding(timesteps, cfg.width).to(patches.dtype)[:, None]
        txt = self.context_embed(context)
        pos = self.pos_embed
        img = torch.cat([time_tok, patches], dim=1) + torch.cat([pos[:, :1], pos[:, 1 + T:]], dim=1)
        txt = txt + pos[:, 1:1 + T]

        for blk in self.text_blocks:
            img, txt, _ = blk(img, txt)

        attn, hidden, skips = {}, {}, []
        patch_slice = self.token_slices()["patches"]
        names = iter(self.block_names())

        def run(blk, img, txt, skip=None):
            name = next(names)
            img, txt, probs = blk(img, txt, skip, record=record_attention, patch_slice=patch_slice)
            if probs is not None:
                attn[name] = probs
            if return_hidden:
                hidden[name] = img
            return img, txt

        for blk in self.in_blocks:
            img, txt = run(blk, img, txt)
            skips.append((img, txt))
        img, txt = run(self.mid_block, img, txt)
        for blk in self.out_blocks:
            img, txt = run(blk, img, txt, skips.pop())

        out = self.decoder_pred(self.norm(img[:, 1:]))
        out = self.final_layer(self.unpatchify(out))
        extras = ({"attention": attn} if record_attention else {}) | ({"hidden": hidden} if return_hidden else {})
        return (out, extras) if extras else out


def build_model(name_or_cfg: str | ModelConfig, **overrides) -> UViT:
    cfg = variant_config(name_or_cfg, **overrides) if isinstance(name_or_cfg, str) else name_or_cfg
    return UViT(cfg)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
