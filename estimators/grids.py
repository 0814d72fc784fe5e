"""Quantizer grids: the level sets estimators quantize to, by name.

An estimator declares the grids it can quantize to in its class attribute ``grids``, its own
first; estimators that can use more than one take a ``grid`` parameter (a spec's ``quantizer``
sets it for every estimator of the spec). Two estimators on the same grid quantize to the same
levels (up to the scale an estimator multiplies them by, see ``Estimator.scale``), so a ranking
at fixed bits compares their gradients, not their level sets. Levels of k bits:

  minw            sign {−1, +1} (1 bit), ternary {−1, 0, +1} (2 bits), powers of two
                  {0, ±2^−(q−1), …, ±½, ±1}, q = 2^(k−1) − 1 (≥3 bits), for weights and activations
                  (MINW-Net / AQE; thresholds from per-tensor or per-sample statistics)
  uniform         DoReFa's: weights 2^k evenly spaced levels on [−1, 1] ({−1, +1} at 1 bit, sign),
                  activations 2^k evenly spaced levels on [0, 1] (negative inputs → 0)
  uniform_signed  2^k evenly spaced levels on [−1, 1] for weights and activations (EWGS, DSQ)
  learned_step    LSQ's {−2^(k−1), …, 2^(k−1) − 1}·s with a learned step s ({−1, +1}·s at 1 bit)
  half_normal     HWGQ: activations on 0 and 2^k − 1 positive levels fitted to a half-normal;
                  weights as minw with a per-filter scale
  learned_basis   LQ-Nets: {vᵀe} for a learned basis v, e ∈ {−1, +1}^k (weights), {0, 1}^k (activations)

``uniform`` and ``uniform_signed`` have the same weight levels at k ≥ 2 and differ in the
activations ({0, ⅓, ⅔, 1} against {−1, −⅓, ⅓, 1} at 2 bits).
"""
from __future__ import annotations

from . import quantizers as Qz

#: grid name → one line on its levels (the module docstring has the formulas)
GRIDS: dict[str, str] = {
    "minw": "sign / ternary / powers of two (MINW-Net), signed, weights and activations alike",
    "uniform": "DoReFa's: 2^k levels on [−1, 1] for weights, on [0, 1] for activations",
    "uniform_signed": "2^k levels on [−1, 1] for weights and activations (EWGS, DSQ)",
    "learned_step": "LSQ's {−2^(k−1), …, 2^(k−1) − 1}·s with a learned step s",
    "half_normal": "HWGQ's half-normal Lloyd levels for activations, minw weights with a per-filter scale",
    "learned_basis": "LQ-Nets' {vᵀe} for a learned basis v",
}
#: the grids whose levels are fixed by (bits, role), which any MINW-family estimator can quantize to
FIXED_GRIDS = ("minw", "uniform", "uniform_signed")


def list_grids() -> list[str]:
    """The names of every grid, in the order above."""
    return list(GRIDS)


def fixed_levels(grid: str, bits: int, role: str):
    """The exact unscaled levels of a fixed grid (float64, sorted)."""
    return Qz.levels(Qz.grid_quantizer(grid, bits, role), bits)
