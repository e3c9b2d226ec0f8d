"""dpokit.models.all_finite: the one-pass finiteness check of weights against torch.isfinite."""

import pytest
import torch
from torch import nn

from dpokit.models import all_finite, nonfinite_parameter


def _oracle(tensor):
    return bool(torch.isfinite(tensor.double() if tensor.is_floating_point() else tensor).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), None, "both infs"])
@pytest.mark.parametrize("where", [0, 777, -1])
def test_all_finite_agrees_with_isfinite(dtype, bad, where):
    tensor = torch.randn(4097, generator=torch.Generator().manual_seed(3)).to(dtype)
    if bad == "both infs":  # +inf and -inf: their sum is NaN, still caught
        tensor[where], tensor[where - 1] = float("inf"), float("-inf")
    elif bad is not None:
        tensor[where] = bad
    assert all_finite(tensor) is _oracle(tensor)
    assert all_finite(tensor.view(17, 241)[:, ::2]) is _oracle(tensor.view(17, 241)[:, ::2])


@pytest.mark.parametrize("dtype,value,count", [
    (torch.float32, 3e38, 8),        # finite numbers whose float32 sum overflows to inf
    (torch.float32, -3e38, 8),
    (torch.float16, 60000.0, 4),     # a float16 sum would overflow: accumulated in float32
    (torch.float16, 1.0, 100_000),
    (torch.bfloat16, 3e38, 8),
])
def test_a_sum_that_overflows_is_not_taken_for_a_non_finite_weight(dtype, value, count):
    tensor = torch.full((count,), value, dtype=dtype)
    assert _oracle(tensor) and all_finite(tensor)
    tensor[count // 2] = float("nan")
    assert not all_finite(tensor)


def test_other_tensors():
    assert all_finite(torch.zeros(0))
    assert all_finite(torch.arange(10))  # integers are finite
    assert all_finite(torch.tensor([1 + 2j]))
    assert not all_finite(torch.tensor([complex(float("nan"), 0.0)]))


def test_nonfinite_parameter_names_the_first_bad_weight():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    assert nonfinite_parameter(model) is None
    with torch.no_grad():
        model[1].bias[2] = float("inf")
        assert nonfinite_parameter(model) == "1.bias"
        model[0].weight[0, 0] = float("nan")
    assert nonfinite_parameter(model) == "0.weight"
