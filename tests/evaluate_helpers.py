"""Tiny stand-ins for the real evaluation weights (Inception, CLIP ViT-L/14), which tests cannot download."""
import json
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

TINY_FID = "ifvit-tiny-test"


class TinyFeatures(FeatureExtractorBase):
    """A seeded random conv net on uint8 images -> 16 features: runs the whole FID path offline in ms."""

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        g = torch.Generator().manual_seed(0)
        self.register_buffer("weight", torch.randn(16, 3, 4, 4, generator=g) / 8)

    @staticmethod
    def get_provided_features_list():
        return ("16",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "16"

    @staticmethod
    def can_be_compiled():
        return False

    def forward(self, x):
        x = F.interpolate(x.float() / 255, size=(16, 16), mode="bilinear", align_corners=False)
        return (F.relu(F.conv2d(x, self.weight, stride=4)).mean(dim=(2, 3)),)


def register_tiny_fid() -> str:
    if TINY_FID not in FEATURE_EXTRACTORS_REGISTRY:  # torch-fidelity refuses a second registration
        torch_fidelity.register_feature_extractor(TINY_FID, TinyFeatures)
    return TINY_FID


TINY_CLIP_CFG = dict(embed_dim=32, quick_gelu=True,
                     vision_cfg=dict(image_size=32, layers=1, width=64, patch_size=8),
                     text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=2))


def write_tiny_clip(folder: Path, seed: int = 0) -> str:
    """A seeded random open_clip CLIP saved as local-dir: (the offline route of --clip); returns the spec."""
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CLIP_CFG)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CFG, "preprocess_cfg": {}}))
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return f"local-dir:{folder}"
