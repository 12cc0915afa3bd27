import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from testbed.core.errors import TestbedError
from testbed.server.aggregate import (Contribution, aggregate, aggregate_layer,
                                      average_head)

OUT, IN = 7, 5  # deliberately not square: catches (in, out) / (out, in) mix-ups


def factors(gen: torch.Generator, rank: int, module: str = "q") -> dict[str, torch.Tensor]:
    return {f"{module}.A": torch.randn(rank, IN, generator=gen),
            f"{module}.B": torch.randn(OUT, rank, generator=gen)}


def full(value: float, *shape: int) -> torch.Tensor:
    return torch.full(shape, float(value))


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def weighted_product(contribs: list[Contribution]) -> torch.Tensor:
    """sum_i w_i B_i A_i / sum_i w_i for module "q", computed directly."""
    total = sum(c.weight for c in contribs)
    return sum(c.weight * c.factors["q.B"] @ c.factors["q.A"] for c in contribs) / total


def test_flexlora_slices_are_best_low_rank_approximations(gen):
    R = 4
    contribs = [Contribution(w, factors(gen, r)) for w, r in [(2.0, 1), (1.0, 3), (1.0, 4)]]
    out = aggregate_layer(factors(gen, R), contribs, "flexlora")
    dW = weighted_product(contribs).double()
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    for r in range(1, R + 1):
        approx = (out["q.B"][:, :r] @ out["q.A"][:r]).double()
        truncated = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
        torch.testing.assert_close(approx, truncated, atol=1e-5, rtol=1e-5)
        # Eckart-Young: the best rank-r error is the norm of the dropped singular values.
        error = torch.linalg.matrix_norm(dW - approx)
        assert error.item() == pytest.approx(S[r:].norm().item(), rel=1e-5, abs=1e-6)


def test_flexlora_factors_the_out_by_in_product_not_its_transpose(gen):
    contribs = [Contribution(1.0, factors(gen, 5)), Contribution(1.0, factors(gen, 5))]
    out = aggregate_layer(factors(gen, 5), contribs, "flexlora")
    # The SVD of the transpose would give B of shape (IN, R) and A of shape (R, OUT).
    assert out["q.B"].shape == (OUT, 5) and out["q.A"].shape == (5, IN)
    # Full rank (R = min(OUT, IN)) reproduces the product itself in its own orientation.
    expected = weighted_product(contribs)
    torch.testing.assert_close(out["q.B"] @ out["q.A"], expected, atol=1e-5, rtol=1e-5)


def test_pad_averages_each_rank_row_over_its_owners_only():
    current = {"q.A": full(7, 5, 3), "q.B": full(7, 2, 5)}  # R = 5: row 4 is nobody's
    small = Contribution(1.0, {"q.A": full(2, 2, 3), "q.B": full(10, 2, 2)})
    large = Contribution(3.0, {"q.A": full(6, 4, 3), "q.B": full(2, 2, 4)})
    out = aggregate_layer(current, [small, large], "pad")
    # rows 0-1: (1*2 + 3*6) / 4 = 5; rows 2-3: only the rank-4 device owns them; row 4: current.
    torch.testing.assert_close(out["q.A"], torch.tensor([5.0, 5, 6, 6, 7])[:, None].expand(5, 3))
    # columns 0-1: (1*10 + 3*2) / 4 = 4; columns 2-3: 2; column 4: current.
    torch.testing.assert_close(out["q.B"], torch.tensor([4.0, 4, 2, 2, 7]).expand(2, 5))


def test_fedavg_is_the_weighted_mean_of_each_factor(gen):
    contribs = [Contribution(w, factors(gen, 3)) for w in (1.0, 2.0, 5.0)]
    out = aggregate_layer(factors(gen, 3), contribs, "fedavg")
    for name in ("q.A", "q.B"):
        expected = sum(c.weight * c.factors[name] for c in contribs) / 8.0
        torch.testing.assert_close(out[name], expected)


def test_fedavg_rejects_mixed_ranks(gen):
    contribs = [Contribution(1.0, factors(gen, 2)), Contribution(1.0, factors(gen, 4))]
    with pytest.raises(TestbedError, match="fedavg.*heterogeneous method"):
        aggregate_layer(factors(gen, 4), contribs, "fedavg")


def test_zero_weight_devices_change_nothing(gen):
    current = factors(gen, 4)
    trained = Contribution(2.0, factors(gen, 4))
    idle = Contribution(0.0, {"q.A": full(1e6, 2, IN), "q.B": full(1e6, OUT, 2)})  # other rank too
    alone = aggregate_layer(current, [trained], "fedavg")
    torch.testing.assert_close(aggregate_layer(current, [trained, idle], "fedavg"), alone)
    for method in ("fedavg", "pad", "hetlora", "flexlora"):
        torch.testing.assert_close(aggregate_layer(current, [idle], method), current)


def test_hetlora_weights_are_proportional_to_product_norms():
    current = {"q.A": torch.zeros(2, 2), "q.B": torch.zeros(2, 2)}
    small = {"q.A": torch.tensor([[1.0, 0.0]]), "q.B": torch.tensor([[1.0], [0.0]])}  # ||BA|| = 1
    large = {"q.A": torch.eye(2), "q.B": torch.tensor([[3.0, 0.0], [0.0, 4.0]])}  # ||BA|| = 5
    out = aggregate_layer(current, [Contribution(1.0, small), Contribution(1.0, large)], "hetlora")
    # weights 1 and 5 over a total of 6; the rank-1 device counts as zero in row/column 1.
    torch.testing.assert_close(out["q.A"], torch.tensor([[1.0, 0.0], [0.0, 5 / 6]]))
    torch.testing.assert_close(out["q.B"], torch.tensor([[16 / 6, 0.0], [0.0, 20 / 6]]))
    # Sample weights multiply the norms: 5 * 1 and 1 * 5 weigh the devices equally.
    out = aggregate_layer(current, [Contribution(5.0, small), Contribution(1.0, large)], "hetlora")
    torch.testing.assert_close(out["q.A"], torch.tensor([[1.0, 0.0], [0.0, 0.5]]))


def test_hetlora_falls_back_to_plain_weights_when_every_product_is_zero():
    current = {"q.A": torch.zeros(1, 2), "q.B": torch.zeros(2, 1)}
    first = {"q.A": torch.tensor([[4.0, 0.0]]), "q.B": torch.zeros(2, 1)}
    second = {"q.A": torch.tensor([[0.0, 4.0]]), "q.B": torch.zeros(2, 1)}
    out = aggregate_layer(current, [Contribution(1.0, first), Contribution(3.0, second)], "hetlora")
    torch.testing.assert_close(out["q.A"], torch.tensor([[1.0, 3.0]]))


def test_modules_a_device_did_not_send_keep_their_value(gen):
    current = {**factors(gen, 4, "q"), **factors(gen, 4, "v")}
    sent = factors(gen, 4, "q")
    for method in ("fedavg", "pad", "hetlora", "flexlora"):
        out = aggregate_layer(current, [Contribution(1.0, sent)], method)
        torch.testing.assert_close(out["v.A"], current["v.A"])
        torch.testing.assert_close(out["v.B"], current["v.B"])
        assert not torch.allclose(out["q.B"] @ out["q.A"], current["q.B"] @ current["q.A"])


@pytest.mark.parametrize("method", ["fedavg", "pad", "hetlora", "flexlora"])
def test_inputs_are_not_mutated_and_results_share_no_storage(gen, method):
    current = {**factors(gen, 4, "q"), **factors(gen, 4, "v")}
    contribs = [Contribution(1.0, factors(gen, 4, "q")), Contribution(2.0, factors(gen, 4, "q"))]
    before = copy.deepcopy((current, contribs))
    out = aggregate_layer(current, contribs, method)
    torch.testing.assert_close((current, [c.factors for c in contribs]),
                               (before[0], [c.factors for c in before[1]]))
    for tensor in out.values():
        tensor.add_(1.0)
    torch.testing.assert_close(current, before[0])


def test_results_are_float32_whatever_the_input_precision(gen):
    sent = {name: t.to(torch.bfloat16) for name, t in factors(gen, 4).items()}
    for method in ("fedavg", "flexlora"):
        out = aggregate_layer(factors(gen, 4), [Contribution(1.0, sent)], method)
        assert {t.dtype for t in out.values()} == {torch.float32}


def test_padded_global_product_matches_a_peft_client_with_rank_scaled_alpha(gen):
    """dW = s * B @ A on the server equals peft's delta weight when alpha_l = s * r_l."""
    s, R, r = 2.0, 4, 2
    sent = factors(gen, r)
    state = aggregate_layer({"q.A": torch.zeros(R, IN), "q.B": torch.zeros(OUT, R)},
                            [Contribution(1.0, sent)], "pad")
    server_dW = s * state["q.B"] @ state["q.A"]
    for client_rank in (r, R):  # the rank-r device's slice, and the whole padded state
        config = LoraConfig(r=client_rank, lora_alpha=s * client_rank, target_modules=["0"])
        model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(IN, OUT)), config)
        layer = model.base_model.model[0]
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(state["q.A"][:client_rank])
            layer.lora_B["default"].weight.copy_(state["q.B"][:, :client_rank])
        torch.testing.assert_close(layer.get_delta_weight("default"), server_dW)
    # A fixed alpha (not scaled with the rank) silently changes the update size.
    assert LoraConfig(r=r, lora_alpha=s * R).lora_alpha / r != s


def test_aggregate_touches_only_the_layers_that_were_trained(gen):
    current = {0: factors(gen, 4), 1: factors(gen, 4)}
    out = aggregate(current, {1: [Contribution(1.0, factors(gen, 4))]}, "pad")
    torch.testing.assert_close(out[0], current[0])
    assert out[0]["q.A"].data_ptr() != current[0]["q.A"].data_ptr()
    assert not torch.allclose(out[1]["q.A"], current[1]["q.A"])


def test_aggregate_rejects_unknown_layers_and_methods(gen):
    current = {0: factors(gen, 4)}
    with pytest.raises(ValueError, match=r"\[3\]"):
        aggregate(current, {3: [Contribution(1.0, factors(gen, 4))]})
    with pytest.raises(TestbedError, match="'fedprox'"):
        aggregate(current, {}, "fedprox")


def test_average_head_is_the_weighted_mean_and_ignores_zero_weights():
    heads = [(1.0, {"w": full(2, 3), "b": full(0, 1)}),
             (3.0, {"w": full(6, 3), "b": full(4, 1)}),
             (0.0, {"w": full(1e6, 3), "b": full(1e6, 1)})]
    out = average_head(heads)
    torch.testing.assert_close(out, {"w": full(5, 3), "b": full(3, 1)})
