"""Image codecs (SD-VAE moments, raw pixels) and the CLIP text encoder (docs/CONTRACTS.md §3).

Both accept a hub id or a local path so that a laptop with hub access, an offline cluster and a test with
tiny random models of the same classes all go through the same code:

    image:  "pixels"                               identity on pixels, values in [-1, 1] (the shapes set)
            "stabilityai/sd-vae-ft-ema"            diffusers AutoencoderKL from the hub (the default for COCO)
            "/path/to/diffusers/folder"            the same, saved with save_pretrained
            "/path/autoencoder_kl.pth"             an ldm-layout KL autoencoder, e.g. U-ViT's (pipeline/ldm_vae.py)
    text:   "ViT-L-14-quickgelu:openai"            open_clip model name : pretrained tag (the default)
            "ViT-L-14-quickgelu:/path/weights.pt"  model name : checkpoint file (.pt/.bin/.safetensors)
            "/path/weights.pt"                     checkpoint file for the default architecture
            "local-dir:/path/folder"               open_clip_config.json + open_clip_pytorch_model.bin

Text states are what SD v1 and U-ViT condition on: the tower's token states after ln_final, 77 positions,
with every position after the end token computed for the end token 49407 (open_clip's tokenizer pads with 0).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ifvit.errors import BadConfig, MissingPath, Unavailable

TEXT_LEN = 77
START_TOKEN, END_TOKEN = 49406, 49407
DEFAULT_CLIP = "ViT-L-14-quickgelu:openai"
DEFAULT_CLIP_ARCH = "ViT-L-14-quickgelu"  # plain "ViT-L-14" builds GELU, not the QuickGELU OpenAI trained
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
PADDING_RULE = "positions after the end token hold the states of the end token 49407 (SD v1 / U-ViT padding)"

# stabilityai/sd-vae-ft-ema's config: the real architecture for `pipeline.bench` and for tests' shapes.
SD_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), sample_size=256, scaling_factor=0.18215,
)


def weights_sha256(module: torch.nn.Module) -> str:
    """Fingerprint of a module's weights: names the exact encoder in the manifest whatever its origin."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------- text

def parse_clip_spec(spec: str) -> tuple[str, str | None]:
    """(open_clip model name, pretrained tag or file) from a --clip spec (see the module docstring)."""
    if spec.startswith("local-dir:"):
        return spec, None
    if Path(spec).suffix in (".pt", ".bin", ".safetensors", ".pth") and ":" not in spec:
        return DEFAULT_CLIP_ARCH, spec
    name, _, pretrained = spec.partition(":")
    if not pretrained:
        raise BadConfig(f"--clip {spec!r} names no weights: use NAME:TAG (e.g. {DEFAULT_CLIP}), "
                         "NAME:FILE, a checkpoint FILE or local-dir:DIR")
    return name, pretrained


class TextEncoder:
    """open_clip text tower -> float32 [B, 77, D] token states after ln_final, SD/U-ViT padding."""

    def __init__(self, model, tokenizer, spec: str, device: str | torch.device = "cpu"):
        model.visual = None  # only the text tower is used: free the image tower's memory (300M for ViT-L)
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.spec = spec
        self.device = torch.device(device)
        self.dim = model.ln_final.normalized_shape[0]

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 77] token ids padded with END_TOKEN, and [B] bool: caption longer than 77 tokens (truncated).

        open_clip's tokenizer pads with 0 and hides truncation, so this repeats its two lines with the
        SD padding and keeps the count."""
        tokens = torch.full((len(captions), TEXT_LEN), END_TOKEN, dtype=torch.long)
        truncated = torch.zeros(len(captions), dtype=torch.bool)
        for i, caption in enumerate(captions):
            ids = [START_TOKEN] + self.tokenizer.encode(caption) + [END_TOKEN]
            if len(ids) > TEXT_LEN:
                ids, truncated[i] = ids[:TEXT_LEN - 1] + [END_TOKEN], True
            tokens[i, :len(ids)] = torch.tensor(ids)
        return tokens, truncated

    @torch.no_grad()
    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens.to(self.device)).to(cast) + m.positional_embedding.to(cast)
        x = m.transformer(x, attn_mask=m.attn_mask)
        return m.ln_final(x).float()

    def __call__(self, captions: list[str]) -> torch.Tensor:
        return self.encode_tokens(self.tokenize(captions)[0])

    def identity(self) -> dict:
        name, pretrained = parse_clip_spec(self.spec)
        return {"kind": "clip", "spec": self.spec, "model": name, "pretrained": pretrained,
                "weights_sha256": weights_sha256(self.model), "dtype": "float16",
                "text_len": TEXT_LEN, "text_dim": self.dim, "padding": PADDING_RULE}


def load_text_encoder(spec: str | dict = DEFAULT_CLIP, device: str | torch.device = "cpu") -> TextEncoder:
    """A TextEncoder from a --clip spec or a manifest's "text_encoder" entry (its "spec")."""
    import open_clip

    spec = spec["spec"] if isinstance(spec, dict) else spec
    name, pretrained = parse_clip_spec(spec)
    if name.startswith("local-dir:") and not (Path(name[len("local-dir:"):]) / "open_clip_config.json").is_file():
        raise MissingPath(f"no open_clip_config.json in {name[len('local-dir:'):]}: "
                                "a local-dir: folder holds open_clip_config.json and open_clip_pytorch_model.bin")
    if pretrained and Path(pretrained).suffix and not Path(pretrained).is_file():
        raise MissingPath(f"no CLIP checkpoint at {pretrained}: pass --clip NAME:FILE with an existing file")
    try:
        model = open_clip.create_model(name, pretrained=pretrained, require_pretrained=True)
    except Exception as e:
        raise Unavailable(
            f"could not load CLIP {spec!r} ({type(e).__name__}: {e}). Without hub access pass --clip with a "
            "checkpoint file (NAME:FILE) or an open_clip folder (local-dir:DIR); with access, unset HF_HUB_OFFLINE"
        ) from e
    return TextEncoder(model, open_clip.get_tokenizer(name), spec, device)


def save_random_text_encoder(out_dir: Path, seed: int = 0, width: int = 64, heads: int = 4,
                             layers: int = 2) -> str:
    """Write a seeded, randomly initialised CLIP text tower as an open_clip local-dir; return its spec.

    The shapes set has no public text encoder: its captions use ~30 words, which a random tower with the
    real vocabulary separates well enough; saving the weights lets evaluation encode new prompts identically.
    A one-layer 8 px image tower is kept only because open_clip's CLIP class requires one."""
    import open_clip

    model_cfg = {"embed_dim": width, "quick_gelu": True,
                 "vision_cfg": {"image_size": 8, "layers": 1, "width": 64, "patch_size": 8},
                 "text_cfg": {"context_length": TEXT_LEN, "vocab_size": 49408, "width": width,
                              "heads": heads, "layers": layers}}
    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    torch.save(model.state_dict(), out_dir / "open_clip_pytorch_model.bin")
    return f"local-dir:{out_dir}"


# ----------------------------------------------------------------------------------------- images

def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@dataclass
class PixelCodec:
    """Identity on pixels: the 'latent' is the image itself in [-1, 1] (the shapes set)."""
    scale: float = 1.0
    device: torch.device = torch.device("cpu")
    kind = "pixels"
    latent_format = "pixels"
    latent_channels = 3
    downsample = 1

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.device).float() / 127.5 - 1

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return _to_uint8(latents / self.scale)

    def identity(self) -> dict:
        return {"kind": self.kind, "spec": "pixels", "latent_format": self.latent_format}


class VAECodec:
    """diffusers AutoencoderKL: encode -> posterior moments (mean ‖ logvar, unscaled), decode <- scaled z."""
    kind = "sd-vae"
    latent_format = "moments"

    def __init__(self, vae, spec: str, scale: float, device: str | torch.device = "cpu"):
        self.vae = vae.to(device).eval().requires_grad_(False)
        self.spec, self.scale, self.device = spec, scale, torch.device(device)
        self.latent_channels = vae.config.latent_channels
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device).float() / 127.5 - 1
        return self.vae.encode(x).latent_dist.parameters.float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return _to_uint8(self.vae.decode(latents.to(self.device).float() / self.scale).sample)

    def identity(self) -> dict:
        return {"kind": self.kind, "spec": self.spec, "latent_format": self.latent_format,
                "weights_sha256": weights_sha256(self.vae), "scaling_factor_in_config": self.vae.config.scaling_factor}


def load_image_codec(spec: str | dict = "pixels", device: str | torch.device = "cpu",
                     scale: float | None = None) -> PixelCodec | VAECodec:
    """A codec from "pixels", a VAE hub id, folder or ldm FILE.pth, or a manifest's "image_encoder" entry.

    `scale` is the latent scale that `decode` undoes; a manifest entry carries its own ("latent_scale")."""
    if isinstance(spec, dict):
        scale = spec.get("latent_scale") if scale is None else scale
        spec = spec["spec"]
    if spec == "pixels":
        return PixelCodec(scale=1.0 if scale is None else scale, device=torch.device(device))
    from diffusers import AutoencoderKL

    from pipeline.ldm_vae import is_ldm_vae_file, load_ldm_vae

    if is_ldm_vae_file(spec):  # its config carries U-ViT's latent scale, 0.23010
        vae = load_ldm_vae(spec)
        return VAECodec(vae, spec, vae.config.scaling_factor if scale is None else scale, device)
    try:
        vae = AutoencoderKL.from_pretrained(spec, low_cpu_mem_usage=False)
    except Exception as e:
        raise Unavailable(
            f"could not load the VAE {spec!r} ({type(e).__name__}: {e}). Without hub access pass --vae with a "
            "local diffusers folder (AutoencoderKL.save_pretrained); with access, unset HF_HUB_OFFLINE"
        ) from e
    return VAECodec(vae, spec, vae.config.scaling_factor if scale is None else scale, device)
