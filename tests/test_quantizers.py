"""Hard quantizers on hand-computed inputs, and their exact level sets."""
import pytest
import torch

from estimators import quantizers as Qz
from estimators.registry import UnknownNameError


def test_sign_maps_zero_to_plus_one():
    x = torch.tensor([-2.0, -1e-9, 0.0, 1e-9, 3.0])
    assert Qz.sign(x).tolist() == [-1, -1, 1, 1, 1]


def test_ternary_uses_twn_threshold():
    x = torch.tensor([-1.0, -0.2, 0.0, 0.3, 0.5, 2.0])  # mean|x| = 4/6, Δ = 0.7·4/6 = 0.4667
    assert Qz.ternary(x).tolist() == [-1, 0, 0, 0, 1, 1]
    assert Qz.ternary(x, delta_ratio=0.4).tolist() == [-1, 0, 0, 1, 1, 1]  # Δ = 0.2667


def test_ternary_tie_at_delta_is_zero():
    # |x| = Δ exactly quantizes to 0 (TWN: 0 if |x| ≤ Δ); an all-zero tensor (Δ = 0) stays all zero
    assert Qz.ternary(torch.zeros(5)).tolist() == [0, 0, 0, 0, 0]
    assert Qz.ternary(torch.zeros(2, 3), dims="sample").tolist() == [[0, 0, 0], [0, 0, 0]]
    x = torch.tensor([-1.0, 1.0, 0.0, 2.0])  # mean|x| = 1, so Δ = 1·1 = 1 exactly
    assert Qz.ternary(x, delta_ratio=1.0).tolist() == [0, 0, 0, 1]  # the ±1 ties go to 0


def test_ternary_per_sample_statistics():
    x = torch.tensor([[0.1, 0.2, 1.0], [10.0, 20.0, 100.0]])
    per_sample = Qz.ternary(x, dims="sample")
    assert per_sample.tolist() == [[0, 0, 1], [0, 0, 1]]  # each row has its own Δ
    assert Qz.ternary(x).tolist() == [[0, 0, 0], [0, 1, 1]]  # one Δ = 0.7·131.3/6 = 15.32


def test_pow2_three_bits_authors_thresholds():
    # M = 1: |x| < .02 → 0; [.02, .07) → ¼; [.07, .14) → ½; ≥ .14 → 1
    x = torch.tensor([0.01, -0.019, 0.02, 0.05, -0.07, 0.1, 0.14, -0.5, 1.0])
    assert Qz.pow2(x, bits=3).tolist() == [0, 0, 0.25, 0.25, -0.5, 0.5, 1, -1, 1]


def test_pow2_thresholds_above_three_bits():
    # 4 bits: q = 7 levels 1, ½, …, 2^-6; edges 0.14·2^-i for levels 2^-i (i ≤ 5), the smallest level's
    # edge a quarter of the one above it (the zero threshold)
    assert Qz.pow2_thresholds(4) == pytest.approx(
        (0.00109375, 0.004375, 0.00875, 0.0175, 0.035, 0.07, 0.14), rel=1e-12)
    t5 = Qz.pow2_thresholds(5)
    assert len(t5) == 15 and t5[-1] == pytest.approx(0.14) and t5[-2] == pytest.approx(0.07)
    assert t5[1] == pytest.approx(0.14 * 2.0**-13) and t5[0] == pytest.approx(0.14 * 2.0**-15)
    # on M = 1 the staircase at 4 bits: each value lands on the level whose edge it has passed
    x = torch.tensor([0.001, 0.0011, 0.005, 0.01, 0.02, 0.05, 0.1, -0.2, 1.0])
    assert Qz.pow2(x, bits=4).tolist() == [0, 2**-6, 2**-5, 2**-4, 2**-3, 2**-2, 2**-1, -1, 1]


def test_pow2_thresholds_scale_with_max():
    x = torch.tensor([1.0, 3.0, 10.0])  # M = 10: .2 → ¼, .7 → ½, 1.4 → 1
    assert Qz.pow2(x, bits=3).tolist() == [0.5, 1, 1]
    assert Qz.pow2(x, bits=3, thresholds=(0.05, 0.2, 0.5)).tolist() == [0.25, 0.5, 1]


def test_pow2_per_sample_statistics():
    x = torch.tensor([[0.1, 0.05, 1.0], [10.0, 5.0, 100.0]])  # each row's M is its own max: the same levels
    assert Qz.pow2(x, bits=3, dims="sample").tolist() == [[0.5, 0.25, 1], [0.5, 0.25, 1]]
    assert Qz.pow2(x, bits=3).tolist() == [[0, 0, 0], [0.5, 0.25, 1]]  # one M = 100 for the whole tensor


def test_pow2_rejects_bad_thresholds():
    with pytest.raises(ValueError, match="3 increasing positive thresholds"):
        Qz.pow2(torch.ones(3), bits=3, thresholds=(0.1, 0.05, 0.2))
    for bad in [(0.05, 0.05, 0.2), (0.0, 0.1, 0.2), (-0.1, 0.1, 0.2), (0.1, 0.2), (0.1, 0.2, 0.3, 0.4)]:
        with pytest.raises(ValueError, match="3 increasing positive thresholds"):  # ties, zero, sign, count
            Qz.pow2(torch.ones(3), bits=3, thresholds=bad)
    with pytest.raises(ValueError, match="bits >= 3"):
        Qz.pow2_thresholds(2)


def test_uniform_unsigned_and_signed():
    x = torch.tensor([-0.5, 0.1, 0.2, 0.5, 0.9, 1.5])
    assert torch.allclose(Qz.uniform(x, 2), torch.tensor([0, 0, 1 / 3, 2 / 3, 1, 1]))
    assert Qz.uniform(x, 1, signed=True).tolist() == [-1, 1, 1, 1, 1, 1]
    assert torch.allclose(Qz.uniform(torch.tensor([-1.0, -0.4, 0.2, 0.7]), 2, signed=True),
                          torch.tensor([-1, -1 / 3, 1 / 3, 1]))


@pytest.mark.parametrize(
    "name,bits,expected",
    [
        ("sign", 1, [-1, 1]),
        ("ternary", 2, [-1, 0, 1]),
        ("pow2", 3, [-1, -0.5, -0.25, 0, 0.25, 0.5, 1]),
        ("pow2", 4, [-1, -0.5, -0.25, -0.125, -1 / 16, -1 / 32, -1 / 64, 0,
                     1 / 64, 1 / 32, 1 / 16, 0.125, 0.25, 0.5, 1]),
        ("uniform", 1, [0, 1]),
        ("uniform", 2, [0, 1 / 3, 2 / 3, 1]),
        ("uniform_signed", 2, [-1, -1 / 3, 1 / 3, 1]),
    ],
)
def test_level_sets(name, bits, expected):
    assert torch.allclose(Qz.levels(name, bits), torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("name", ["minw", "uniform", "uniform_signed"])
def test_outputs_hit_exactly_the_level_set(name, bits):
    torch.manual_seed(bits)
    x = torch.randn(20000, dtype=torch.float64) * 2
    if name == "minw":
        qname = Qz.minw_quantizer(bits)
        y = {"sign": Qz.sign, "ternary": Qz.ternary}.get(qname, lambda t: Qz.pow2(t, bits=bits))(x)
    else:
        qname = name
        y = Qz.uniform(x, bits, signed=(name == "uniform_signed"))
    lv = Qz.levels(qname, bits)
    assert set(y.unique().tolist()) <= set(lv.tolist())
    if bits <= 4:  # enough samples to reach every level
        assert len(y.unique()) == len(lv)
    assert len(lv) == {"sign": 2, "ternary": 3}.get(qname, 2**bits - 1 if qname == "pow2" else 2**bits)


def test_registry_lookup_lists_known_names():
    assert Qz.get_quantizer("sign") is Qz.sign
    with pytest.raises(UnknownNameError, match="unknown quantizer 'nope'; known: pow2, sign, ternary, uniform"):
        Qz.get_quantizer("nope")


def test_pow2_with_one_threshold_is_a_dead_zone_sign():
    """q = 1 (2 bits, one threshold t): |x| < t·M → 0, else ±1; the same as the composed staircase."""
    x = torch.tensor([-2.0, -0.61, -0.6, -0.59, -0.0, 0.0, 0.3, 0.6, 1.0, 2.0])
    want = torch.tensor([-1.0, -1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    for fn in (Qz.pow2, Qz.pow2_composed):
        y = fn(x, 2, (0.3,))
        assert torch.equal(y, want), fn
    assert torch.equal(Qz.pow2(x, 2, (0.3,)).signbit(), Qz.pow2_composed(x, 2, (0.3,)).signbit())


def test_the_quantizers_defaults_are_twns_delta_and_three_bit_powers_of_two():
    torch.manual_seed(0)
    x = torch.randn(4, 50)
    assert torch.equal(Qz.ternary_composed(x), Qz.ternary(x, 0.7))
    assert torch.equal(Qz.pow2(x), Qz.pow2(x, 3, Qz.POW2_THRESHOLDS_3BIT))
    assert torch.equal(Qz.pow2_composed(x), Qz.pow2(x, 3))
