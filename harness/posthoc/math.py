"""The post-hoc methods' math (METHODS.md, "More methods": 4. SafeLoRA, 5. Antidote), on plain
tensors, so each formula is tested on hand-checkable numbers."""
from __future__ import annotations

import torch


def safelora_project(V: torch.Tensor, B: torch.Tensor, A: torch.Tensor
                     ) -> tuple[float, torch.Tensor]:
    """(cos(vec(C B A), vec(B A)) rounded to 5 decimals, the projected B = C B) with
    C = V V^T / ||V||_F, in float32 and without forming C (d_out x d_out) or B A: with
    M = V (V^T B) / ||V||_F, <CBA, BA> = sum((B^T M) * (A A^T)), ||CBA||^2 = sum((M^T M) * AA^T),
    ||BA||^2 = sum((B^T B) * AA^T). V: d_out x d_in, B: d_out x r, A: r x d_in."""
    V, B, A = V.float(), B.float(), A.float()
    norm_v = torch.linalg.matrix_norm(V)
    if float(norm_v) == 0.0:
        raise ValueError("SafeLoRA: W_aligned - W_base is zero for a LoRA target; the align "
                         "stage did not change it, so there is no alignment subspace")
    M = V @ (V.T @ B) / norm_v
    return _cosine(M, B, A), M


def safelora_project_factored(V_B: torch.Tensor, V_A: torch.Tensor, B: torch.Tensor,
                              A: torch.Tensor) -> tuple[float, torch.Tensor]:
    """``safelora_project`` for V = V_B V_A given as factors (a LoRA alignment's scaled B A;
    V_B: d_out x r_v, V_A: r_v x d_in), never forming V: with G = V_A V_A^T (r_v x r_v),
    ||V||_F^2 = sum((V_B^T V_B) * G) and V (V^T B) = V_B (G (V_B^T B)), so M is d_out x r from
    r_v x r products. In float32."""
    V_B, V_A, B, A = V_B.float(), V_A.float(), B.float(), A.float()
    gram_v = V_A @ V_A.T
    norm_v = ((V_B.T @ V_B) * gram_v).sum().clamp_min(0).sqrt()
    if float(norm_v) == 0.0:
        raise ValueError("SafeLoRA: the alignment adapter's update is zero for a LoRA target; "
                         "the align stage did not change it, so there is no alignment subspace")
    M = V_B @ (gram_v @ (V_B.T @ B)) / norm_v
    return _cosine(M, B, A), M


def _cosine(M: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> float:
    """cos(vec(M A), vec(B A)) rounded to 5 decimals, from r x r products."""
    gram_a = A @ A.T
    inner = ((B.T @ M) * gram_a).sum()
    norms = ((M.T @ M) * gram_a).sum().clamp_min(0) * ((B.T @ B) * gram_a).sum().clamp_min(0)
    # a zero update (B still at its zero init) has no direction: cos 0, as torch's
    # cosine_similarity (the anchor's) gives; projecting it changes nothing
    cos = float(inner / norms.sqrt()) if float(norms) > 0 else 0.0
    return round(cos, 5)


def numerical_rank(V: torch.Tensor) -> int:
    """V's rank in float32: singular values above max(d) * float32 eps * s_max (numpy's
    matrix_rank rule) count."""
    return int(torch.linalg.matrix_rank(V.float(), rtol=max(V.shape) *
                                        torch.finfo(torch.float32).eps))


def factored_rank(V_B: torch.Tensor, V_A: torch.Tensor) -> int:
    """``numerical_rank(V_B @ V_A)`` from the factors: the singular values of V_B V_A are those
    of R V_A (r_v x d_in), R from a thin QR of V_B."""
    R = torch.linalg.qr(V_B.float()).R
    S = torch.linalg.svdvals(R @ V_A.float())
    if S.numel() == 0 or S[0] == 0:
        return 0
    tol = S[0] * max(V_B.shape[0], V_A.shape[1]) * torch.finfo(torch.float32).eps
    return int((S > tol).sum())


def safelora_selected(cosines: list[float], mode: str, threshold: float,
                      num_layers: int) -> list[bool]:
    """Which modules to project: ``threshold`` mode, cos <= threshold; ``number`` mode, cos <=
    the num_layers-th smallest cosine (ties can select more than num_layers)."""
    if mode == "number":
        if not cosines:
            return []
        threshold = sorted(cosines)[min(num_layers, len(cosines)) - 1]
    return [c <= threshold for c in cosines]


def wanda_scores(W: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """S_ij = |W_ij| * sqrt(s_j), s_j the mean per-sample sum over tokens of x_j^2."""
    return W.abs() * sq_norms.sqrt().to(W.dtype)


def antidote_mask(scores: torch.Tensor, dense_ratio: float) -> torch.Tensor:
    """True where a weight counts as harmful: within each output row, everything above the
    lowest floor(cols * (1 - dense_ratio)) scores of a stable ascending sort (a tie ranks the
    later index higher)."""
    cols = scores.shape[1]
    keep = int(cols * (1.0 - dense_ratio))
    order = torch.sort(scores, dim=1, stable=True).indices
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(1, order[:, keep:], True)
    return mask


class RunningSquares:
    """s_j: the running mean over samples of sum over a sample's tokens of x_j^2."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.samples = 0

    def add(self, per_sample: torch.Tensor) -> None:
        """per_sample: (samples, features), each row a sample's sum over tokens of x^2."""
        batch = per_sample.double().sum(0)
        self.total = batch if self.total is None else self.total + batch
        self.samples += per_sample.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.samples
