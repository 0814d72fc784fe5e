"""AQE, the Asymptotic-Quantized Estimator (Chen et al., IEEE JSTSP 2020)."""
from __future__ import annotations

import torch

from .base import Param, register_estimator, surrogate
from .fused_ops import one_thread
from .minw import MINW_PARAMS, MinwEstimator, clipped_surrogate


@register_estimator
class AQE(MinwEstimator):
    """Asymptotic-Quantized Estimator: a convex mix of the hard quantizer and the identity.

    forward (train): x̂ = α·Q(x) + (1 − α)·x                  (Eq. 6, 18, 19)
    forward (eval):  x̂ = Q(x)                                 (Eq. 20)
    backward, by ``backward``:
      eq18      ∂L/∂x = 2α · ∂L/∂x̂ · 1[|x| ≤ 1]               (Eq. 18/19, Theorem 1; default)
      alg1      ∂L/∂x = ∂L/∂x̂ · 1[|x| ≤ 1]                    (Algorithm 1)
      autodiff  ∂L/∂x = (1 − α) · ∂L/∂x̂                      (autodiff of the mix, Q' = 0 between Q's steps)
    α by ``schedule`` at epoch e of E (the paper gives none):
      exp       α_e = α₀·(α₁/α₀)^(e/E)  = 0.5·2^(e/E) by default (the authors' n-BQ-NN code)
      linear    α_e = α₀ + (α₁ − α₀)·e/E
      constant  α_e = α₀  (α = ½ with alg1 or eq18 is the clipped STE's gradient, on any grid)
    Q by ``grid``: minw (the paper's: sign at 1 bit, ternary Δ = 0.7·mean|x| at 2 bits, powers of
    two at ≥3 bits, Eq. 4, 21, 22), uniform (DoReFa's levels: 2^k on [−1, 1] for weights, on [0, 1]
    for activations) or uniform_signed (2^k on [−1, 1] for both).
    Any hard Q: Q enters the forward only; the backward rules are the same for every Q, as the paper
    uses the sign rule for its ternary and powers-of-two Q ("h_i … can be chosen from Eq (4), Eq (21)
    and Eq (22)"). 1[|x| ≤ 1] is the HardTanh range the inputs live in (activations after HardTanh,
    latent weights clipped to [−1, 1]), not a property of Q. (Theorem 1's smoothing over z ~ U[−1, 1]
    would give α·Σ_j J_j·1[|x − t_j| ≤ 1] for a staircase Q with jumps J_j at t_j, which is 2α·1[|x| ≤ 1]
    only for sign; it is not used.) On DoReFa's unsigned activation levels Q(x) = 0 for x < 0, so
    there the mix is (1 − α)·x and eq18 / alg1 still pass the gradient on [−1, 0).
    """

    name = "aqe"
    paper = ("Chen, Liu, Zhang, Hou, Yang, 'Propagating Asymptotic-Estimated Gradients for Low Bitwidth "
             "Quantized Neural Networks', IEEE JSTSP 2020, doi:10.1109/JSTSP.2020.2966327")
    scheduled = True
    soft_forward = True
    params = {
        **MINW_PARAMS,
        "backward": Param("eq18", "pseudo-gradient: Eq. 18/19, Algorithm 1, or autodiff of the mix",
                          choices=("eq18", "alg1", "autodiff")),
        "schedule": Param("exp", "α schedule over the epochs", choices=("exp", "linear", "constant")),
        "alpha_start": Param(0.5, "α at epoch 0", low=1e-6, high=1.0),
        "alpha_end": Param(1.0, "α at the last epoch", low=1e-6, high=1.0),
    }

    @property
    def alpha(self) -> float:
        """α for the current training progress p = e/E."""
        a0, a1, p = self.hparams["alpha_start"], self.hparams["alpha_end"], self.progress
        kind = self.hparams["schedule"]
        if kind == "exp":
            return a0 * (a1 / a0) ** p
        if kind == "linear":
            return a0 + (a1 - a0) * p
        return a0

    def schedule_values(self):
        return {"alpha": self.alpha}

    def train_forward(self, x):
        a = self.alpha

        def mix(t):  # t + α·(Q(t) − t), into Q's tensor
            q = self.quantize(t)
            with one_thread(t):
                return torch.lerp(t, q, a, out=q)

        backward = self.hparams["backward"]
        if backward == "autodiff":  # the mix's own derivative where Q's is taken as 0: (1 − α)·g
            return surrogate(x, mix, 1.0 - a)
        return clipped_surrogate(x, mix, 2 * a if backward == "eq18" else None)  # 2α·g·1[|x| ≤ 1] or g·1[|x| ≤ 1]
