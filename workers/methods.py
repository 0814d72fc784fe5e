"""Named methods: the published systems the AQE paper compares against (its Tables III–V), each
spelled as a registered estimator with parameters, the (weight bits, activation bits) cells the
paper cites for it, a first/last-layer policy and the citation.

    >>> from workers.methods import get_method
    >>> m = get_method("twn")
    >>> m.estimator, m.params, m.bit_cells()
    ('xnor', {'scale': 'twn'}, [(2, 32)])

Bits as in the specs: 32 = float (the paper prints 16 or 32 for float). ``first_last_float``
follows the paper's Table V footnotes where the method is in Table V, otherwise the cited
method's own convention; a cell can override it where the paper marks that cell differently.

    python -m workers.methods                     # print the method catalogue (Markdown)
    python -m workers.methods --write README.md   # refresh README's block between the markers
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import estimators
from estimators.catalog import block_cli
from estimators.registry import Registry

METHODS: Registry = Registry("method")
FLOAT = estimators.FLOAT_BITS
START, END = "<!-- method-catalog:start -->", "<!-- method-catalog:end -->"


@dataclass(frozen=True)
class Cell:
    """One (weight bits, activation bits) setting the paper prints for a method."""

    w_bits: int
    a_bits: int
    tables: tuple[str, ...]
    first_last_float: bool | None = None  # None: the method's policy
    note: str = ""


@dataclass(frozen=True)
class Method:
    """A published system: estimator + parameters + cells + first/last-layer policy + citation."""

    name: str
    title: str
    estimator: str
    cells: tuple[Cell, ...]
    first_last_float: bool
    citation: str
    params: dict[str, Any] = field(default_factory=dict)
    notes: str = ""

    def policy(self, cell: Cell) -> bool:
        """The cell's first_last_float: its own where the paper marks it, else the method's."""
        return self.first_last_float if cell.first_last_float is None else cell.first_last_float

    def bit_cells(self) -> list[tuple[int, int]]:
        """The distinct (w_bits, a_bits) cells, in the order the paper's tables give them."""
        return list(dict.fromkeys((c.w_bits, c.a_bits) for c in self.cells))

    def settings(self) -> list[dict[str, Any]]:
        """One training setting per cell: ``{w_bits, a_bits, first_last_float}`` (what a spec runs)."""
        return [{"w_bits": c.w_bits, "a_bits": c.a_bits, "first_last_float": self.policy(c)} for c in self.cells]

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "title": self.title, "estimator": self.estimator, "params": dict(self.params),
            "first_last_float": self.first_last_float, "citation": self.citation, "notes": self.notes,
            "cells": [{"w_bits": c.w_bits, "a_bits": c.a_bits, "tables": list(c.tables),
                       "first_last_float": self.policy(c), "note": c.note} for c in self.cells],
        }


def register_method(method: Method) -> Method:
    """Register a method; its estimator and parameters must validate (fails at import otherwise)."""
    estimators.validate_estimator_params(method.estimator, method.params)
    for c in method.cells:
        for b in (c.w_bits, c.a_bits):
            if b not in (*estimators.SUPPORTED_BITS, FLOAT):
                raise ValueError(f"method {method.name!r}: bit width {b} is not supported")
    return METHODS.register(method.name)(method)


def list_methods() -> list[str]:
    """Registered method names, sorted."""
    return METHODS.names()


def get_method(name: str) -> Method:
    """The method called ``name``; an unknown name raises ``estimators.UnknownNameError`` listing the known."""
    return METHODS.get(name)


def method_catalog() -> list[dict[str, Any]]:
    """Every method as a plain dict (for GET /catalog and docs)."""
    return [get_method(n).as_dict() for n in list_methods()]


XNOR_NET = ("Rastegari, Ordonez, Redmon, Farhadi, 'XNOR-Net: ImageNet Classification Using Binary Convolutional "
            "Neural Networks', ECCV 2016")
TWN = "Li, Zhang, Liu, 'Ternary Weight Networks', arXiv:1605.04711, 2016"

register_method(Method(
    "bnn", "BNN: binarized weights and activations, clipped STE", "clipped_ste",
    (Cell(1, 1, ("IV",)),), False,
    "Hubara, Courbariaux, Soudry, El-Yaniv, Bengio, 'Binarized Neural Networks', NeurIPS 2016",
    notes="sign forward, ∂/∂x = 1[|x| ≤ 1]; latent weights clipped to [−1, 1]; the raw image stays float"))
register_method(Method(
    "binaryconnect", "BinaryConnect: binary weights, float activations", "ste",
    (Cell(1, FLOAT, ("IV",)),), False,
    "Courbariaux, Bengio, David, 'BinaryConnect: Training Deep Neural Networks with binary weights during "
    "propagations', NeurIPS 2015",
    notes="deterministic BinaryConnect (sign, straight-through gradient, latent weights clipped to [−1, 1]); "
          "the stochastic variant is not implemented"))
register_method(Method(
    "bwn", "BWN: binary weights with XNOR-Net's per-filter scale, float activations", "xnor",
    (Cell(1, FLOAT, ("V",)),), False, XNOR_NET,
    notes="Table V marks neither first nor last layer as float"))
register_method(Method(
    "xnor_net", "XNOR-Net: scaled binary weights, binary activations", "xnor",
    (Cell(1, 1, ("V",)),), False, XNOR_NET,
    notes="the activations' K = mean|A| scale map is left out (BN follows every conv); XNOR-Net's own code "
          "keeps the first and last layers real-valued, but Table V marks neither"))
register_method(Method(
    "twn", "TWN: ternary weights with TWN's threshold and scale, float activations", "xnor",
    (Cell(2, FLOAT, ("IV", "V")),), False, TWN, params={"scale": "twn"},
    notes="Δ = 0.7·mean|W|, α = mean of |W| over |W| > Δ, both per layer"))
register_method(Method(
    "tnn", "TNN (Mellempudi et al.): ternary weights, 8-bit activations", "xnor",
    (Cell(2, 8, ("IV",)),), False,
    "Mellempudi, Kundu, Mudigere, Das, Kaul, Dubey, 'Ternary Neural Networks with Fine-Grained Quantization', "
    "arXiv:1705.01462, 2017", params={"scale": "twn"},
    notes="the TNN that Table IV cites, at W2/A8 (printed '8 (float)'); the paper's fine-grained groups of "
          "filters (own Δ, α per group) are one group per layer here (TWN's rule), and the 8-bit activations "
          "use the estimator's 8-bit quantizer (MINW-Net powers of two). At a_bits = 2 the same estimator gives "
          "ternary activations (the AQE paper's own 'TNN' reading)"))
register_method(Method(
    "dorefa", "DoReFa-Net at the bit pairs the paper cites", "dorefa",
    (Cell(1, 1, ("IV",)), Cell(1, 2, ("IV",)), Cell(8, 8, ("IV",)), Cell(1, 4, ("V",))), True,
    "Zhou, Wu, Ni, Zhou, Wen, Zou, 'DoReFa-Net: Training Low Bitwidth Convolutional Neural Networks with Low "
    "Bitwidth Gradients', arXiv:1606.06160, 2016",
    notes="first and last layers float (DoReFa's convention; Table V footnotes 1 and 2 for W1/A4)"))
register_method(Method(
    "hwgq", "HWGQ: binary weights, half-wave Gaussian quantized activations", "hwgq",
    (Cell(1, 2, ("V",), note="Table V footnote 3: modified architecture"),), True,
    "Cai, He, Sun, Vasconcelos, 'Deep Learning with Low Precision by Half-wave Gaussian Quantization', CVPR 2017",
    notes="first and last layers float (Table V footnotes 1 and 2)"))
register_method(Method(
    "lq_nets", "LQ-Nets: learned quantizer bases for weights and activations", "lq_nets",
    (Cell(2, FLOAT, ("V",)), Cell(3, FLOAT, ("V",)), Cell(1, 2, ("V",))), True,
    "Zhang, Yang, Ye, Hua, 'LQ-Nets: Learned Quantization for Highly Accurate and Compact Deep Neural Networks', "
    "ECCV 2018",
    notes="first and last layers float (Table V footnotes 1 and 2)"))
register_method(Method(
    "minw_aqe", "MINW-Net with AQE (the paper's own)", "aqe",
    (Cell(3, FLOAT, ("III",)),
     Cell(1, FLOAT, ("IV", "V")),
     Cell(2, FLOAT, ("IV", "V")),
     Cell(1, 1, ("IV", "V"), note="Table V footnote 1: first layer not quantized, last layer quantized — "
                                   "no such policy here, so the method's (all quantized) applies"),
     Cell(1, 2, ("IV", "V"), first_last_float=True, note="Table V footnotes 1 and 2; Table IV does not say"),
     Cell(2, 8, ("IV",)),
     Cell(3, 8, ("IV",))), False,
    "Chen, Liu, Zhang, Hou, Yang, 'Propagating Asymptotic-Estimated Gradients for Low Bitwidth Quantized Neural "
    "Networks', IEEE JSTSP 2020, doi:10.1109/JSTSP.2020.2966327",
    notes="Sec. III-E: every layer quantized except the raw image input; Table IV's '16 (float)' is 32 here"))


def catalog_markdown() -> str:
    """One table row per method: name, title, estimator, cells, first/last policy, citation."""
    rows = ["| method | what | estimator | cells (W/A, paper table) | first/last float | cited paper |",
            "|---|---|---|---|---|---|"]
    yes_no = lambda flag: "yes" if flag else "no"  # noqa: E731
    for m in method_catalog():
        est = m["estimator"] + (f" `{m['params']}`" if m["params"] else "")
        cells = ", ".join(f"{c['w_bits']}/{c['a_bits']} ({'+'.join(c['tables'])})" for c in m["cells"])
        own = [f"{c['w_bits']}/{c['a_bits']} {yes_no(c['first_last_float'])}"
               for c in m["cells"] if c["first_last_float"] != m["first_last_float"]]
        policy = yes_no(m["first_last_float"]) + (f" (per cell: {', '.join(own)})" if own else "")
        citation = m["citation"].replace("|", "/")
        rows.append(f"| `{m['name']}` | {m['title']} | {est} | {cells} | {policy} | {citation} |")
    return "\n".join(rows) + "\n"


def main() -> None:
    block_cli("The method catalogue as Markdown", catalog_markdown, START, END)


if __name__ == "__main__":
    main()
