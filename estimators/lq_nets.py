"""LQ-Nets: learned quantizer bases fitted by quantization error minimisation (Zhang, Yang, Ye, Hua, ECCV 2018)."""
from __future__ import annotations

import itertools

import torch

from .base import Estimator, Param, register_estimator, surrogate

#: Φ⁻¹(0.75): the median of |x| for x ~ N(0, σ²) is 0.6745·σ (the authors' basis initialisation).
NORM_PPF_0_75 = 0.6745


def code_table(bits: int, signed: bool) -> torch.Tensor:
    """All 2^K codes e ∈ {−1, +1}^K (signed) or {0, 1}^K, one per row (float64)."""
    digits = (-1.0, 1.0) if signed else (0.0, 1.0)
    return torch.tensor(list(itertools.product(digits, repeat=bits)), dtype=torch.float64)


@register_estimator
class LQNets(Estimator):
    """LQ-Nets: nearest level of a learned basis, the basis refitted by QEM in training.

    levels:   {vᵀe : e ∈ E},  v ∈ R^K the basis (K = bits),  E = {−1, +1}^K (weights), {0, 1}^K (activations)
    forward:  y = the level nearest x (thresholds at the midpoints of the sorted levels; activations
              below the smallest level 0 map to 0, i.e. the paper's ReLU before the quantizer)
    backward: weights ∂L/∂x = ∂L/∂y (STE);  activations ∂L/∂x = ∂L/∂y · 1[0 < x ≤ max level]
              (the ReLU's and the authors' clip of x at the top level)
    QEM (train mode, every forward, after y is computed; Alg. 1 of the paper): with B the N×K codes of
    the N inputs x under the current v,
              v* = (BᵀB + δI)⁻¹(Bᵀx + δv)     (least squares, ridge δ = 1e-4 as the authors' code)
              v ← m·v + (1 − m)·v*             (moving average, m = ``momentum``, 0.9 in the authors' code)
    init (first batch, σ = RMS of x): weights v_j = 2^j·0.6745·σ/2^(K−1); activations
              v_j = 2^j·0.6745·2σ/(2^K − 1) (the authors' formulas with the batch's σ for their nominal one)
    One basis per tensor, for weights too: the paper learns one per output channel, but one level set
    per layer is what the estimator contract (hard = level, level ∈ level_set()) can state.
    Caveat: activations are unsigned (ReLU-like); MINW-Net blocks feed HardTanh outputs in [−1, 1],
    so every negative input becomes 0.
    """

    basis: torch.Tensor  # buffers (typed for the type checker)
    initialized: torch.Tensor
    codes: torch.Tensor

    name = "lq_nets"
    paper = ("Zhang, Yang, Ye, Hua, 'LQ-Nets: Learned Quantization for Highly Accurate and Compact Deep "
             "Neural Networks', ECCV 2018")
    clip_weights = None
    grids = ("learned_basis",)
    params = {
        "momentum": Param(0.9, "moving-average factor m of the basis: v ← m·v + (1 − m)·v*", low=0.0, high=1.0),
    }
    RIDGE = 1e-4

    def __init__(self, bits=1, role="weight", **params):
        super().__init__(bits=bits, role=role, **params)
        self.register_buffer("basis", torch.zeros(bits))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("codes", code_table(bits, signed=role == "weight").float(), persistent=False)

    # -- the basis -------------------------------------------------------------------------------
    @torch.no_grad()
    def _init_basis(self, x: torch.Tensor) -> None:
        if bool(self.initialized):
            return
        sigma = float(x.double().pow(2).mean().sqrt())
        k = self.bits
        base = NORM_PPF_0_75 * sigma / 2 ** (k - 1) if self.role == "weight" else NORM_PPF_0_75 * 2 * sigma / (2**k - 1)
        self.basis.copy_(base * 2.0 ** torch.arange(k, dtype=torch.float64))
        self.initialized.fill_(True)

    def levels(self, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """(sorted levels vᵀe, the code e of each sorted level)."""
        values = self.codes.to(dtype) @ self.basis.to(dtype)
        values, order = values.sort()
        return values, self.codes.to(dtype)[order]

    def _nearest(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(index of the nearest level of each x, the sorted levels), in x's dtype."""
        values, _ = self.levels(x.dtype)
        return torch.bucketize(x, (values[1:] + values[:-1]) / 2), values

    @torch.no_grad()
    def _qem_step(self, x: torch.Tensor, idx: torch.Tensor) -> None:
        """One QEM update of the basis from inputs x and their level indices (the paper's Eq. 8–9)."""
        n_levels = 2**self.bits
        _, codes = self.levels(torch.float64)
        flat = idx.reshape(-1)
        counts = torch.bincount(flat, minlength=n_levels).to(torch.float64)
        sums = torch.bincount(flat, weights=x.reshape(-1).to(torch.float64), minlength=n_levels)
        btb = codes.T @ (codes * counts[:, None])  # Σ_l n_l e_l e_lᵀ = BᵀB
        btx = codes.T @ sums  # Σ_l e_l Σ_{x→l} x = Bᵀx
        v = self.basis.to(torch.float64)
        eye = torch.eye(self.bits, dtype=torch.float64, device=v.device)
        v_star = torch.linalg.solve(btb + self.RIDGE * eye, btx + self.RIDGE * v)
        m = self.hparams["momentum"]
        self.basis.copy_(m * v + (1 - m) * v_star)

    # -- the estimator contract -----------------------------------------------------------------
    def hard(self, x):
        self._init_basis(x)
        idx, values = self._nearest(x)
        return values[idx]

    def train_forward(self, x):
        self._init_basis(x)
        idx, values = self._nearest(x.detach())
        self._qem_step(x.detach(), idx)  # y below uses the levels from before the update
        if self.role == "weight":
            return surrogate(x, lambda t: values[idx], None)
        top = values[-1]
        return surrogate(x, lambda t: values[idx], lambda t, g: g * ((t > 0) & (t <= top)).to(g.dtype))

    def level_set(self):
        return self.levels(torch.float64)[0].cpu()

    def schedule_values(self):
        return {f"v{j + 1}": float(v) for j, v in enumerate(self.basis.tolist())}
