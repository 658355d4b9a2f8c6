"""TC0 circuit tracer: primitive counts, depth rules, constants, dead code, fused attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flowar.analysis.circuit import CircuitTracer, trace_circuit
from flowar.attention.base import BlockLayout


def nonzero(vector: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in vector.items() if v}


def test_matmul_counts_products_and_sums():
    a, b, c = 5, 7, 3
    w = torch.randn(b, c)
    count, _ = trace_circuit(lambda x: x @ w, torch.randn(a, b))
    assert nonzero(count.depth) == {"std": 1, "sum": 1}
    assert count.size["std"] == a * b * c
    assert count.size["sum"] == a * c and count.size["sum_terms"] == a * c * b
    assert count.total_size == a * b * c + a * b * c


def test_linear_bias_is_one_add_whether_or_not_pytorch_fuses_it():
    layer = torch.nn.Linear(4, 6)
    x = torch.randn(2, 5, 4)
    fused, _ = trace_circuit(layer, x)  # contiguous input: addmm
    split, _ = trace_circuit(lambda t: layer(t.transpose(0, 1)), x)  # strided: mm + add
    assert "addmm" in fused.by_op and "addmm" not in split.by_op
    for count in (fused, split):
        assert nonzero(count.depth) == {"std": 2, "sum": 1}
        assert count.size["sum"] == 60 and count.size["sum_terms"] == 60 * 4
        assert count.size["std"] == 60 * 4 + 60


def test_sequential_depths_add_and_parallel_depths_take_the_max():
    def fn(x):
        left = torch.exp(x) * 2.0  # exp, std
        right = torch.sqrt(x.abs()) + 1.0 + 2.0  # std (abs), sqrt, std, std
        return left + right  # std

    count, _ = trace_circuit(fn, torch.randn(9))
    assert nonzero(count.depth) == {"std": 4, "exp": 1, "sqrt": 1}
    # The critical path (unit weights) is the longer branch: abs, sqrt, +, +, +.
    assert nonzero(count.critical_path) == {"std": 4, "sqrt": 1}
    assert count.size["exp"] == 9 and count.size["sqrt"] == 9 and count.size["std"] == 9 * 5


def test_reductions_cost_one_layer_whatever_their_length():
    for length in (4, 64):
        count, _ = trace_circuit(lambda x: x.sum(-1), torch.randn(3, length))
        assert nonzero(count.depth) == {"sum": 1}
        assert count.size["sum"] == 3 and count.size["sum_terms"] == 3 * length


def test_constants_are_folded():
    w = torch.randn(4, 4)
    positions = torch.arange(4.0)

    def fn(x):
        table = torch.cos(positions[:, None] * w) @ w  # weights and positions only: wiring
        return x * table

    count, _ = trace_circuit(fn, torch.randn(4, 4))
    assert nonzero(count.depth) == {"std": 1}
    assert count.total_size == 16 and count.size["trig"] == 0


def test_dead_code_is_not_counted():
    def with_dead_branch(x):
        unused = torch.exp(x @ x.T)  # noqa: F841 (computed, never used)
        if (x.sum() > 1e9).item():  # a check read back to Python
            raise AssertionError
        return x + 1

    count, _ = trace_circuit(with_dead_branch, torch.randn(5, 5))
    assert nonzero(count.size) == {"std": 25}
    assert count.live_ops == 2  # the input and the add
    assert any("read back" in note for note in count.notes)


def test_noise_drawn_inside_is_an_input():
    count, _ = trace_circuit(lambda x: x + torch.randn(x.shape), torch.zeros(3))
    assert nonzero(count.depth) == {"std": 1}


def test_in_place_updates_keep_the_earlier_dependence():
    def fn(x):
        y = torch.zeros(6)
        y[:3] = torch.exp(x)
        y[3:] = x
        return y

    count, _ = trace_circuit(fn, torch.randn(3))
    assert nonzero(count.depth) == {"exp": 1}
    assert count.size["exp"] == 3


def test_fused_attention_counts_like_its_decomposition():
    w = torch.randn(8, 8)

    def fused(x):  # 4-D: PyTorch picks the fused CPU kernel, counted by the tracer's rule
        q = (x @ w)[None, None]
        return F.scaled_dot_product_attention(q, q, q)[0, 0]

    def decomposed(x):  # 3-D: PyTorch runs the reference math path, traced op by op
        q = (x @ w)[None]
        return F.scaled_dot_product_attention(q, q, q)[0]

    x = torch.randn(20, 8)
    a, _ = trace_circuit(fused, x)
    b, _ = trace_circuit(decomposed, x)
    assert "_scaled_dot_product_flash_attention_for_cpu" in a.by_op
    assert "_scaled_dot_product_flash_attention_for_cpu" not in b.by_op
    assert a.depth == b.depth and a.size == b.size
    assert a.size["exp"] == 20 * 20


def test_block_causal_mask_leaves_masked_terms_out():
    lengths = (1, 4, 16)
    layout = BlockLayout(lengths)
    tokens = sum(lengths)
    mask = layout.allowed()

    def fn(x):
        q = x[None, None]
        return F.scaled_dot_product_attention(q, q, q, attn_mask=mask)[0, 0]

    count, _ = trace_circuit(fn, torch.randn(tokens, 8))
    # Query block b sees every key of blocks <= b: sum_b N_b * P_b exponentials.
    prefix = [sum(lengths[: i + 1]) for i in range(len(lengths))]
    assert count.size["exp"] == sum(n * p for n, p in zip(lengths, prefix))


def test_gelu_uses_the_erf_slot_and_rms_norm_the_sqrt_slot():
    count, _ = trace_circuit(lambda x: F.rms_norm(F.gelu(x), (6,)), torch.randn(2, 6))
    assert count.depth["erf"] == 1 and count.depth["sqrt"] == 1 and count.depth["sum"] == 1
    assert count.size["erf"] == 12 and count.size["sqrt"] == 2


def test_unknown_ops_are_reported():
    count, _ = trace_circuit(lambda x: torch.special.bessel_j0(x) + 1, torch.randn(4))
    assert count.unclassified
    assert count.depth["other"] == 1


def test_weights_pick_the_critical_path():
    def fn(x):
        return torch.exp(x) + (x * 2 * 3)  # branches: exp | std, std

    heavy_exp = CircuitTracer(weights={"exp": 10.0})
    x = torch.randn(3)
    heavy_exp.mark_input(x)
    with heavy_exp:
        out = fn(x)
    assert nonzero(heavy_exp.count(out).critical_path) == {"exp": 1, "std": 1}
    count, _ = trace_circuit(fn, x)
    assert nonzero(count.critical_path) == {"std": 3}


def test_values_copied_to_numpy_are_noted():
    def fn(x):
        threshold = float(x.abs().amax().numpy())  # a data-dependent choice made in Python
        return x * threshold

    count, _ = trace_circuit(fn, torch.randn(4))
    assert any(note.startswith("1 data-dependent") for note in count.notes)
    constant, _ = trace_circuit(lambda x: x * float(torch.ones(1).numpy()[0]), torch.randn(4))
    assert not constant.notes
