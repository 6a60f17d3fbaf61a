"""AsFT's narrow safety basin (METHODS.md section 9): random perturbations of an aligned weight
W, drawn inside the column space of its alignment direction V = W_aligned - W_base or orthogonal
to it, each of Frobenius norm eps * ||W||_F.

A Gaussian G (the shape of W) is split by the projector onto col(V), P_V = Q Q^T for an
orthonormal basis Q (d_out x rank; ``harness.defenses.math.column_basis`` or
``factored_column_basis`` build it from V or from a LoRA alignment's factors): the along
perturbation is P_V G, the orthogonal one (I - P_V) G. Only the direction is random; the norm is
set. The pieces are pure functions of tensors, so each property is tested on numbers.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

DIRECTIONS = ("along", "orthogonal")


def project(G: Tensor, Q: Tensor, direction: str) -> Tensor:
    """The part of G in col(V) (``along``: Q Q^T G) or orthogonal to it (``orthogonal``:
    G - Q Q^T G), Q an orthonormal basis of col(V); G's dtype, never forming Q Q^T."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction: got {direction!r}, allowed: {', '.join(DIRECTIONS)}")
    Q = Q.to(G)
    inside = Q @ (Q.transpose(0, 1) @ G)
    return inside if direction == "along" else G - inside


def basin_delta(W: Tensor, Q: Tensor, direction: str, eps: float,
                generator: Optional[torch.Generator] = None) -> Tensor:
    """A perturbation of W: a standard Gaussian of W's shape, projected by ``project`` and
    rescaled to Frobenius norm eps * ||W||_F; in W's dtype. eps = 0 gives zeros (W unchanged),
    with G still drawn, so every eps of one seeded generator shares one G.

    Drawn and projected in float64, so the norm is eps * ||W||_F to W's own precision. Raises
    where the projection of G is zero at eps > 0: the along part of a V = 0, or the orthogonal
    part of a V whose columns span all of W's output space, has no direction to scale."""
    if eps < 0:
        raise ValueError(f"eps: a relative norm, must be >= 0, got {eps}")
    G = torch.randn(W.shape, generator=generator, dtype=torch.float64)
    D = project(G, Q.double(), direction)
    if eps == 0:
        return torch.zeros_like(W)
    norm = torch.linalg.matrix_norm(D)
    if norm == 0:
        raise ValueError(f"no {direction} direction: V's column space has dimension "
                         f"{Q.shape[1]} of {W.shape[0]}")
    target = eps * torch.linalg.matrix_norm(W.detach().double())
    return (D * (target / norm)).to(W.dtype)


def along_share(delta: Tensor, Q: Tensor) -> float:
    """||P_V delta||_F^2 / ||delta||_F^2: 1 for an along perturbation, 0 for an orthogonal one
    (0 for a zero delta)."""
    delta = delta.detach().double()
    total = float(delta.pow(2).sum())
    if total == 0:
        return 0.0
    return float(project(delta, Q.double(), "along").pow(2).sum()) / total
