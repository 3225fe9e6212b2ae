"""Mutable buffers (a KV cache's mechanism) in our runtime, with ExecuTorch's semantics.

A buffer the graph mutates lives in the method's planned memory: each execute()
reads what the previous one left, a freshly loaded program starts from the
buffer's initial state (zeros, or the serialized value when
InitializedMutableBufferPass marked it), and outputs never change afterwards.
Both lowerings are covered: the functional one (index_put into a new tensor,
then copy_ back into the buffer) and the reinplaced one (index_put_ on the buffer).
The programs are lowered linears-only, so the buffer stays in the program (the CPU ops
update it). Graph mode, the default, moves such a buffer into its delegate (test_graph.py's
KV cache): the delegate owns it and starts it from its value at export -- the data
ExecuTorch's tag_mutated_buffer hands a delegate with it, as for any delegate that consumes
a mutable buffer -- with or without InitializedMutableBufferPass (the last test).
"""

import copy

import pytest
import torch
from executorch.exir import ExecutorchBackendConfig
from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass

from executorch_wgpu.runtime import Runtime
from executorch_wgpu.tools.models import lower_to_pte, quantize_q4


class Accumulator(torch.nn.Module):
    """Writes lin(x) into row idx of a buffer, counts its calls, returns both mixed together."""

    def __init__(self, count_start: float = 0.0):
        super().__init__()
        self.lin = torch.nn.Linear(64, 32)
        self.register_buffer("rows", torch.zeros(8, 32))
        self.register_buffer("count", torch.full((1,), count_start))

    def forward(self, x, idx):
        self.rows.index_copy_(0, idx, self.lin(x))
        self.count.add_(1)
        return self.rows.sum(0, keepdim=True) * self.count


def lower_accumulator(model, reinplace: bool, init_patterns=None) -> bytes:
    """The Accumulator lowered linears-only with the functional or the reinplaced buffer update; export gets a copy,
    so the eager model that the tests compare with stays untouched."""
    example = (torch.randn(1, 64), torch.tensor([0]))
    config = ExecutorchBackendConfig(
        run_reinplace_pass=reinplace, passes=[InitializedMutableBufferPass(init_patterns)] if init_patterns else []
    )
    return lower_to_pte(copy.deepcopy(model), example, None, backend_config=config, linears_only=True)


def fresh(pte: bytes):
    return Runtime.get().load_program(pte).load_method("forward")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return quantize_q4(Accumulator().eval())


@pytest.fixture(scope="module", params=[False, True], ids=["functional", "reinplaced"])
def pte(request, model):
    return lower_accumulator(model, reinplace=request.param)


CALLS = [(torch.randn(1, 64, generator=torch.Generator().manual_seed(i)), torch.tensor([i % 3])) for i in range(5)]


def eager_outputs(model, calls):
    m = copy.deepcopy(model)
    with torch.no_grad():
        return [m(x, idx) for x, idx in calls]


def test_state_carries_from_call_to_call_as_in_eager(model, pte):
    method = fresh(pte)
    expected = eager_outputs(model, CALLS)
    for (x, idx), want in zip(CALLS, expected):
        (y,) = method.execute([x, idx])
        assert torch.allclose(y, want, rtol=1e-4, atol=1e-4)
    assert [e["name"] for e in method.route_report()] == ["lin"]


def test_outputs_do_not_change_when_the_state_does(model, pte):
    method = fresh(pte)
    (first,) = method.execute(list(CALLS[0]))
    kept = first.clone()
    method.execute(list(CALLS[1]))
    assert torch.equal(first, kept)


def test_a_freshly_loaded_program_and_reset_state_start_from_the_initial_state(model, pte):
    used = fresh(pte)
    for x, idx in CALLS:
        used.execute([x, idx])
    (want,) = eager_outputs(model, CALLS[:1])
    (y,) = fresh(pte).execute(list(CALLS[0]))
    assert torch.allclose(y, want, rtol=1e-4, atol=1e-4)
    used.reset_state()
    (y,) = used.execute(list(CALLS[0]))
    assert torch.allclose(y, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("reinplace", [False, True], ids=["functional", "reinplaced"])
def test_an_initialized_mutable_buffer_starts_from_its_serialized_value(reinplace):
    torch.manual_seed(1)
    model = quantize_q4(Accumulator(count_start=5.0).eval())
    expected = eager_outputs(model, CALLS[:3])
    method = fresh(lower_accumulator(model, reinplace, init_patterns=["count"]))
    for (x, idx), want in zip(CALLS[:3], expected):
        (y,) = method.execute([x, idx])
        assert torch.allclose(y, want, rtol=1e-4, atol=1e-4)
    # Without the pass ExecuTorch serializes no initial value; our runtime starts such buffers at zero.
    (y,) = fresh(lower_accumulator(model, reinplace)).execute(list(CALLS[0]))
    (want,) = eager_outputs(quantize_like(model, count_start=0.0), CALLS[:1])
    assert torch.allclose(y, want, rtol=1e-4, atol=1e-4)


def quantize_like(model, count_start):
    other = copy.deepcopy(model)
    other.count.fill_(count_start)
    return other


@pytest.mark.parametrize("reinplace", [False, True], ids=["functional", "reinplaced"])
def test_a_buffer_a_graph_delegate_owns_starts_from_its_export_value_and_reset_returns_to_it(reinplace):
    torch.manual_seed(1)
    model = quantize_q4(Accumulator(count_start=5.0).eval())
    config = ExecutorchBackendConfig(run_reinplace_pass=reinplace)
    pte = lower_to_pte(copy.deepcopy(model), (torch.randn(1, 64), torch.tensor([0])), None, backend_config=config)
    method = fresh(pte)
    assert "GraphDelegate" in {type(d).__name__ for d in method._delegates}
    expected = eager_outputs(model, CALLS)
    for (x, idx), want in zip(CALLS, expected):
        (y,) = method.execute([x, idx])
        assert torch.allclose(y, want, rtol=1e-4, atol=1e-4)
    method.reset_state()
    (y,) = method.execute(list(CALLS[0]))
    assert torch.allclose(y, expected[0], rtol=1e-4, atol=1e-4)
