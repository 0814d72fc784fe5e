"""Packed low-bit models: export a trained net to one file, run it with bit arithmetic.

    >>> from workers.packed import export_model, PackedNet
    >>> report = export_model(model, "trial.bbpack")        # 1-bit weights: 64 per uint64
    >>> PackedNet.load("trial.bbpack").predict(test_x)      # XNOR / ternary / SHIFT + popcount

Modules: ``format`` (file layout, the typed layer records, bit packing), ``fold``
(BN/HardTanh/next-quantizer → integer thresholds), ``export`` (model → file; :func:`packed_summary`,
the check a sweep passes to ``run_trial``), ``kernels`` (popcount dot products, im2col of packed
pixels, thresholds: numba-compiled in ``jit``, numpy as the fallback), ``engine`` (the network
walker; ``kernels``, ``jit`` and ``engine`` import no torch).
"""
from .engine import PackedNet
from .export import ExportReport, UnsupportedModelError, compare, export_checkpoint, export_model, packed_summary

__all__ = ["ExportReport", "PackedNet", "UnsupportedModelError", "compare", "export_checkpoint", "export_model",
           "packed_summary"]
