"""The first stage's objective and metrics as small pure functions, plus its patch discriminator.

The LDM autoencoder loss (Rombach et al. 2022, app. G; Esser et al. 2021, "taming transformers",
eq. 4-7):

    L = |x - D(z)|_1 (+ l2 * |x - D(z)|^2) (+ p * LPIPS) + kl * KL(q(z|x) || N(0, I))
        + lambda * d_factor * L_G,        L_G = -mean(Disc(D(z)))                 (hinge generator)
    lambda = |grad_last L_rec| / (|grad_last L_G| + 1e-4)  at the decoder's last layer (eq. 7)
    L_Disc = 0.5 * (mean(relu(1 - Disc(x))) + mean(relu(1 + Disc(D(z)))))        (hinge)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def kl_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over all but the batch dimension: (B,).
    Closed form per element: 0.5 * (mean^2 + var - 1 - log var)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(dim=1)


def reconstruction_loss(x: torch.Tensor, recon: torch.Tensor, l2_weight: float = 0.0) -> torch.Tensor:
    """Mean |x - recon| + l2_weight * mean (x - recon)^2 over every element (a scalar)."""
    diff = x.float() - recon.float()
    loss = diff.abs().mean()
    return loss + l2_weight * diff.pow(2).mean() if l2_weight else loss


def scale_equivariance_loss(x: torch.Tensor, recon_of_downsampled: torch.Tensor, l2_weight: float = 0.0) -> torch.Tensor:
    """Scale equivariance (Skorokhodov et al. 2025, "Improving the diffusability of autoencoders"):
    the decoder's image of the 2x average-pooled latent against the 2x average-pooled image, with
    the reconstruction loss. It suppresses latent detail finer than the image's own, which a
    diffusion model otherwise spends its capacity on."""
    return reconstruction_loss(F.avg_pool2d(x, 2), recon_of_downsampled, l2_weight)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss: 0.5 * (mean relu(1 - real) + mean relu(1 + fake))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's (decoder's) side of the hinge game: -mean(Disc(D(z)))."""
    return -logits_fake.mean()


def adaptive_weight(rec_grad: torch.Tensor, g_grad: torch.Tensor, eps: float = 1e-4,
                    max_weight: float = 1e4) -> torch.Tensor:
    """lambda = |grad L_rec| / (|grad L_G| + eps), clamped to [0, max_weight], from the two losses'
    gradients at the decoder's last layer (taming-transformers' `calculate_adaptive_weight`).
    A constant: no gradient flows through it."""
    return (rec_grad.norm() / (g_grad.norm() + eps)).clamp(0.0, max_weight).detach()


def disc_factor(step: int, disc_start: int) -> float:
    """0 before `disc_start` (the autoencoder first learns to reconstruct), 1 from it on."""
    return 1.0 if step >= disc_start else 0.0


def latent_scaling(latents: torch.Tensor, shift: bool = False) -> tuple[float, float | None]:
    """(scaling_factor, shift_factor) so that (z - shift) * scale has unit std (and zero mean when
    `shift`): scale = 1 / std(z), shift = mean(z) or None. diffusers' convention."""
    z = latents.detach().double()
    return 1.0 / z.std().item(), (z.mean().item() if shift else None)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image in dB: 10 log10(range^2 / MSE). (B, ...) -> (B,)"""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse.clamp_min(1e-20))


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords.pow(2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004): an 11-tap Gaussian window (sigma 1.5),
    K1 = 0.01, K2 = 0.03, averaged over the valid positions and channels. (B, C, H, W) -> (B,)
    Same as skimage's `structural_similarity(gaussian_weights=True, use_sample_covariance=False)`."""
    x, y = x.double(), y.double()
    c = x.shape[1]
    window = min(window, x.shape[-1], x.shape[-2])
    g = _gaussian_window(window, sigma)
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window).contiguous()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=c)  # valid positions only

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x.pow(2)
    var_y = blur(y * y) - mu_y.pow(2)
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.pow(2) + mu_y.pow(2) + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(dim=1)


def bicubic_roundtrip(x: torch.Tensor, factor: int) -> torch.Tensor:
    """The baseline a latent must beat: bicubic (antialiased) down by `factor` and back up,
    clamped to [0, 1]. (B, 3, H, W) in [0, 1] -> same shape."""
    h, w = x.shape[-2:]
    small = F.interpolate(x.float(), size=(h // factor, w // factor), mode="bicubic", antialias=True)
    return F.interpolate(small, size=(h, w), mode="bicubic").clamp(0, 1)


@torch.no_grad()
def reconstruct(vae, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """A VAE's posterior-mode reconstruction of (B, 3, H, W) pixels in [0, 1], in [0, 1] (float32)."""
    dtype = next(vae.parameters()).dtype
    out = []
    for chunk in x.split(batch_size):
        z = vae.encode(chunk.to(dtype) * 2 - 1).latent_dist.mode()
        out.append(((vae.decode(z).sample.float() + 1) / 2).clamp(0, 1))
    return torch.cat(out)


def image_metrics(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Mean PSNR (dB), SSIM and L1 of y against x, both (B, 3, H, W) in [0, 1]."""
    return {"psnr": psnr(x, y).mean().item(), "ssim": ssim(x, y).mean().item(),
            "l1": (x.double() - y.double()).abs().mean().item()}


class PatchDiscriminator(torch.nn.Module):
    """A PatchGAN discriminator (pix2pix's NLayerDiscriminator, as taming / LDM use it): strided
    4x4 convolutions, one logit per overlapping patch. (B, 3, H, W) -> (B, 1, h, w).
    `layers` stride-2 stages; `channels` at the first, doubling up to 8x."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        seq: list[torch.nn.Module] = [torch.nn.Conv2d(in_channels, channels, 4, 2, 1), torch.nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < layers else 1
            seq += [torch.nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                    torch.nn.BatchNorm2d(channels * mult), torch.nn.LeakyReLU(0.2)]
        seq.append(torch.nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.net = torch.nn.Sequential(*seq)
        for m in self.modules():  # taming's weights_init
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, torch.nn.BatchNorm2d):
                torch.nn.init.normal_(m.weight, 1.0, 0.02)
                torch.nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def patch_layers_for(resolution: int) -> int:
    """Stride-2 stages that leave at least a few patches: 3 at 64 px and above, fewer below."""
    return max(1, min(3, int(math.log2(max(resolution, 2))) - 3))
