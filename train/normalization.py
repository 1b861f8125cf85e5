"""How a run scales what the network sees: images per channel, text states per token and channel.

    norm = Normalization.from_statistics(stats, image="channel", text="token")   # a new run
    norm = Normalization.load(run.path)                                          # a trained one
    x0 = norm.image_in(to_model_input(...)); context = norm.text_in(text)        # training
    x = norm.image_out(sampled)                                                  # before decoding

"scale" and "none" are the identity (the paper's recipe: latents times the set's latent scale, raw CLIP
states), so such a run needs no statistics and stays readable by U-ViT's code. The statistics a run was
trained with are copied into the run directory (normalization.pt, tensors only), so a run samples the same
way when its shard set is rebuilt, moved or recomputed. Why standardise at all: the `shapes` pixels have
mean -0.86 and std 0.44 per channel, so at high noise the model's input is almost all noise and the
epsilon loss barely depends on the image it implies (docs/training.md).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ifvit.errors import MissingPath
from ifvit.files import atomic_path

FILE = "normalization.pt"


class Normalization:
    def __init__(self, image: str = "scale", text: str = "none", image_mean=None, image_std=None,
                 text_mean=None, text_std=None):
        self.image, self.text = image, text
        self.image_mean = None if image_mean is None else torch.as_tensor(image_mean, dtype=torch.float32)
        self.image_std = None if image_std is None else torch.as_tensor(image_std, dtype=torch.float32)
        self.text_mean = None if text_mean is None else torch.as_tensor(text_mean, dtype=torch.float32)
        self.text_std = None if text_std is None else torch.as_tensor(text_std, dtype=torch.float32)
        if image == "channel" and (self.image_mean is None or self.image_std is None):
            raise ValueError("image_norm 'channel' needs per-channel statistics")
        if text == "token" and (self.text_mean is None or self.text_std is None):
            raise ValueError("text_norm 'token' needs per-token statistics")

    @classmethod
    def identity(cls) -> "Normalization":
        return cls()

    @classmethod
    def from_statistics(cls, stats: dict, image: str, text: str) -> "Normalization":
        """From pipeline.statistics arrays; only the parts the chosen modes use are kept."""
        return cls(image, text,
                   *((stats["image_mean"], stats["image_std"]) if image == "channel" else (None, None)),
                   *((stats["text_mean"], stats["text_std"]) if text == "token" else (None, None)))

    @property
    def is_identity(self) -> bool:
        return self.image == "scale" and self.text == "none"

    # -- the four maps (tensors on any device; statistics follow them)

    def _channel(self, stat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return stat.to(x.device, x.dtype).view(1, -1, *([1] * (x.dim() - 2)))

    def image_in(self, x: torch.Tensor) -> torch.Tensor:
        if self.image == "scale":
            return x
        return (x - self._channel(self.image_mean, x)) / self._channel(self.image_std, x)

    def image_out(self, z: torch.Tensor) -> torch.Tensor:
        if self.image == "scale":
            return z
        return z * self._channel(self.image_std, z) + self._channel(self.image_mean, z)

    def text_in(self, text: torch.Tensor) -> torch.Tensor:
        """[..., T, D] states -> what the model reads (the null text goes through here too)."""
        if self.text == "none":
            return text
        return (text - self.text_mean.to(text.device, text.dtype)) / self.text_std.to(text.device, text.dtype)

    # -- persistence

    def state_dict(self) -> dict:
        return {"image": self.image, "text": self.text,
                **{k: getattr(self, k) for k in ("image_mean", "image_std", "text_mean", "text_std")
                   if getattr(self, k) is not None}}

    def save(self, run_path: str | Path) -> Path:
        path = Path(run_path) / FILE
        with atomic_path(path) as tmp:
            torch.save(self.state_dict(), tmp)
        return path

    @classmethod
    def load(cls, run_path: str | Path, image: str = "scale", text: str = "none") -> "Normalization":
        """A run's normalisation: the identity when its modes need no statistics (every run trained before
        these options existed, converted U-ViT runs), else its saved file."""
        if image == "scale" and text == "none":
            return cls.identity()
        path = Path(run_path) / FILE
        if not path.is_file():
            raise MissingPath(f"{run_path} was trained with image_norm {image!r} / text_norm {text!r} but "
                                    f"has no {FILE}: copy it along with the run directory")
        state = torch.load(path, map_location="cpu", weights_only=True)
        return cls(**state)
