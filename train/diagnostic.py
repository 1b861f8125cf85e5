"""The per-timestep diagnostic: is the model better than predicting the mean image, at every noise level?

At each preview step the EMA model sees one fixed val batch at ten equal buckets of t (t = 100 b + a fixed
offset per image) and three figures are logged per bucket (metrics.jsonl, TensorBoard, the training summary,
`make compare`):

    x0_mse_by_t          MSE of the x0 the prediction implies against the true x0, whatever the target
    baseline_by_t        the same MSE for the trivial predictor "x0 = the mean training image"
    caption_effect_by_t  ||pred(c) - pred("")|| / ||pred(c)||: how much the caption moves the prediction

Both MSEs are taken in the shard set's model space before normalisation (pixels in [-1, 1], or latents times
the latent scale), so runs with different targets and normalisations compare directly. A model worse than
the baseline in any bucket after warm-up gets a warning: that is what an epsilon model on raw `shapes`
pixels looked like at t >= 750, where colour and layout are decided (docs/training.md, "The diagnostic").
In the top bucket (t >= 900) x_t keeps 7-12% of x0's amplitude: the model gains least over the mean there.
"""
from __future__ import annotations

import torch

from train.diffusion import NUM_TRAIN_TIMESTEPS, NoiseSchedule, x0_from_prediction

BUCKETS = 10
KEYS = ("x0_mse_by_t", "baseline_by_t", "caption_effect_by_t")
SAMPLES = 32  # val images per bucket: enough for two digits on the shapes sets, seconds on a CPU


def bucket_bounds(b: int) -> tuple[int, int]:
    width = NUM_TRAIN_TIMESTEPS // BUCKETS
    return b * width, (b + 1) * width


class Diagnostic:
    def __init__(self, shard_set, normalization, prediction: str, device, *, samples: int = SAMPLES,
                 every: int = 0, total_steps: int = 0, autocast_dtype=None):
        from pipeline.reader import to_model_input

        self.norm, self.prediction, self.device = normalization, prediction, device
        self.every, self.total_steps, self.autocast_dtype = every, total_steps, autocast_dtype
        split = "val" if "val" in shard_set.splits else "train"
        gen = torch.Generator().manual_seed(1234)  # the batch, its t offsets and noise never change
        x0, text = [], []
        for record in shard_set.records(split):
            latent = torch.from_numpy(record["latent"][None])
            x0.append(to_model_input(latent, shard_set.latent_format, shard_set.latent_scale, generator=gen)[0])
            text.append(torch.as_tensor(record["text"][0]).float())
            if len(x0) == samples:
                break
        self.x0 = torch.stack(x0).to(device)  # model space, before normalisation
        self.text = normalization.text_in(torch.stack(text)).to(device)
        self.null = normalization.text_in(shard_set.null_text()).to(device).expand_as(self.text)
        from pipeline.statistics import ensure_statistics

        self.mean_image = torch.from_numpy(ensure_statistics(shard_set)["image_mean_map"]).to(device)
        n = len(self.x0)
        width = NUM_TRAIN_TIMESTEPS // BUCKETS
        self.offsets = torch.randint(0, width, (BUCKETS, n), generator=gen).to(device)
        self.eps = torch.randn((BUCKETS, *self.x0.shape), generator=gen).to(device)
        self.schedule = NoiseSchedule(device)

    def due(self, step: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == self.total_steps)

    @torch.no_grad()
    def measure(self, model) -> dict[str, list[float]]:
        """The three per-bucket lists for `model` (the EMA model: what samples come from)."""
        out = {k: [] for k in KEYS}
        x0_in = self.norm.image_in(self.x0)
        width = NUM_TRAIN_TIMESTEPS // BUCKETS
        baseline = (self.mean_image - self.x0).pow(2).mean().item()
        for b in range(BUCKETS):
            t = b * width + self.offsets[b]
            x_t = self.schedule.add_noise(x0_in, self.eps[b], t)
            with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                                enabled=self.autocast_dtype is not None):
                pred = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([self.text, self.null])).float()
            cond, uncond = pred.chunk(2)
            alpha, sigma = self.schedule.sqrt_abar[t], self.schedule.sqrt_one_minus_abar[t]
            x0_hat = self.norm.image_out(x0_from_prediction(cond, x_t, alpha, sigma, self.prediction))
            out["x0_mse_by_t"].append((x0_hat - self.x0).pow(2).mean().item())
            out["baseline_by_t"].append(baseline)
            ratio = (cond - uncond).flatten(1).norm(dim=1) / cond.flatten(1).norm(dim=1).clamp(min=1e-12)
            out["caption_effect_by_t"].append(ratio.mean().item())
        return out


def worse_than_baseline(diag: dict) -> list[int]:
    """Buckets where the model's x0 error exceeds the mean image's."""
    return [b for b, (m, base) in enumerate(zip(diag["x0_mse_by_t"], diag["baseline_by_t"])) if m > base]


def table(diag: dict) -> str:
    """The per-bucket figures as aligned text lines (the training summary, the compare report)."""
    lines = ["  t bucket    " + " ".join(f"{lo:>5d}+" for lo, _ in map(bucket_bounds, range(BUCKETS))),
             "  x0 MSE      " + " ".join(f"{v:6.3f}" for v in diag["x0_mse_by_t"]),
             "  mean image  " + " ".join(f"{v:6.3f}" for v in diag["baseline_by_t"]),
             "  caption     " + " ".join(f"{v:6.3f}" for v in diag["caption_effect_by_t"])]
    return "\n".join(lines)
