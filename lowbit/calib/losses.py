"""Reconstruction losses of block-wise calibration: MSE and the sliced-Wasserstein term.

The sliced-Wasserstein (SW) distribution-alignment loss compares the *distributions*
of the token hidden vectors of two block outputs rather than the vectors one by one:
both sets of N token vectors are projected onto L random unit directions, each
projection is sorted, and the sorted values are matched (the 1-D Wasserstein-1
distance per direction):

    SW(X, Y) = 1/L sum_l 1/N sum_i | sort(X u_l)_i - sort(Y u_l)_i |

Sorting makes it invariant to the order of the tokens; gradients flow through the
sort to each token's own position. It is combined with a method's base loss as
`(1 - w) * base + w * SW`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.errors import UsageError


def random_directions(dim: int, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """`count` random unit vectors of R^dim as the columns of a float32 [dim, count] matrix,
    drawn on the CPU (so a seed gives the same directions on every device)."""
    u = torch.randn(dim, count, generator=generator, dtype=torch.float32)
    return u / (u.norm(dim=0, keepdim=True) + 1e-8)


def sliced_wasserstein(
    x: torch.Tensor,
    y: torch.Tensor,
    projections: int = 128,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """SW_1 between the token distributions of x and y, both [..., D] (every vector
    along the last dimension is one sample), over `projections` fresh random unit
    directions drawn from `generator` (p = 1, no root, no normalisation by D)."""
    if x.shape != y.shape:
        raise UsageError(f"lowbit: sliced_wasserstein needs equal shapes, got {list(x.shape)} and {list(y.shape)}")
    dim = x.shape[-1]
    u = random_directions(dim, projections, generator).to(x.device)
    with torch.autocast(x.device.type, enabled=False):
        px = x.reshape(-1, dim).float() @ u
        py = y.reshape(-1, dim).float() @ u
        return (px.sort(dim=0).values - py.sort(dim=0).values).abs().mean()


def reconstruction_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    sw_weight: float = 0.0,
    sw_projections: int = 128,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`(1 - w) * MSE + w * SW` of a block output against its target, with both terms
    for the log (detached tensors, so that logging does not synchronise a GPU). MSE is
    the mean over all elements (OmniQuant's scale); with w = 0 the SW term is not computed."""
    with torch.autocast(pred.device.type, enabled=False):
        mse = F.mse_loss(pred.float(), target.float())
    if sw_weight == 0.0:
        return mse, {"mse": mse.detach()}
    sw = sliced_wasserstein(pred, target, sw_projections, generator)
    loss = (1.0 - sw_weight) * mse + sw_weight * sw
    return loss, {"mse": mse.detach(), "sw": sw.detach()}
