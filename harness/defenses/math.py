"""Pure tensor functions behind the Vaccine, Lisa, AsFT, Booster, RepNoise and T-Vaccine
defenses.

Kept apart from the LightningModules so each equation of METHODS.md is tested on its own,
with numbers a reader can check by hand.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor


def vaccine_perturbation(grads: Sequence[Tensor], rho: float, eps: float = 1e-7,
                         all_reduce: Optional[Callable[[Tensor], Tensor]] = None) -> list[Tensor]:
    """Vaccine's worst-case hidden perturbation: ``eps_l = rho * g_l / (||g|| + eps)``.

    ``||g||`` is one L2 norm over every layer's hidden gradient, so the perturbation as a whole
    has norm ``rho`` and points where the loss rises fastest. The norm is taken in float32:
    bf16 sums of squares over a 7B model's activations lose the small layers.

    Under DDP each rank holds the hidden gradients of its own rows only: ``all_reduce`` sums
    the squared norm over the ranks, so ``||g||`` is the global batch's and the ranks together
    perturb by ``rho`` as one process does (per-rank norms would give ``sqrt(k) * rho``). Every
    rank's gradients carry the same factor (``global_token_mean``), which the ratio cancels.
    """
    squares = sum(g.detach().float().pow(2).sum() for g in grads)
    if all_reduce is not None:
        squares = all_reduce(squares)
    norm = torch.sqrt(squares)
    scale = rho / (norm + eps)
    return [(g.detach().float() * scale).to(g.dtype) for g in grads]


def proximal_term(params: Iterable[Tensor], anchors: Iterable[Tensor], rho: float) -> Tensor:
    """Lisa's proximal term ``rho/2 * sum ||theta - anchor||^2``; anchors carry no gradient."""
    terms = [(p - a.detach()).pow(2).sum() for p, a in zip(params, anchors, strict=True)]
    if not terms:
        return torch.zeros(())
    return rho / 2 * torch.stack(terms).sum()


def asft_penalty(A: Tensor, B: Tensor, V: Tensor, lam: float) -> Tensor:
    """AsFT's penalty ``lam * ||(I - C) B A||_F^2`` with ``C = V V^T / ||V||_F``.

    ``A`` is r x d_in (lora_A), ``B`` is d_out x r (lora_B), ``V`` is d_out x d_in. Forming C
    would cost d_out^2 memory (16M entries per 4096-wide layer); instead
    ``M = (I - C) B = B - V (V^T B) / ||V||_F`` is d_out x r and
    ``||M A||_F^2 = sum((M^T M) * (A A^T))`` needs only r x r products. A zero V (a layer the
    alignment left unchanged) gives C = 0, the limit of C as V shrinks.
    """
    norm = torch.linalg.matrix_norm(V).clamp_min(torch.finfo(V.dtype).tiny)
    M = B - V @ (V.transpose(0, 1) @ B) / norm
    return lam * ((M.transpose(0, 1) @ M) * (A @ A.transpose(0, 1))).sum()


def asft_penalty_factored(A: Tensor, B: Tensor, V_B: Tensor, V_A: Tensor, lam: float) -> Tensor:
    """``asft_penalty`` for ``V = V_B V_A`` given as factors (a LoRA alignment: V is exactly its
    scaled ``B A``), never forming V: with ``G = V_A V_A^T`` (r_v x r_v),
    ``||V||_F^2 = sum((V_B^T V_B) * G)`` and ``V (V^T B) = V_B (G (V_B^T B))``, so every product
    is r x r, r_v x r or d x r. A zero factor (a layer alignment left alone) gives C = 0."""
    gram = V_A @ V_A.transpose(0, 1)
    norm = ((V_B.transpose(0, 1) @ V_B) * gram).sum().clamp_min(0).sqrt()
    norm = norm.clamp_min(torch.finfo(V_B.dtype).tiny)
    M = B - V_B @ (gram @ (V_B.transpose(0, 1) @ B)) / norm
    return lam * ((M.transpose(0, 1) @ M) * (A @ A.transpose(0, 1))).sum()


def factored_column_basis(V_B: Tensor, V_A: Tensor) -> Tensor:
    """``column_basis(V_B @ V_A)`` from the factors: a thin QR of V_B and the SVD of the small
    ``R V_A`` (r_v x d_in), with ``column_basis``'s rank rule."""
    Q, R = torch.linalg.qr(V_B.detach().float())
    U, S, _ = torch.linalg.svd(R @ V_A.detach().float(), full_matrices=False)
    if S.numel() == 0 or S[0] == 0:
        return Q[:, :0]
    tol = S[0] * max(V_B.shape[0], V_A.shape[1]) * torch.finfo(torch.float32).eps
    return (Q @ U[:, : int((S > tol).sum())]).contiguous()


def asft_penalty_dense(A: Tensor, B: Tensor, V: Tensor, lam: float) -> Tensor:
    """The penalty exactly as written, with C formed densely: the reference for tests."""
    C = V @ V.transpose(0, 1) / torch.linalg.matrix_norm(V)
    eye = torch.eye(V.shape[0], dtype=V.dtype, device=V.device)
    return lam * torch.linalg.matrix_norm((eye - C) @ B @ A).pow(2)


def column_basis(V: Tensor) -> Tensor:
    """An orthonormal basis (d_out x rank) of V's column space, from a thin SVD.

    Singular values below ``max(d) * float32 eps * s_max`` (numpy's matrix_rank rule) count
    as zero, so a low-rank V gets a basis of its true rank.
    """
    U, S, _ = torch.linalg.svd(V.detach().float(), full_matrices=False)
    if S.numel() == 0 or S[0] == 0:
        return U[:, :0]
    tol = S[0] * max(V.shape) * torch.finfo(torch.float32).eps
    return U[:, : int((S > tol).sum())].contiguous()


def fraction_in_basis(A: Tensor, B: Tensor, Q: Tensor) -> Tensor:
    """Share of ``||B A||_F^2`` inside the span of Q's orthonormal columns, via r x r products."""
    A, B = A.detach().float(), B.detach().float()
    gram_a = A @ A.transpose(0, 1)
    total = ((B.transpose(0, 1) @ B) * gram_a).sum()
    QtB = Q.transpose(0, 1).to(B) @ B
    inside = ((QtB.transpose(0, 1) @ QtB) * gram_a).sum()
    return inside / total.clamp_min(torch.finfo(torch.float32).tiny)


def along_fraction(A: Tensor, B: Tensor, V: Tensor) -> Tensor:
    """Share of the LoRA update ``B A`` lying in V's column space (0 when B A is zero).

    AsFT logs it to show whether finetuning stays in the alignment directions. When V has full
    row rank (full-SFT alignment of a square layer) its column space is everything and the
    share is trivially 1; it is informative for a low-rank V, such as a LoRA alignment's.
    """
    return fraction_in_basis(A, B, column_basis(V))


def distillation_kl(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor,
                    temperature: float, ignore_index: int = -100) -> Tensor:
    """``T^2 * KL(p_teacher || p_student)`` at temperature T, averaged over response tokens.

    Logits at position t predict token t+1, so the supervised positions are those whose next
    label is not ignored (the same shift the LM loss uses). The T^2 factor keeps the gradient's
    scale independent of T (Hinton et al. 2015). Computed in float32 for bf16 models.
    """
    mask = labels[:, 1:] != ignore_index
    s = student_logits[:, :-1][mask].float() / temperature
    t = teacher_logits[:, :-1][mask].float() / temperature
    if s.shape[0] == 0:
        return student_logits.new_zeros((), dtype=torch.float32)
    kl = torch.nn.functional.kl_div(torch.log_softmax(s, -1), torch.log_softmax(t, -1),
                                    log_target=True, reduction="batchmean")
    return kl * temperature ** 2


# ---------------------------------------------------------------- Booster
def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """One L2 norm over every tensor, in float32."""
    return torch.sqrt(sum(t.detach().float().pow(2).sum() for t in tensors))


def booster_shift(grads: Sequence[Tensor], alpha: float, eps: float = 1e-7) -> list[Tensor]:
    """Booster's normalised harmful step ``alpha * g_h / (||g_h|| + eps)``, one global norm over
    every trainable tensor; ``w' = w - shift``. A constant: no gradient flows through it."""
    scale = alpha / (global_norm(grads) + eps)
    return [(g.detach().float() * scale).to(g.dtype) for g in grads]


def booster_gradient(g_f: Sequence[Tensor], g_h: Sequence[Tensor], g_h_shifted: Sequence[Tensor],
                     lam: float) -> list[Tensor]:
    """The gradient Booster steps with: ``g_f + lam * (g_h - g_h')`` (first order: the gradient
    of ``f(w) + lam * [h(w) - h(w - alpha g_h/||g_h||)]`` with the direction held constant)."""
    return [f + lam * (h - s) for f, h, s in zip(g_f, g_h, g_h_shifted, strict=True)]


def booster_diagnostics(g_f: Sequence[Tensor], g_h: Sequence[Tensor],
                        g_h_shifted: Sequence[Tensor], lam: float) -> dict[str, Tensor]:
    """Logged sizes of Booster's two gradient terms, read-only (float32, global over tensors):
    ``grad_f_norm`` ||g_f||, ``grad_d_norm`` ||g_h - g_h'||, ``grad_penalty_norm`` lam times
    that, ``grad_h_norm`` ||g_h||, and the cosines of ``d = g_h - g_h'`` with ``g_h`` (> 0:
    stepping against ``d`` lowers the harmful loss, to first order) and with ``g_f``. For a
    locally quadratic h, d = alpha H g_h/||g_h||: its size stays near alpha ||H g_h||/||g_h||
    however small g_h gets. One tensor's d at a time, so no second copy of the gradients."""
    sums: dict[str, Any] = dict.fromkeys(("ff", "hh", "dd", "dh", "df"), 0.0)  # on their device
    for f, h, s in zip(g_f, g_h, g_h_shifted, strict=True):
        f, h = f.detach().float(), h.detach().float()
        d = h - s.detach().float()
        for k, (a, b) in {"ff": (f, f), "hh": (h, h), "dd": (d, d), "dh": (d, h),
                          "df": (d, f)}.items():
            sums[k] = sums[k] + (a * b).sum()
    n_f, n_h, n_d = (sums[k].sqrt() for k in ("ff", "hh", "dd"))
    tiny = torch.finfo(torch.float32).tiny
    return {"grad_f_norm": n_f, "grad_d_norm": n_d, "grad_penalty_norm": lam * n_d,
            "grad_h_norm": n_h, "cos_d_h": sums["dh"] / (n_d * n_h).clamp_min(tiny),
            "cos_d_f": sums["df"] / (n_d * n_f).clamp_min(tiny)}


# ---------------------------------------------------------------- RepNoise
def gaussian_mmd(x: Tensor, y: Tensor, kernels: int = 5, multiplier: float = 2.0) -> Tensor:
    """Gaussian-kernel MMD between the rows of ``x`` and ``y`` (n x d each), RepNoise's form.

    Over the joint set ``z = [x; y]`` the bandwidths are ``base * multiplier**k``, k < kernels,
    with ``base = sum_ij ||z_i - z_j||^2 / (m^2 - m) / multiplier**(kernels // 2)`` (m = 2n rows;
    held constant, no gradient through it), the kernel sums the ``exp(-d^2 / b)`` of every
    bandwidth, and the value is ``mean(K_xx + K_yy - K_xy - K_yx)``. In 1-D,
    ``MMD({0}, {1}) = 10 - 2 * sum_k exp(-1 / (0.25 * 2**k)) = 6.186276``.
    """
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"gaussian_mmd pairs rows: x has {n}, y has {y.shape[0]}")
    z = torch.cat([x, y]).float()
    sq = (z * z).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * z @ z.T).clamp_min(0)
    m = z.shape[0]
    base = d2.detach().sum() / (m * m - m) / multiplier ** (kernels // 2)
    base = base.clamp_min(torch.finfo(torch.float32).tiny)  # x == y: every distance 0
    k = sum(torch.exp(-d2 / (base * multiplier ** i)) for i in range(kernels))
    return (k[:n, :n] + k[n:, n:] - k[:n, n:] - k[n:, :n]).mean()


def differing_positions(harmful_ids: Tensor, refusal_ids: Tensor) -> Tensor:
    """RepNoise's mask m: the positions where the paired harmful and refusal ids differ (the
    answer span, plus any position padded in one sequence only)."""
    return harmful_ids != refusal_ids


def masked_ce(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Token-mean CE of ``targets`` at the positions ``mask`` marks; logits at t predict t+1."""
    mask = mask[:, 1:]
    if not mask.any():
        return logits.new_zeros((), dtype=torch.float32)
    return torch.nn.functional.cross_entropy(logits[:, :-1][mask].float(), targets[:, 1:][mask])


def repnoise_loss(ce_safe: Tensor, harmful_ce: Tensor, mmd: Tensor, alpha: float,
                  beta: float) -> Tensor:
    """``CE_safe + beta * MMD - alpha * log(1 + H)``: the refusal CE, noise-matching of the
    harmful representations, and a bounded ascent on the harmful CE ``H``."""
    return ce_safe + beta * mmd - alpha * torch.log1p(harmful_ce)


# ---------------------------------------------------------------- T-Vaccine
def layer_probabilities(norms: Sequence[float]) -> list[float]:
    """T-Vaccine's sampling probabilities ``p_l = ||g_l|| / sum_j ||g_j||``."""
    total = float(sum(norms))
    if total <= 0:
        raise ValueError("layer_probabilities: every hidden-gradient norm is 0")
    return [float(n) / total for n in norms]


def sample_layers(probs: Sequence[float], size: int, rng, too_few: str = "raise") -> list[int]:
    """``size`` layer indices drawn without replacement with probabilities ``probs``
    (``numpy.random.Generator.choice``), sorted. Fewer non-zero probabilities than ``size``:
    ``too_few="raise"`` raises as numpy does; ``"uniform"`` draws uniformly instead."""
    import numpy as np

    p = np.asarray(probs, dtype=np.float64)
    if size > len(p):
        raise ValueError(f"cannot sample {size} of {len(p)} layers")
    if int((p > 0).sum()) < size:
        if too_few != "uniform":
            raise ValueError(f"Fewer non-zero entries in p than size: {int((p > 0).sum())} "
                             f"layers have a non-zero hidden gradient, {size} are to be sampled")
        p = None
    else:
        p = p / p.sum()
    return sorted(int(i) for i in rng.choice(len(probs), size=size, replace=False, p=p))
