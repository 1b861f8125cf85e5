"""The sampler: DPM-Solver++ solves the ODE, guidance is U-ViT's formula, seeds are per image."""
import pytest
import torch

from evaluate.sampler import initial_noise, sample
from train.diffusion import alphas_cumprod, guidance_scale_equivalent, guided_eps
from train.model import ModelConfig, UViT

ABAR = alphas_cumprod()  # float64, the trainer's schedule


class PointMassDenoiser(torch.nn.Module):
    """The exact eps-predictor of a data set that is one point: x0 = the context's first number everywhere.

    eps(x_t, t) = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t), in float64.
    """

    def forward(self, x, timesteps, context, record_attention=False):
        abar = ABAR[timesteps].view(-1, 1, 1, 1)
        x0 = context[:, 0, 0].double().view(-1, 1, 1, 1)
        return ((x.double() - abar.sqrt() * x0) / (1 - abar).sqrt()).float()


def _point_context(values, text_len=4, dim=3):
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1).expand(-1, text_len, dim).contiguous()


def test_exact_denoiser_recovers_the_point_in_50_steps():
    context = _point_context([0.7, -0.4])
    null = _point_context([5.0])[0]  # scale 0: the unconditional half must not matter
    x = sample(PointMassDenoiser(), context, null, steps=50, scale=0.0, seeds=[3, 4], latent_shape=(2, 4, 4))
    target = torch.tensor([0.7, -0.4]).view(2, 1, 1, 1).expand_as(x)
    assert (x - target).abs().max().item() < 2e-6


def test_guidance_formula_by_hand():
    eps_c, eps_u = torch.tensor([0.5, -1.0]), torch.tensor([0.2, 1.0])
    # s = 3: 0.5 + 3 * (0.5 - 0.2) = 1.4 ; -1.0 + 3 * (-1.0 - 1.0) = -7.0
    assert torch.allclose(guided_eps(eps_c, eps_u, 3.0), torch.tensor([1.4, -7.0]))
    assert torch.equal(guided_eps(eps_c, eps_u, 0.0), eps_c)
    assert guidance_scale_equivalent(1.0) == 2.0  # diffusers' guidance_scale for U-ViT's s = 1


def test_sampler_applies_guidance_with_the_null_context():
    # Conditional point c1, unconditional point c0: eps_c + s (eps_c - eps_u) is the exact denoiser of the
    # point c1 + s (c1 - c0), so the guided sampler must land there: 0.3 + 2 * (0.3 - (-0.1)) = 1.1.
    x = sample(PointMassDenoiser(), _point_context([0.3]), _point_context([-0.1])[0], steps=50, scale=2.0,
               seeds=[0], latent_shape=(1, 2, 2))
    assert torch.allclose(x, torch.full_like(x, 1.1), atol=1e-5)


def tiny_model():
    torch.manual_seed(0)
    cfg = ModelConfig(fusion="intermediate", conditioning="concat", n_text=1, n_image=1, in_chans=3,
                      img_size=8, patch_size=2, width=32, depth=5, heads=2, text_len=5, text_dim=16)
    return UViT(cfg).eval()


def test_same_prompt_and_seed_give_the_same_image_in_any_batch():
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    prompts = torch.randn(3, 5, 16, generator=g)
    null = torch.randn(5, 16, generator=g)
    together = sample(model, prompts, null, steps=8, scale=3.0, seeds=[10, 11, 12])
    reordered = sample(model, prompts[[2, 0]], null, steps=8, scale=3.0, seeds=[12, 10])
    alone = sample(model, prompts[1:2], null, steps=8, scale=3.0, seeds=[11])
    assert torch.allclose(together[[2, 0]], reordered, atol=1e-5)
    assert torch.allclose(together[1:2], alone, atol=1e-5)
    # ... and a different seed or prompt gives a different image.
    other_seed = sample(model, prompts[1:2], null, steps=8, scale=3.0, seeds=[99])
    assert (other_seed - alone).abs().max() > 0.1
    assert (together[0] - together[1]).abs().max() > 0.1
    # Default seeds are seed + i.
    assert torch.equal(sample(model, prompts, null, steps=8, scale=3.0, seed=10), together)


def test_initial_noise_depends_only_on_each_seed():
    a = initial_noise([5, 6], (3, 4, 4))
    assert torch.equal(a[1], initial_noise([6], (3, 4, 4))[0])
    assert not torch.equal(a[0], a[1])


def test_attention_callback_sees_the_conditional_half_every_step():
    model = tiny_model()
    g = torch.Generator().manual_seed(2)
    prompts, null = torch.randn(2, 5, 16, generator=g), torch.randn(5, 16, generator=g)
    seen = []

    def callback(step, t, maps):
        seen.append((step, t, maps))

    with_maps = sample(model, prompts, null, steps=4, scale=1.0, seeds=[1, 2], attention_callback=callback)
    assert torch.allclose(with_maps, sample(model, prompts, null, steps=4, scale=1.0, seeds=[1, 2]), atol=1e-6)
    assert [s for s, _, _ in seen] == [0, 1, 2, 3] and seen[0][1] == 999
    maps = seen[0][2]
    assert set(maps) == set(model.fused_block_names())
    # Step 0 runs on the initial noise: the maps must equal the model's own on the conditional batch alone.
    x0 = initial_noise([1, 2], (3, 8, 8))
    _, extras = model(x0, torch.full((2,), 999), prompts, record_attention=True)
    for name, probs in maps.items():
        assert probs.shape == (2, 2, 16, 5)
        assert torch.allclose(probs, extras["attention"][name], atol=1e-5)


def test_wrong_number_of_seeds_names_the_fix():
    with pytest.raises(ValueError, match="one seed per prompt"):
        sample(PointMassDenoiser(), _point_context([0.1, 0.2]), _point_context([0.0])[0], steps=2,
               seeds=[1], latent_shape=(1, 2, 2))


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
def test_cuda_bf16_sampler_matches_cpu_fp32_per_seed():
    model = tiny_model()
    g = torch.Generator().manual_seed(3)
    prompts, null = torch.randn(3, 5, 16, generator=g), torch.randn(5, 16, generator=g)
    on_cpu = sample(model, prompts, null, steps=8, scale=1.0, seeds=[4, 5, 6])
    cuda_model = model.cuda()
    on_gpu = sample(cuda_model, prompts.cuda(), null.cuda(), steps=8, scale=1.0, seeds=[4, 5, 6]).cpu()
    alone = sample(cuda_model, prompts[1:2].cuda(), null.cuda(), steps=8, scale=1.0, seeds=[5]).cpu()
    assert (on_gpu - on_cpu).abs().max() < 0.05  # bf16 autocast against fp32: same image, rounding apart
    assert (alone - on_gpu[1:2]).abs().max() < 0.05


@pytest.mark.gpu
@gpu
def test_compiled_model_samples_like_eager():
    model = tiny_model().cuda()
    g = torch.Generator().manual_seed(4)
    prompts, null = torch.randn(2, 5, 16, generator=g).cuda(), torch.randn(5, 16, generator=g).cuda()
    eager = sample(model, prompts, null, steps=4, scale=1.0, seeds=[1, 2])
    model.compile()
    assert (sample(model, prompts, null, steps=4, scale=1.0, seeds=[1, 2]) - eager).abs().max() < 0.05
