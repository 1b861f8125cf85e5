"""`--vae FILE.pth`: an ldm-layout KL autoencoder (U-ViT's autoencoder_kl.pth) loads as the diffusers one.

A tiny random diffusers AutoencoderKL is exported into the ldm key layout by an inverse mapping written here
(independent of diffusers' converter, which the loader uses), saved as a .pth, loaded back through the
pipeline's codec, and must encode and decode exactly as the original.
"""
import json
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image

from ifvit.errors import BadConfig
from pipeline.encoders import load_image_codec
from pipeline.ldm_vae import UVIT_LATENT_SCALE


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)  # ldm always normalises in 32 groups: channels are multiples of 32
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4,
                         norm_num_groups=32, sample_size=64).eval()


def to_ldm(state: dict, levels: int) -> dict:
    """diffusers AutoencoderKL keys -> CompVis ldm keys (the layout of U-ViT's autoencoder_kl.pth)."""
    out = {}
    for key, value in state.items():
        k = key
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        # diffusers' up_blocks run from the lowest resolution up; ldm's up.{i} are numbered by resolution
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.",
                   lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.block.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                   lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.upsample.", k)
        k = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m.group(1)) + 1}.", k)
        k = k.replace(".conv_shortcut.", ".nin_shortcut.").replace(".conv_norm_out.", ".norm_out.")
        if ".mid_block.attentions.0." in k:
            k = k.replace(".mid_block.attentions.0.", ".mid.attn_1.")
            k = (k.replace("group_norm.", "norm.").replace("to_q.", "q.").replace("to_k.", "k.")
                 .replace("to_v.", "v.").replace("to_out.0.", "proj_out."))
            if value.ndim == 2:  # ldm's attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        out[k] = value.clone()
    return out


@pytest.fixture(scope="module")
def ldm_file(tmp_path_factory):
    vae = tiny_vae()
    path = tmp_path_factory.mktemp("uvit") / "autoencoder_kl.pth"
    ldm = to_ldm(vae.state_dict(), levels=3)
    assert "decoder.mid.attn_1.q.weight" in ldm and ldm["decoder.mid.attn_1.q.weight"].ndim == 4
    assert "encoder.down.0.block.0.norm1.weight" in ldm and "post_quant_conv.weight" in ldm
    torch.save(ldm, path)
    return vae, path


def test_ldm_file_encodes_and_decodes_exactly_as_the_diffusers_model(ldm_file):
    vae, path = ldm_file
    codec = load_image_codec(str(path))
    assert codec.scale == UVIT_LATENT_SCALE and codec.latent_channels == 4 and codec.downsample == 4
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        expected_moments = vae.encode(images.float() / 127.5 - 1).latent_dist.parameters
        moments = codec.encode(images)
        assert torch.equal(moments, expected_moments)
        z = moments[:, :4] * UVIT_LATENT_SCALE
        expected = vae.decode(z / UVIT_LATENT_SCALE).sample
        assert torch.equal(codec.vae.decode(z / codec.scale).sample, expected)
    assert torch.equal(codec.decode(z), ((expected.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))


def test_ldm_checkpoint_with_prefix_and_wrapper_loads(ldm_file, tmp_path):
    vae, path = ldm_file
    state = torch.load(path, weights_only=True)
    wrapped = tmp_path / "model.ckpt"  # a full latent-diffusion checkpoint: state_dict, first_stage_model.
    torch.save({"state_dict": {f"first_stage_model.{k}": v for k, v in state.items()}}, wrapped)
    codec = load_image_codec(str(wrapped))
    x = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    assert torch.equal(codec.encode(x), load_image_codec(str(path)).encode(x))


class Payload:
    def __reduce__(self):  # would run on unpickling if the loader allowed code
        return (print, ("this must never run",))


def test_pickled_code_and_wrong_files_are_refused(ldm_file, tmp_path, capsys):
    _, path = ldm_file
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"encoder.conv_in.weight": Payload()}))
    with pytest.raises(BadConfig, match="plain tensors"):
        load_image_codec(str(evil))
    assert "must never run" not in capsys.readouterr().out
    state = torch.load(path, weights_only=True)
    broken = tmp_path / "broken.pth"
    torch.save({k: v for k, v in state.items() if "decoder.mid.attn_1.q" not in k}, broken)
    with pytest.raises(BadConfig, match="missing"):
        load_image_codec(str(broken))
    other = tmp_path / "unet.pth"
    torch.save({"x.weight": torch.zeros(1)}, other)
    with pytest.raises(BadConfig, match="no ldm KL autoencoder"):
        load_image_codec(str(other))


def test_pipeline_job_with_the_ldm_file_records_uvit_scale(ldm_file, tmp_path):
    """`--vae FILE.pth` in an encoding job: its moments are the model's, its scale U-ViT's 0.23010."""
    from pipeline.__main__ import main
    from pipeline.reader import ShardSet

    vae, path = ldm_file
    (tmp_path / "img").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": f"picture number {i}", "split": "val" if i == 2 else "train"})
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "set"
    assert main(["table", "--table", str(tmp_path / "t.jsonl"), "--image-root", str(tmp_path / "img"),
                 "--out", str(out), "--resolution", "64", "--vae", str(path), "--clip", "random",
                 "--executor", "local", "--workers", "1"]) == 0
    ss = ShardSet(out)
    image = ss.manifest["image_encoder"]
    assert ss.latent_scale == UVIT_LATENT_SCALE and "U-ViT" in image["latent_scale_source"]
    record = next(ss.records("val"))
    pixels = torch.from_numpy(np.asarray(Image.open(tmp_path / "img" / "2.png")).transpose(2, 0, 1).copy())
    with torch.no_grad():
        expected = vae.encode(pixels[None].float() / 127.5 - 1).latent_dist.parameters[0].half().numpy()
    np.testing.assert_array_equal(record["latent"], expected)
