"""The sampler: two ODE solvers (U-ViT's DPM-Solver path and diffusers' multistep DPM-Solver++), U-ViT's
guidance formula, per-image seeds; checked against denoisers whose exact ODE solution is known."""
import math

import pytest
import torch

from evaluate.sampler import SOLVERS, ContinuousSchedule, initial_noise, sample, uvit_grid, uvit_orders
from train.diffusion import alphas_cumprod, eps_from_prediction, guidance_scale_equivalent, guided_eps
from train.model import ModelConfig, UViT

ABAR = alphas_cumprod()  # float64, the trainer's schedule
SCHEDULE = ContinuousSchedule()  # alpha, sigma at the (fractional) labels the solvers call the model with


def end_alpha_sigma(solver):
    """Where each solver stops: U-ViT's path at label 0 (its continuous time 1/N), diffusers' at sigma 0."""
    return SCHEDULE.alpha_sigma(0.0) if solver == "uvit" else (1.0, 0.0)


class PointMassDenoiser(torch.nn.Module):
    """The exact eps-predictor of a data set that is one point: x0 = the context's first number everywhere.

    eps(x_t, t) = (x_t - alpha_t x0) / sigma_t, in float64. Its probability-flow ODE keeps eps constant, so
    the exact end point is alpha_e x0 + sigma_e eps_T.
    """

    def forward(self, x, timesteps, context, record_attention=False):
        alpha, sigma = SCHEDULE.alpha_sigma(float(timesteps[0]))
        x0 = context[:, 0, 0].double().view(-1, 1, 1, 1)
        return ((x.double() - alpha * x0) / sigma).float()


def point_mass_end(point, noise, solver):
    alpha_T, sigma_T = SCHEDULE.alpha_sigma(999.0)
    alpha_e, sigma_e = end_alpha_sigma(solver)
    return alpha_e * point + sigma_e * (noise.double() - alpha_T * point) / sigma_T


def _point_context(values, text_len=4, dim=3):
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1).expand(-1, text_len, dim).contiguous()


@pytest.mark.parametrize("solver", SOLVERS)
def test_exact_denoiser_recovers_the_point_in_50_steps(solver):
    context = _point_context([0.7, -0.4])
    null = _point_context([5.0])[0]  # scale 0: the unconditional half must not matter
    x = sample(PointMassDenoiser(), context, null, steps=50, scale=0.0, seeds=[3, 4], latent_shape=(2, 4, 4),
               solver=solver)
    point = torch.tensor([0.7, -0.4], dtype=torch.float64).view(2, 1, 1, 1)
    target = point_mass_end(point, initial_noise([3, 4], (2, 4, 4)), solver)
    assert (x - target).abs().max().item() < 2e-6
    if solver == "dpmpp2m":  # sigma 0: the point itself
        assert (x - point).abs().max().item() < 2e-6


# -- the Gaussian case: data N(0, s^2 I) -----------------------------------------------------------------
# The exact eps-predictor is E[eps | x_t] = sigma_t x_t / v_t with v_t = alpha_t^2 s^2 + sigma_t^2, and the
# probability-flow ODE is linear and keeps x_t ~ N(0, v_t I), so its solution is x_e = x_T sqrt(v_e / v_T).
GAUSS_S = 0.5
GAUSS_SEEDS, GAUSS_SHAPE = [0, 1, 2, 3], (4, 32, 32)
# U-ViT's own dpm_solver_pp.py (DPM_Solver(predict_x0=True).sample(z, steps=50, eps=1/N, T=1), method 'fast',
# NoiseScheduleVP('discrete', SD betas), float64), run outside this repository on this same noise and denoiser.
UVIT_OWN_50_STEP_ERROR = 3.0884e-2


class GaussianDenoiser(torch.nn.Module):
    def forward(self, x, timesteps, context, record_attention=False):
        alpha, sigma = SCHEDULE.alpha_sigma(float(timesteps[0]))
        return (sigma * x.double() / (alpha**2 * GAUSS_S**2 + sigma**2)).float()


def gaussian_run(solver, steps):
    context = torch.zeros(len(GAUSS_SEEDS), 2, 3)
    return sample(GaussianDenoiser(), context, context[0], steps=steps, scale=0.0, seeds=GAUSS_SEEDS,
                  latent_shape=GAUSS_SHAPE, solver=solver).double()


def gaussian_exact(solver):
    def variance(alpha, sigma):
        return alpha**2 * GAUSS_S**2 + sigma**2
    ratio = variance(*end_alpha_sigma(solver)) / variance(*SCHEDULE.alpha_sigma(999.0))
    return initial_noise(GAUSS_SEEDS, GAUSS_SHAPE).double() * math.sqrt(ratio)


def test_gaussian_data_errors_against_the_exact_ode_solution():
    """50 steps against the exact end point of each solver and against its own 999-step solution.

    Measured (max abs over 16,384 values, |x_T| <= 4.1): uvit 3.088e-2 vs exact, 3.150e-2 vs its 999-step
    end point (which is 6.2e-4 from exact); dpmpp2m 6.654e-2 vs exact, 5.987e-2 vs 999 steps (6.7e-3).
    """
    errors = {}
    for solver in SOLVERS:
        exact, fifty, many = gaussian_exact(solver), gaussian_run(solver, 50), gaussian_run(solver, 999)
        errors[solver] = ((fifty - exact).abs().max().item(), (fifty - many).abs().max().item(),
                          (many - exact).abs().max().item())
    uvit, dpmpp2m = errors["uvit"], errors["dpmpp2m"]
    # U-ViT's path, reproduced: its 50-step error is U-ViT's own, not more.
    assert uvit[0] <= UVIT_OWN_50_STEP_ERROR * (1 + 1e-4)
    assert abs(uvit[0] - UVIT_OWN_50_STEP_ERROR) < 1e-5
    assert abs(uvit[1] - 3.150e-2) < 1e-4 and uvit[2] < 1e-3
    assert abs(dpmpp2m[0] - 6.654e-2) < 2e-4 and abs(dpmpp2m[1] - 5.987e-2) < 2e-4 and dpmpp2m[2] < 1e-2
    assert uvit[0] < dpmpp2m[0] / 2


def test_continuous_schedule_is_the_training_schedule_at_integer_labels():
    for t in (0, 1, 500, 998, 999):
        alpha, sigma = SCHEDULE.alpha_sigma(float(t))
        assert alpha == pytest.approx(ABAR[t].sqrt().item(), rel=1e-12)
        assert sigma == pytest.approx((1 - ABAR[t]).sqrt().item(), rel=1e-12)
    # Between labels log(alpha) is linear (U-ViT's interpolation), so alpha is the geometric mean at a half.
    assert SCHEDULE.alpha_sigma(10.5)[0] == pytest.approx((ABAR[10] * ABAR[11]).sqrt().sqrt().item(), rel=1e-12)
    with pytest.raises(ValueError, match="outside"):
        SCHEDULE.log_alpha(999.5)


def test_uvit_orders_and_grid_are_u_vits_fast_schedule():
    assert uvit_orders(50) == [3] * 16 + [2]
    assert uvit_orders(51) == [3] * 16 + [2, 1] and uvit_orders(52) == [3] * 17 + [1]
    assert uvit_orders(1) == [1] and uvit_orders(2) == [2] and uvit_orders(3) == [2, 1]
    assert all(sum(uvit_orders(n)) == n for n in range(1, 100))
    grid = uvit_grid(50)
    assert len(grid) == 51 and grid[0] == 999 and grid[-1] == 0
    assert grid[1] == pytest.approx(979.02)  # U-ViT's continuous time 0.98002 -> its label 980.02 = ours + 1


class LabelRecorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.labels = []

    def forward(self, x, timesteps, context, record_attention=False):
        assert torch.all(timesteps == timesteps[0])
        self.labels.append((timesteps.dtype, float(timesteps[0])))
        return torch.zeros_like(x)


@pytest.mark.parametrize("solver", SOLVERS)
def test_each_solver_calls_the_model_steps_times_at_its_labels(solver):
    model = LabelRecorder()
    sample(model, _point_context([0.0]), _point_context([0.0])[0], steps=50, seeds=[0], latent_shape=(1, 2, 2),
           solver=solver)
    dtypes, labels = zip(*model.labels)
    assert len(labels) == 50
    if solver == "uvit":  # every grid point but the end, fractional, in this project's labels (999 .. 0)
        assert set(dtypes) == {torch.float32}
        assert labels == pytest.approx(uvit_grid(50)[:-1], abs=1e-4)
    else:  # diffusers' integer timesteps
        assert set(dtypes) == {torch.long} and labels[0] == 999 and labels[-1] == 20  # then a step to sigma 0


def test_v_prediction_converts_to_eps():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    alpha, sigma = SCHEDULE.alpha_sigma(321.0)
    x = alpha * x0 + sigma * eps
    assert torch.allclose(eps_from_prediction(alpha * eps - sigma * x0, x, alpha, sigma, "v"), eps, atol=1e-6)
    assert eps_from_prediction(eps, x, alpha, sigma, "epsilon") is eps
    with pytest.raises(ValueError, match="prediction target"):
        eps_from_prediction(eps, x, alpha, sigma, "x0")


def test_unknown_solver_names_the_choices():
    with pytest.raises(ValueError, match="uvit, dpmpp2m"):
        sample(PointMassDenoiser(), _point_context([0.1]), _point_context([0.0])[0], steps=2, seeds=[1],
               latent_shape=(1, 2, 2), solver="ddim")


def test_guidance_formula_by_hand():
    eps_c, eps_u = torch.tensor([0.5, -1.0]), torch.tensor([0.2, 1.0])
    # s = 3: 0.5 + 3 * (0.5 - 0.2) = 1.4 ; -1.0 + 3 * (-1.0 - 1.0) = -7.0
    assert torch.allclose(guided_eps(eps_c, eps_u, 3.0), torch.tensor([1.4, -7.0]))
    assert torch.equal(guided_eps(eps_c, eps_u, 0.0), eps_c)
    assert guidance_scale_equivalent(1.0) == 2.0  # diffusers' guidance_scale for U-ViT's s = 1


@pytest.mark.parametrize("solver", SOLVERS)
def test_sampler_applies_guidance_with_the_null_context(solver):
    # Conditional point c1, unconditional point c0: eps_c + s (eps_c - eps_u) is the exact denoiser of the
    # point c1 + s (c1 - c0), so the guided sampler must land there: 0.3 + 2 * (0.3 - (-0.1)) = 1.1.
    x = sample(PointMassDenoiser(), _point_context([0.3]), _point_context([-0.1])[0], steps=50, scale=2.0,
               seeds=[0], latent_shape=(1, 2, 2), solver=solver)
    target = point_mass_end(torch.tensor(1.1, dtype=torch.float64), initial_noise([0], (1, 2, 2)), solver)
    assert torch.allclose(x.double(), target, atol=1e-5)


def tiny_model():
    torch.manual_seed(0)
    cfg = ModelConfig(fusion="intermediate", conditioning="concat", n_text=1, n_image=1, in_chans=3,
                      img_size=8, patch_size=2, width=32, depth=5, heads=2, text_len=5, text_dim=16)
    return UViT(cfg).eval()


@pytest.mark.parametrize("solver", SOLVERS)
def test_same_prompt_and_seed_give_the_same_image_in_any_batch(solver):
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    prompts = torch.randn(3, 5, 16, generator=g)
    null = torch.randn(5, 16, generator=g)
    together = sample(model, prompts, null, steps=8, scale=3.0, solver=solver, seeds=[10, 11, 12])
    reordered = sample(model, prompts[[2, 0]], null, steps=8, scale=3.0, solver=solver, seeds=[12, 10])
    alone = sample(model, prompts[1:2], null, steps=8, scale=3.0, solver=solver, seeds=[11])
    assert torch.allclose(together[[2, 0]], reordered, atol=1e-5)
    assert torch.allclose(together[1:2], alone, atol=1e-5)
    # ... and a different seed or prompt gives a different image.
    other_seed = sample(model, prompts[1:2], null, steps=8, scale=3.0, solver=solver, seeds=[99])
    assert (other_seed - alone).abs().max() > 0.1
    assert (together[0] - together[1]).abs().max() > 0.1
    # Default seeds are seed + i.
    assert torch.equal(sample(model, prompts, null, steps=8, scale=3.0, seed=10, solver=solver), together)


def test_initial_noise_depends_only_on_each_seed():
    a = initial_noise([5, 6], (3, 4, 4))
    assert torch.equal(a[1], initial_noise([6], (3, 4, 4))[0])
    assert not torch.equal(a[0], a[1])


@pytest.mark.parametrize("solver", SOLVERS)
def test_attention_callback_sees_the_conditional_half_every_step(solver):
    model = tiny_model()
    g = torch.Generator().manual_seed(2)
    prompts, null = torch.randn(2, 5, 16, generator=g), torch.randn(5, 16, generator=g)
    seen = []

    def callback(step, t, maps):
        seen.append((step, t, maps))

    with_maps = sample(model, prompts, null, steps=4, scale=1.0, seeds=[1, 2], attention_callback=callback,
                       solver=solver)
    without = sample(model, prompts, null, steps=4, scale=1.0, seeds=[1, 2], solver=solver)
    assert torch.allclose(with_maps, without, atol=1e-6)
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
