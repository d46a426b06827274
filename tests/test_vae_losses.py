"""ldm/vae_losses.py against hand-computed values and closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from ldm.vae_losses import (PatchDiscriminator, scale_equivariance_loss, adaptive_weight, bicubic_roundtrip, disc_factor, hinge_d_loss,
                            hinge_g_loss, image_metrics, kl_standard_normal, latent_scaling, patch_layers_for, psnr,
                            reconstruction_loss, ssim)


def test_kl_matches_the_closed_form_and_a_hand_value():
    mean = torch.tensor([[[[1.0, 0.0]]], [[[0.0, -2.0]]]])  # (2, 1, 1, 2)
    logvar = torch.tensor([[[[0.0, math.log(4.0)]]], [[[0.0, 0.0]]]])
    # per element 0.5 * (m^2 + var - 1 - log var): sample 0: 0.5 + 0.5*(4 - 1 - log 4); sample 1: 0 + 2
    expected = torch.tensor([0.5 + 0.5 * (3 - math.log(4.0)), 2.0])
    assert torch.allclose(kl_standard_normal(mean, logvar), expected)
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mean, (0.5 * logvar).exp()),
                                            torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    assert torch.allclose(kl_standard_normal(mean, logvar), ref, atol=1e-4)
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    ours = kl_standard_normal(mean, logvar)  # and diffusers' posterior.kl(), which training used before
    assert torch.allclose(DiagonalGaussianDistribution(torch.cat([mean, logvar], 1)).kl(), ours, atol=1e-4)


def test_hinge_losses_by_hand():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - r) = 0, 0.5, 2  -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + f) = 0, 1, 2    -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    assert hinge_d_loss(torch.full((4,), 1.0), torch.full((4,), -1.0)).item() == 0.0  # both beyond the margin
    assert hinge_g_loss(torch.tensor([1.0, 2.0, 3.0])).item() == pytest.approx(-2.0)


def test_adaptive_weight_by_hand():
    rec = torch.tensor([3.0, 4.0, 0.0])  # norm 5
    g = torch.tensor([[0.0, 2.0]])  # norm 2
    assert adaptive_weight(rec, g).item() == pytest.approx(5 / (2 + 1e-4))
    assert adaptive_weight(rec, torch.zeros(2)).item() == pytest.approx(1e4)  # 5 / 1e-4, clamped
    assert adaptive_weight(torch.zeros(3), g).item() == 0.0
    w = adaptive_weight(rec.requires_grad_(), g)
    assert not w.requires_grad  # a constant in the generator's loss


def test_adaptive_weight_from_a_real_last_layer():
    """The gradient-norm ratio at a layer, as training computes it with autograd.grad."""
    layer = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -1.0]]))
    x = torch.tensor([[1.0, 2.0]])
    out = layer(x)  # -1
    rec = (out - 1.0).pow(2).sum()  # d/dw = 2 * (out - 1) * x = (-4, -8): norm sqrt(80)
    g_loss = -3.0 * out.sum()  # d/dw = -3 * x = (-3, -6): norm sqrt(45)
    grads = [torch.autograd.grad(loss, layer.weight, retain_graph=True)[0] for loss in (rec, g_loss)]
    assert adaptive_weight(*grads).item() == pytest.approx(math.sqrt(80) / (math.sqrt(45) + 1e-4), rel=1e-6)


def test_disc_factor_starts_at_disc_start():
    assert [disc_factor(s, 3) for s in range(5)] == [0.0, 0.0, 0.0, 1.0, 1.0]


def test_reconstruction_loss_l1_plus_l2():
    x, y = torch.zeros(1, 3, 2, 2), torch.full((1, 3, 2, 2), 0.5)
    assert reconstruction_loss(x, y).item() == pytest.approx(0.5)
    assert reconstruction_loss(x, y, l2_weight=2.0).item() == pytest.approx(0.5 + 2 * 0.25)


def test_latent_scaling_on_latents_of_known_std():
    z = torch.randn(64, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 3.0 + 0.5
    scale, shift = latent_scaling(z)
    assert shift is None and scale == pytest.approx(1 / 3.0, rel=0.01)
    scale, shift = latent_scaling(z, shift=True)
    assert shift == pytest.approx(0.5, abs=0.02)
    scaled = (z.double() - shift) * scale
    assert scaled.std().item() == pytest.approx(1.0, abs=1e-9) and abs(scaled.mean().item()) < 1e-9
    exact = torch.tensor([-2.0, 2.0])  # unbiased std: sqrt(8)
    assert latent_scaling(exact)[0] == pytest.approx(1 / math.sqrt(8))


def test_psnr_by_hand():
    x = torch.zeros(2, 3, 4, 4)
    y = torch.stack([torch.full((3, 4, 4), 0.1), torch.full((3, 4, 4), 0.01)])
    assert psnr(x, y).tolist() == pytest.approx([20.0, 40.0])


def test_ssim_is_one_on_equal_images_and_matches_scikit_image():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g)
    y = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert ssim(x, x).tolist() == pytest.approx([1.0, 1.0])
    metrics = pytest.importorskip("skimage.metrics")
    for i in range(2):
        ref = metrics.structural_similarity(x[i].permute(1, 2, 0).double().numpy(), y[i].permute(1, 2, 0).double().numpy(),
                                            channel_axis=2, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                            use_sample_covariance=False)
        assert ssim(x[i:i + 1], y[i:i + 1]).item() == pytest.approx(ref, abs=1e-6)


def test_bicubic_roundtrip_keeps_flat_images_and_loses_fine_detail():
    flat = torch.full((1, 3, 32, 32), 0.3)
    assert torch.allclose(bicubic_roundtrip(flat, 2), flat, atol=1e-6)
    checker = (torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2
    fine = checker.float().expand(1, 3, 32, 32)  # one-pixel checkerboard: gone at half size
    assert image_metrics(fine, bicubic_roundtrip(fine, 2))["psnr"] < 10


def test_patch_discriminator_gives_a_logit_per_patch():
    for resolution, layers in ((32, 2), (64, 3), (256, 3)):
        assert patch_layers_for(resolution) == layers
    disc = PatchDiscriminator(channels=8, layers=patch_layers_for(32))
    assert disc(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 6, 6)


def test_scale_equivariance_loss_compares_with_the_pooled_image():
    x = torch.tensor([[[[1.0, 3.0, 0.0, 0.0], [5.0, 7.0, 0.0, 4.0]]]])  # two 2x2 cells: means 4 and 1
    assert scale_equivariance_loss(x, torch.tensor([[[[4.0, 1.0]]]])).item() == 0.0
    small = torch.tensor([[[[2.0, 2.0]]]])  # off by 2 and 1: L1 1.5, squared error 2.5
    assert scale_equivariance_loss(x, small).item() == pytest.approx(1.5)
    assert scale_equivariance_loss(x, small, l2_weight=2.0).item() == pytest.approx(1.5 + 2 * 2.5)
