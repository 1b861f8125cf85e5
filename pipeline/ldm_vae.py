"""`--vae FILE.pth`: a KL autoencoder in the original latent-diffusion (CompVis `ldm`) key layout as a
diffusers AutoencoderKL, e.g. U-ViT's assets/stable-diffusion/autoencoder_kl.pth (docs/offline.md).

The key mapping is diffusers' own `convert_ldm_vae_checkpoint` (it also turns the 1x1-conv attention
projections into linear layers); it runs offline because the architecture is read from the tensors' shapes
here, not from a hub config. The file is read with `torch.load(weights_only=True)`: no pickled code runs.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ifvit.errors import BadConfig, MissingPath

LDM_VAE_SUFFIXES = (".pth", ".ckpt")
UVIT_LATENT_SCALE = 0.23010  # U-ViT's scale_factor for this autoencoder on MS-COCO (configs/mscoco_uvit_small.py)
LDM_NORM_GROUPS = 32  # ldm's Normalize() always uses 32 groups: the one thing the shapes cannot tell


def is_ldm_vae_file(spec) -> bool:
    return isinstance(spec, str) and Path(spec).suffix in LDM_VAE_SUFFIXES


def read_ldm_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The autoencoder's tensors, without a `first_stage_model.` / `vae.` prefix or a `state_dict` wrapper."""
    path = Path(path)
    if not path.is_file():
        raise MissingPath(f"no VAE file at {path}: pass --vae with U-ViT's assets/stable-diffusion/autoencoder_kl.pth "
                          "(or another ldm-layout KL autoencoder), a diffusers folder or a hub id")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for a file that carries objects beyond tensors
        raise BadConfig(f"{path} cannot be read as plain tensors ({type(e).__name__}: {str(e).splitlines()[0]}): "
                        "only weights-only state dicts are loaded, no pickled code is run") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a full latent-diffusion .ckpt
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BadConfig(f"{path} is not a state dict of tensors")
    for prefix in ("first_stage_model.", "vae."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    state = {k: v for k, v in state.items() if not k.startswith("loss.")}  # an ldm training ckpt's discriminator
    if "quant_conv.weight" not in state or "encoder.conv_in.weight" not in state:
        raise BadConfig(f"{path} holds no ldm KL autoencoder (no encoder.conv_in / quant_conv tensors); its first "
                        f"keys are {sorted(state)[:4]}")
    return state


def diffusers_config(state: dict[str, torch.Tensor]) -> dict:
    """AutoencoderKL arguments that fit the ldm tensors (ldm's Encoder/Decoder with attn_resolutions=[])."""
    levels = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
    if any(re.match(r"(en|de)coder\.(down|up)\.\d+\.attn\.", k) for k in state):
        raise BadConfig("this autoencoder has attention inside its down/up blocks (attn_resolutions), which "
                        "diffusers' AutoencoderKL cannot express; SD's KL-f8 has none")
    n = len(levels)
    return dict(in_channels=state["encoder.conv_in.weight"].shape[1],
                out_channels=state["decoder.conv_out.weight"].shape[0],
                latent_channels=state["post_quant_conv.weight"].shape[1], layers_per_block=len(blocks),
                norm_num_groups=LDM_NORM_GROUPS, down_block_types=("DownEncoderBlock2D",) * n,
                up_block_types=("UpDecoderBlock2D",) * n,
                block_out_channels=tuple(state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in levels),
                scaling_factor=UVIT_LATENT_SCALE)


def load_ldm_vae(path: str | Path):
    """diffusers AutoencoderKL with the file's weights; every tensor must land (none left over, none missing)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    state = read_ldm_state_dict(path)
    try:
        config = diffusers_config(state)
        vae = AutoencoderKL(**config)
    except (KeyError, ValueError, IndexError) as e:
        raise BadConfig(f"{path}: the tensors do not form a KL autoencoder ({type(e).__name__}: {e})") from e
    converted = convert_ldm_vae_checkpoint(state, config)
    expected = vae.state_dict()
    wrong = [k for k, v in converted.items() if k not in expected or expected[k].shape != v.shape]
    missing = sorted(set(expected) - set(converted))
    if wrong or missing or len(converted) != len(state):
        raise BadConfig(f"{path} does not map onto AutoencoderKL{config['block_out_channels']}: "
                        f"{len(missing)} tensor(s) missing (e.g. {missing[:2]}), {len(wrong)} unexpected or "
                        f"misshapen (e.g. {wrong[:2]}), {len(state) - len(converted)} left unused")
    vae.load_state_dict(converted, strict=True)
    return vae
