"""CLIP score of generated images against the caption each was generated from (docs/design.md, "Recipe").

One cosine per image, between open_clip's normalised image and text embeddings of
"A photo depicts <prompt>" (Hessel et al.'s prefix), reported on two scales:

    clip_s = mean(2.5 * max(cos, 0))   Hessel CLIP-S: the paper's scale (its 0.584)
    cos100 = mean(100 * cos)           the "CLIP score" of most diffusion papers (torchmetrics also clamps
                                       at 0; it only differs for negative cosines, which real models rarely give)

The model is OpenAI's ViT-L/14 (`ViT-L-14-quickgelu:openai`) unless `--clip` names another; specs are the
pipeline's (`pipeline.encoders.parse_clip_spec`): NAME:TAG, NAME:FILE, a checkpoint FILE, local-dir:DIR.
"""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from pipeline.encoders import DEFAULT_CLIP, parse_clip_spec

PREFIX = "A photo depicts "


class ClipUnavailable(RuntimeError):
    """The CLIP weights cannot be had; the message says how to provide them."""


class ClipScorer:
    """uint8 images [B, 3, H, W] + prompts -> cosines [B] (float32, CPU)."""

    def __init__(self, model, preprocess, tokenizer, device: torch.device | str = "cpu", spec: str = "custom"):
        self.model = model.to(device).eval().requires_grad_(False)
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.device, self.spec = torch.device(device), spec

    @classmethod
    def load(cls, spec: str = DEFAULT_CLIP, device: torch.device | str = "cpu") -> "ClipScorer":
        import open_clip

        name, pretrained = parse_clip_spec(spec)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained,
                                                                         require_pretrained=True)
        except Exception as e:  # hub errors, missing files and bad configs all arrive as different types
            raise ClipUnavailable(
                f"could not load CLIP {spec!r} ({type(e).__name__}: {e}). Fix: run with hub "
                "access (unset HF_HUB_OFFLINE), or pass --clip NAME:FILE (e.g. ViT-L-14-quickgelu:/path/"
                "open_clip_pytorch_model.bin) or --clip local-dir:DIR") from e
        return cls(model, preprocess, open_clip.get_tokenizer(name), device, spec)

    @torch.no_grad()
    def cosines(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        # open_clip's own PIL transform (resize, crop, normalise), exactly what the model was trained with.
        pixels = torch.stack([self.preprocess(Image.fromarray(im.permute(1, 2, 0).cpu().numpy()))
                              for im in images]).to(self.device)
        tokens = self.tokenizer([PREFIX + p for p in prompts]).to(self.device)
        image_emb = self.model.encode_image(pixels, normalize=True).float()
        text_emb = self.model.encode_text(tokens, normalize=True).float()
        return (image_emb * text_emb).sum(-1).cpu()


def clip_scores(cosines: torch.Tensor) -> dict[str, float]:
    """Both reported scales from the same per-image cosines."""
    cos = cosines.double()
    return {"clip_s": float((2.5 * cos.clamp(min=0)).mean()), "cos100": float((100 * cos).mean())}


def score_samples(scorer: ClipScorer, samples_dir: str | Path, batch_size: int = 64) -> dict[str, float]:
    """CLIP scores of a samples folder, each image against the prompt stored beside it in index.jsonl."""
    from evaluate.sample_folder import iter_sample_batches

    cos = [scorer.cosines(images, [e["prompt"] for e in entries])
           for images, entries in iter_sample_batches(samples_dir, batch_size)]
    return clip_scores(torch.cat(cos))
