import numpy as np
import torch
from scipy.ndimage import gaussian_filter, map_coordinates

from training.elastic import displacement_field, elastic_deform, warp


def reference_elastic(image: np.ndarray, noise: np.ndarray, sigma: float, alpha: float) -> np.ndarray:
    """Simard et al. the straightforward way, one image [H, W], on a given noise field [2, H, W]."""
    dy = gaussian_filter(noise[0], sigma, mode="constant", cval=0) * alpha
    dx = gaussian_filter(noise[1], sigma, mode="constant", cval=0) * alpha
    y, x = np.meshgrid(np.arange(image.shape[0]), np.arange(image.shape[1]), indexing="ij")
    return map_coordinates(image, [y + dy, x + dx], order=1, mode="constant", cval=0)


def test_matches_scipy_reference_on_the_same_field():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 1, 28, 28, generator=g, dtype=torch.float64)
    noise = torch.rand(6, 2, 28, 28, generator=g, dtype=torch.float64) * 2 - 1
    for sigma, alpha in [(4.0, 20.0), (2.0, 8.0)]:
        ours = warp(images, displacement_field(noise, sigma, alpha)).numpy()
        for i in range(len(images)):
            ref = reference_elastic(images[i, 0].numpy(), noise[i].numpy(), sigma, alpha)
            np.testing.assert_allclose(ours[i, 0], ref, atol=1e-9)


def test_field_matches_scipy_gaussian_filter():
    noise = torch.rand(1, 2, 28, 28, dtype=torch.float64) * 2 - 1
    field = displacement_field(noise, 4.0, 20.0)
    ref = gaussian_filter(noise[0, 0].numpy(), 4.0, mode="constant", cval=0) * 20.0
    np.testing.assert_allclose(field[0, 0].numpy(), ref, atol=1e-12)


def test_zero_field_is_identity_and_every_image_gets_its_own_field():
    images = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    # float32 grid coordinates (2x/(w-1) - 1 and back) are exact to a few ulps: about 1e-6 here.
    assert torch.allclose(warp(images, torch.zeros(4, 2, 28, 28)), images, atol=1e-5)
    same = images[:1].repeat(4, 1, 1, 1)
    out = elastic_deform(same, generator=torch.Generator().manual_seed(1))
    assert out.shape == same.shape
    assert not torch.allclose(out[0], out[1])


def test_same_generator_state_gives_same_deformation():
    images = torch.rand(3, 1, 28, 28)
    a = elastic_deform(images, generator=torch.Generator().manual_seed(5))
    b = elastic_deform(images, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_faded_alpha_is_full_until_the_fade_then_falls_towards_zero():
    from training.elastic import faded_alpha

    epochs, fade = 10, 4
    alphas = [faded_alpha(20.0, e, epochs, fade) for e in range(epochs)]
    assert alphas[:6] == [20.0] * 6
    assert alphas[6:] == sorted(alphas[6:], reverse=True) and alphas[-1] == 20.0 / 5
    assert all(a > 0 for a in alphas)
    assert faded_alpha(20.0, 9, epochs, 0) == 20.0


def test_affine_field_shifts_and_rotates_like_the_exact_operations():
    from training.elastic import affine_field

    images = torch.rand(2, 1, 9, 9, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    one = torch.ones(2, dtype=torch.float64)
    shift = affine_field(0 * one, one, torch.tensor([[0.0, 1.0], [2.0, 0.0]], dtype=torch.float64), 9, 9)
    out = warp(images, shift)
    assert torch.allclose(out[0, 0, :, :-1], images[0, 0, :, 1:]) and torch.all(out[0, 0, :, -1] == 0)
    assert torch.allclose(out[1, 0, :-2], images[1, 0, 2:]) and torch.all(out[1, 0, -2:] == 0)
    quarter = affine_field(one * torch.pi / 2, one, torch.zeros(2, 2, dtype=torch.float64), 9, 9)
    turned = warp(images, quarter)
    assert any(torch.allclose(turned, torch.rot90(images, k, dims=(2, 3)), atol=1e-9) for k in (1, 3))
    assert torch.allclose(warp(images, affine_field(0 * one, one, torch.zeros(2, 2, dtype=torch.float64), 9, 9)),
                          images)


def test_affine_is_off_by_default_and_changes_nothing_drawn_before_it():
    images = torch.rand(3, 1, 28, 28)
    plain = elastic_deform(images, generator=torch.Generator().manual_seed(5))
    off = elastic_deform(images, generator=torch.Generator().manual_seed(5), affine=(0.0, 0.0, 0.0))
    on = elastic_deform(images, generator=torch.Generator().manual_seed(5), affine=(10.0, 0.1, 2.0))
    assert torch.equal(plain, off)
    assert not torch.allclose(plain, on)
