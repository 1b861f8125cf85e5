"""Training configuration: one typed dataclass and three named presets.

    coco    the paper's recipe (docs/design.md, "Recipe") on SD-VAE latents of MS-COCO: U-ViT-S/2, batch 256, 1M steps
    shapes  a GPU-sized pixel-space run on the default `shapes` set that learns counts in minutes
    tiny    a CPU run on the full `shapes` world: minutes on 2 cores, colours and layout
    demo    the CPU demo (`make demo`) on the easier `demo` world at 16 px

When no preset is named, the shard set picks one: VAE moments -> coco; pixels -> shapes on a GPU, tiny on a
CPU. Any field can then be overridden (`python -m train ... --lr 1e-4 --ema-decay 0.999`).

Model dimensions that come from data (channels, resolution, text length and width) are read from the shard
set; the preset only sets the backbone's size (width, depth, heads, patch). Torch-free on purpose.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, fields, replace

from ifvit.errors import BadConfig, UnknownName


CHOICES = {"prediction": ("epsilon", "v"), "loss_weighting": ("uniform", "min_snr"),
           "image_norm": ("scale", "channel"), "text_norm": ("none", "token")}
# The fields that change what the weights mean (a resumed run keeps them).
MEANING_FIELDS = ("prediction", "image_norm", "text_norm")


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "coco"

    # Backbone size; None keeps the variant's (the paper's U-ViT-S/2: 512 wide, 13 blocks, 8 heads, patch 2).
    width: int | None = None
    depth: int | None = None
    heads: int | None = None
    patch_size: int | None = None

    # Optimisation (docs/design.md, "Recipe"). batch_size is global: summed over ranks and accumulation micro-batches.
    steps: int = 1_000_000
    batch_size: int = 256
    grad_accum: int = 1
    lr: float = 2e-4
    beta1: float = 0.9
    beta2: float = 0.9
    weight_decay: float = 0.03
    warmup_steps: int = 5_000  # linear warm-up, then constant
    ema_decay: float = 0.9999
    caption_dropout: float = 0.1  # probability of training on the "" encoding (classifier-free guidance)

    # docs/training.md, "Prediction target, loss weighting, normalisation": what the network predicts and how
    # its inputs are scaled. The paper's recipe: epsilon, uniform MSE, latents x the set's latent scale,
    # raw text states. All are recorded in config.json; the target and the two norms (what the weights mean)
    # are fixed on resume.
    prediction: str = "epsilon"  # "epsilon" | "v"
    loss_weighting: str = "uniform"  # "uniform" | "min_snr" (min-SNR-gamma)
    min_snr_gamma: float = 5.0
    image_norm: str = "scale"  # "scale": x the latent scale only | "channel": standardised per channel
    text_norm: str = "none"  # "none" | "token": standardised per token and channel

    # Speed. None/"auto" choose by device: bf16 + compile on a GPU, fp32 eager on a CPU.
    precision: str = "auto"  # "auto" | "bf16" | "fp32"
    compile: bool | None = None
    activation_checkpointing: bool = False  # recompute each block in backward: same results, less memory
    num_workers: int = 4  # loader processes per rank
    device: str = "auto"  # "auto" | "cpu" | "cuda"

    # Bookkeeping.
    seed: int = 0
    log_every: int = 100  # also how often the loss is checked for NaN/inf and SIGTERM is honoured
    ckpt_every: int = 50_000  # also where the data stream is re-seeded (see trainer.DataStream)
    keep_checkpoints: int = 0  # newest N step checkpoints kept; 0 keeps all (evaluate plots them over steps)
    preview_every: int = 10_000  # 0 disables the preview grid
    preview_prompts: int = 8  # val captions of the shard set, one fixed seed each
    preview_steps: int = 25  # deterministic DDIM steps of the preview sampler
    preview_scale: float = 3.0  # guidance scale s of the preview (the paper's figures use 3)

    # Debugging: make the loss of this step NaN (0 = off), to exercise the non-finite-loss stop.
    inject_nan_at_step: int = 0

    def __post_init__(self):
        if self.precision not in ("auto", "bf16", "fp32"):
            raise BadConfig(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.log_every < 1 or self.ckpt_every < 1:
            raise BadConfig("log_every and ckpt_every must be >= 1")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise BadConfig("batch_size and grad_accum must be >= 1")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise BadConfig(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                                f"got {getattr(self, name)!r}")

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step `step` (1-based): linear warm-up, then constant."""
        return self.lr * min(1.0, step / self.warmup_steps) if self.warmup_steps else self.lr

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The shapes recipe (v-prediction, standardised pixels and text states) is what made models follow their
# captions on CPU measurements (docs/training.md, "What the shapes recipe is based on"): with the paper's
# epsilon recipe the caption barely moved the high-noise predictions that decide colour and layout.
SHAPES_RECIPE = dict(prediction="v", image_norm="channel", text_norm="token")

PRESETS: dict[str, TrainConfig] = {
    "coco": TrainConfig(),
    # 32 px pixels, patch 2: 256 patch tokens. 9-10M parameters, 7.5 GFLOPs: 20k steps in minutes on one H100.
    "shapes": TrainConfig(
        preset="shapes", width=256, depth=11, heads=4, patch_size=2,
        steps=20_000, batch_size=256, lr=3e-4, warmup_steps=1_000, ema_decay=0.9995,
        num_workers=8, log_every=100, ckpt_every=5_000, preview_every=2_000, **SHAPES_RECIPE,
    ),
    # A CPU run on the full world at 32 px: patch 4 keeps the sequence short (64 patches + 77 text tokens); a
    # short run needs a short EMA (0.99: ~100 steps). Colours and layout, not counts, in minutes.
    "tiny": TrainConfig(
        preset="tiny", width=128, depth=7, heads=4, patch_size=4,
        steps=900, batch_size=32, lr=1e-3, warmup_steps=100, ema_decay=0.99,
        num_workers=1, log_every=10, ckpt_every=300, preview_every=150, preview_steps=20, **SHAPES_RECIPE,
    ),
    # The CPU demo (`make demo`) on the `demo` world at 16 px: patch 2 gives the same 64 patches as `tiny` at
    # 32 px with objects 5-7 px wide; ~8 minutes of training on 2 cores.
    "demo": TrainConfig(
        preset="demo", width=128, depth=7, heads=4, patch_size=2,
        steps=1_500, batch_size=32, lr=1e-3, warmup_steps=100, ema_decay=0.99,
        num_workers=1, log_every=25, ckpt_every=500, preview_every=250, preview_steps=20, **SHAPES_RECIPE,
    ),
}


def default_preset(latent_format: str, cuda: bool) -> str:
    """The preset a shard set implies: VAE latents mean the paper's recipe; pixels mean the shapes world."""
    if latent_format == "moments":
        return "coco"
    return "shapes" if cuda else "tiny"


def _parse(kind, text: str):
    """Parse a CLI string into the type of a TrainConfig field (int, float, str, bool, or X | None)."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if args:  # Optional[X]
        if text.lower() in ("none", "auto", ""):
            return None
        kind = args[0]
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true/false, got {text!r}")
    return kind(text)


def field_types() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in fields(TrainConfig)}


def parse_overrides(pairs: dict[str, str]) -> dict:
    """{"lr": "1e-4", ...} -> {"lr": 1e-4, ...}; unknown names raise with the list of known ones."""
    types = field_types()
    unknown = sorted(set(pairs) - set(types))
    if unknown:
        raise UnknownName(f"unknown training option(s) {unknown}: known are {', '.join(types)}")
    parsed = {}
    for name, text in pairs.items():
        try:
            parsed[name] = _parse(types[name], text)
        except ValueError as exc:
            raise BadConfig(f"--{name.replace('_', '-')} {text}: {exc}") from exc
    return parsed


def make_config(preset: str, **overrides) -> TrainConfig:
    if preset not in PRESETS:
        raise UnknownName(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[preset], preset=preset, **overrides)
