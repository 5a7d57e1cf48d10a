"""The sliced-Wasserstein loss and its combination with the MSE."""

import pytest
import torch

from lowbit.calib.losses import random_directions, reconstruction_loss, sliced_wasserstein


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", [(1, 7, 16), (3, 33, 64), (2, 5, 576)])
def test_zero_for_identical_inputs(shape):
    x = torch.randn(shape)
    assert sliced_wasserstein(x, x.clone(), 32, gen()).item() == 0.0


def test_invariant_to_permuting_tokens():
    x, y = torch.randn(2, 40, 32), torch.randn(2, 40, 32) * 1.5 + 0.3
    perm = torch.randperm(80)
    y_perm = y.reshape(80, 32)[perm].reshape(2, 40, 32)
    assert sliced_wasserstein(x, y_perm, 64, gen(3)).item() == pytest.approx(
        sliced_wasserstein(x, y, 64, gen(3)).item(), rel=1e-6)
    # ... but the token-aligned MSE is not.
    assert not torch.allclose(((x - y) ** 2).mean(), ((x - y_perm) ** 2).mean())


def test_a_shift_costs_its_mean_projected_length():
    """Shifting every token by v shifts each sorted projection by v . u, so SW is the
    mean of |v . u| over the directions u."""
    x = torch.randn(50, 24)
    v = torch.randn(24)
    u = random_directions(24, 16, gen(7))
    expected = (v @ u).abs().mean().item()
    assert sliced_wasserstein(x, x + v, 16, gen(7)).item() == pytest.approx(expected, rel=1e-4)
    assert expected > 0


def test_positive_for_other_distributions_and_never_above_the_aligned_error():
    x = torch.randn(4, 32, 48)
    y = torch.randn(4, 32, 48) * 2.0
    sw = sliced_wasserstein(x, y, 128, gen(1)).item()
    assert sw > 0.1
    # Sorting finds the best matching per direction: never worse than matching token i to i.
    u = random_directions(48, 128, gen(1))
    aligned = ((x.reshape(-1, 48) @ u) - (y.reshape(-1, 48) @ u)).abs().mean().item()
    assert sw <= aligned + 1e-6


def test_directions_are_unit_vectors_drawn_from_the_generator():
    u = random_directions(576, 128, gen(5))
    torch.testing.assert_close(u.norm(dim=0), torch.ones(128), rtol=1e-5, atol=1e-5)
    assert torch.equal(u, random_directions(576, 128, gen(5)))
    assert not torch.equal(u, random_directions(576, 128, gen(6)))


def test_fresh_directions_at_each_call():
    x, y = torch.randn(30, 16), torch.randn(30, 16)
    g = gen(0)
    assert sliced_wasserstein(x, y, 8, g).item() != sliced_wasserstein(x, y, 8, g).item()


def test_gradient_flows_to_the_prediction():
    target = torch.randn(2, 16, 32)
    pred = (target + 0.5 * torch.randn(2, 16, 32)).requires_grad_(True)
    sw = sliced_wasserstein(pred, target, 64, gen())
    sw.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    # A small step against the gradient lowers the loss (same directions).
    with torch.no_grad():
        stepped = pred - 0.05 * pred.grad / pred.grad.norm()
    assert sliced_wasserstein(stepped, target, 64, gen()).item() < sw.item()


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="equal shapes"):
        sliced_wasserstein(torch.randn(3, 8), torch.randn(4, 8))


@pytest.mark.parametrize("w", [0.0, 0.1, 0.5, 1.0])
def test_hybrid_loss_weights_the_two_terms(w):
    pred, target = torch.randn(2, 10, 16), torch.randn(2, 10, 16)
    loss, terms = reconstruction_loss(pred, target, w, 32, gen(2))
    mse = ((pred - target) ** 2).mean()
    if w == 0.0:
        assert terms.keys() == {"mse"}
        torch.testing.assert_close(loss, mse)
        return
    sw = sliced_wasserstein(pred, target, 32, gen(2))
    torch.testing.assert_close(terms["mse"], mse)
    torch.testing.assert_close(terms["sw"], sw)
    torch.testing.assert_close(loss, (1 - w) * mse + w * sw)
