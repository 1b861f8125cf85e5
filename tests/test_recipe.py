"""The training recipe's knobs: prediction target, loss weighting, normalisation, and what a run records.

Hand-computed losses, point-mass sampling with each target (as the epsilon sampler test does), the
normalisation's round trip and persistence, and a resumed run refusing a change of what its weights mean.
"""
import math

import pytest
import torch

from evaluate.sampler import SOLVERS, ContinuousSchedule, initial_noise, sample
from ifvit.errors import BadConfig
from train.config import TrainConfig, make_config
from train.diffusion import (NoiseSchedule, diffusion_loss, eps_from_prediction, loss_weight, prediction_target,
                             x0_from_prediction)
from train.normalization import Normalization

SCHEDULE = ContinuousSchedule()


class Constant(torch.nn.Module):
    """A 'network' whose output is a fixed tensor: the loss is then a closed-form number."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x, t, context):
        return self.value.expand_as(x)


def test_losses_by_hand():
    schedule = NoiseSchedule()
    t = torch.tensor([0, 500])
    x0 = torch.tensor([1.0, -2.0]).view(2, 1, 1, 1)
    eps = torch.tensor([0.5, 1.5]).view(2, 1, 1, 1)
    out = torch.tensor(0.25)
    a, s = schedule.sqrt_abar[t].double(), schedule.sqrt_one_minus_abar[t].double()
    # epsilon, uniform: mean of (0.25 - eps)^2 = ((-0.25)^2 + (-1.25)^2) / 2
    eps_loss = diffusion_loss(Constant(out), x0, None, schedule, t, eps)
    assert eps_loss.item() == pytest.approx((0.0625 + 1.5625) / 2, rel=1e-6)
    # v, uniform: target v = a eps - s x0, per sample
    v = [a[i] * eps.flatten()[i] - s[i] * x0.flatten()[i] for i in range(2)]
    expected_v = sum((0.25 - vi) ** 2 for vi in v) / 2
    assert diffusion_loss(Constant(out), x0, None, schedule, t, eps, prediction="v").item() == pytest.approx(
        float(expected_v), rel=1e-5)
    # min-SNR-5 with epsilon: weight min(snr, 5) / snr; t = 0 has snr ~ 1e3 (weight 5/snr), t = 500 below 5
    snr = (a / s) ** 2
    weights = [min(float(x), 5.0) / float(x) for x in snr]
    assert snr[1] < 5 < snr[0]
    expected = (weights[0] * 0.0625 + weights[1] * 1.5625) / 2
    got = diffusion_loss(Constant(out), x0, None, schedule, t, eps, weighting="min_snr", gamma=5.0)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # ... and with v: min(snr, 5) / (snr + 1)
    w_v = loss_weight(snr.float(), "v", "min_snr", 5.0)
    assert w_v.tolist() == pytest.approx([min(float(x), 5.0) / (float(x) + 1) for x in snr], rel=1e-5)
    assert loss_weight(snr.float(), "v", "uniform", 5.0).tolist() == [1.0, 1.0]


def test_targets_invert():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    schedule = NoiseSchedule()
    t = torch.tensor([0, 250, 750, 999])
    alpha, sigma = schedule.sqrt_abar[t], schedule.sqrt_one_minus_abar[t]
    x = schedule.add_noise(x0, eps, t)
    for prediction in ("epsilon", "v"):
        out = prediction_target(x0, eps, alpha, sigma, prediction)
        assert torch.allclose(eps_from_prediction(out, x, alpha, sigma, prediction), eps, atol=1e-4)
        assert torch.allclose(x0_from_prediction(out, x, alpha, sigma, prediction), x0, atol=2e-3)
    with pytest.raises(ValueError, match="prediction target"):
        prediction_target(x0, eps, alpha, sigma, "x0")


class PointMassV(torch.nn.Module):
    """The exact v-predictor of a one-point data set (x0 = the context's first number): v = alpha eps - sigma x0."""

    def forward(self, x, timesteps, context, record_attention=False):
        alpha, sigma = SCHEDULE.alpha_sigma(float(timesteps[0]))
        x0 = context[:, 0, 0].double().view(-1, 1, 1, 1)
        eps = (x.double() - alpha * x0) / sigma
        return (alpha * eps - sigma * x0).float()


def _context(values):
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1).expand(-1, 4, 3).contiguous()


@pytest.mark.parametrize("solver", SOLVERS)
def test_v_sampling_recovers_the_point_mass(solver):
    x = sample(PointMassV(), _context([0.7, -0.4]), _context([5.0])[0], steps=50, scale=0.0, seeds=[3, 4],
               latent_shape=(2, 4, 4), solver=solver, prediction="v")
    point = torch.tensor([0.7, -0.4]).view(2, 1, 1, 1)
    # the epsilon path's exact end point (tests/test_sampler.py): alpha_e x0 + sigma_e eps_T
    alpha_T, sigma_T = SCHEDULE.alpha_sigma(999.0)
    alpha_e, sigma_e = SCHEDULE.alpha_sigma(0.0) if solver == "uvit" else (1.0, 0.0)
    target = alpha_e * point + sigma_e * (initial_noise([3, 4], (2, 4, 4)) - alpha_T * point) / sigma_T
    assert (x - target).abs().max().item() < 2e-5


def test_sampler_normalises_text_and_maps_samples_back():
    """A point mass in normalised space: the text is standardised before the model reads it and the sample
    is mapped back, so the result is mean + std * (the point the standardised context names)."""
    norm = Normalization("channel", "token", image_mean=[1.0, -1.0], image_std=[2.0, 0.5],
                         text_mean=torch.full((4, 3), 0.1), text_std=torch.full((4, 3), 0.5))
    x = sample(PointMassV(), _context([0.7]), _context([0.0])[0], steps=50, scale=0.0, seeds=[1],
               latent_shape=(2, 4, 4), solver="dpmpp2m", prediction="v", normalization=norm)
    point = (0.7 - 0.1) / 0.5  # what the model read
    expected = torch.tensor([1.0 + 2.0 * point, -1.0 + 0.5 * point]).view(1, 2, 1, 1).expand(1, 2, 4, 4)
    assert torch.allclose(x, expected, atol=1e-4)


def test_normalization_round_trip_and_file(tmp_path):
    g = torch.Generator().manual_seed(1)
    stats = {"image_mean": torch.tensor([-0.86, -0.8, -0.9]).numpy(), "image_std": torch.tensor([0.44, 0.5, 0.4]).numpy(),
             "text_mean": torch.randn(5, 8, generator=g).numpy(), "text_std": (torch.rand(5, 8, generator=g) + 0.5).numpy()}
    norm = Normalization.from_statistics(stats, "channel", "token")
    x = torch.randn(2, 3, 4, 4, generator=g) * 0.44 - 0.86
    assert torch.allclose(norm.image_out(norm.image_in(x)), x, atol=1e-6)
    z = norm.image_in(x)
    assert z.mean(dim=(0, 2, 3)).abs().max() < 1.0  # standardised
    text = torch.randn(2, 5, 8, generator=g)
    assert torch.allclose(norm.text_in(text), (text - torch.as_tensor(stats["text_mean"])) / torch.as_tensor(stats["text_std"]))
    norm.save(tmp_path)
    loaded = Normalization.load(tmp_path, "channel", "token")
    assert torch.equal(loaded.image_in(x), z) and torch.equal(loaded.text_in(text), norm.text_in(text))
    # The paper's recipe needs no file and changes nothing.
    identity = Normalization.load(tmp_path / "elsewhere", "scale", "none")
    assert identity.is_identity and identity.image_in(x) is x and identity.text_in(text) is text
    with pytest.raises(FileNotFoundError, match="normalization.pt"):
        Normalization.load(tmp_path / "elsewhere", "channel", "none")


def test_presets_and_their_recipes():
    coco = make_config("coco")
    assert (coco.prediction, coco.loss_weighting, coco.image_norm, coco.text_norm) == ("epsilon", "uniform", "scale", "none")
    for name in ("shapes", "tiny", "demo"):
        cfg = make_config(name)
        assert (cfg.prediction, cfg.image_norm, cfg.text_norm) == ("v", "channel", "token")
    with pytest.raises(BadConfig, match="--prediction must be one of epsilon, v"):
        TrainConfig(prediction="x0")


def test_resume_refuses_a_change_of_meaning(shapes_shards):
    from pipeline.reader import ShardSet
    from train.trainer import resolve_configs

    ss = ShardSet(shapes_shards)
    cfg, mcfg = resolve_configs("if_concat", ss, None, "tiny", {}, None, None, cuda=False)
    saved = {"train": cfg.to_dict(), "model": mcfg.to_dict()}
    resumed, _ = resolve_configs("if_concat", ss, saved, None, {"lr": 5e-4}, None, None, cuda=False)
    assert resumed.prediction == "v" and resumed.lr == 5e-4
    with pytest.raises(BadConfig, match="--prediction would change what this run's weights mean"):
        resolve_configs("if_concat", ss, saved, None, {"prediction": "epsilon"}, None, None, cuda=False)
    # A run from before the options existed is the paper's recipe, and stays so.
    old = {"train": {k: v for k, v in saved["train"].items()
                     if k not in ("prediction", "loss_weighting", "min_snr_gamma", "image_norm", "text_norm")},
           "model": saved["model"]}
    assert resolve_configs("if_concat", ss, old, None, {}, None, None, cuda=False)[0].prediction == "epsilon"
    with pytest.raises(BadConfig, match="--image-norm"):
        resolve_configs("if_concat", ss, old, None, {"image_norm": "channel"}, None, None, cuda=False)


def test_min_snr_weight_is_clipped_snr_over_snr():
    snr = torch.tensor([0.5, 5.0, 50.0])
    assert loss_weight(snr, "epsilon", "min_snr", 5.0).tolist() == pytest.approx([1.0, 1.0, 0.1])
    assert not math.isnan(loss_weight(torch.tensor([1e4]), "epsilon", "min_snr", 5.0).item())
