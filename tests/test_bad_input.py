"""Bad input raises an exception that names the problem, and the program stays usable."""

import pytest
import torch

import executorch_wgpu.backend.serialization.blob as blob_module
from executorch_wgpu.backend.serialization.blob import deserialize_q4linear, serialize_q4linear
from executorch_wgpu.errors import (
    BlobFormatError,
    BlobVersionError,
    InputError,
    NoAdapterError,
    ProgramFormatError,
)
from executorch_wgpu.runtime import Runtime
import executorch_wgpu.runtime_py.gpu as gpu_module
from executorch_wgpu.tools.reference import golden_linear, rel_err


# The program under test: conftest's q4 Linear(128, 24) on [1, M, 128] inputs, M in [1, 16].
@pytest.fixture(scope="module")
def model(linear_program):
    return linear_program.model


@pytest.fixture(scope="module")
def pte(linear_program):
    return linear_program.pte


@pytest.fixture(scope="module")
def blob(pte, blob_span):
    start, length = blob_span(pte)
    return pte[start:start + length]


def test_truncated_pte_is_refused(pte):
    for cut in (0, 7, 64, len(pte) // 2, len(pte) - 1):
        with pytest.raises((ProgramFormatError, BlobFormatError)):
            Runtime.get().load_program(pte[:cut]).load_method("forward")


def test_non_pte_bytes_are_refused():
    with pytest.raises(ProgramFormatError, match="not an ExecuTorch .pte"):
        Runtime.get().load_program(b"\x00" * 64)


def test_corrupted_weights_inside_pte_fail_the_checksum(pte, blob_span):
    start, _ = blob_span(pte)
    data = bytearray(pte)
    data[start + 512] ^= 0xFF   # inside the packed weights (128 * 24 / 2 bytes)
    with pytest.raises(BlobFormatError, match="checksum"):
        Runtime.get().load_program(bytes(data)).load_method("forward")


def test_blob_with_unknown_version_is_refused(blob, monkeypatch):
    rec = deserialize_q4linear(blob)
    monkeypatch.setattr(blob_module, "SCHEMA_VERSION", 99)
    newer = serialize_q4linear(rec)
    monkeypatch.undo()
    with pytest.raises(BlobVersionError, match="version 99"):
        deserialize_q4linear(newer)


def test_truncated_or_foreign_blob_is_refused(blob):
    with pytest.raises(BlobFormatError, match="magic"):
        deserialize_q4linear(b"\x10\x00\x00\x00XXXX" + blob[8:])
    for cut in (3, 12, len(blob) // 3, len(blob) - 8):
        with pytest.raises(BlobFormatError):
            deserialize_q4linear(blob[:cut])


def test_bit_flips_in_blob_never_load_silently_wrong(blob):
    rec = deserialize_q4linear(blob)
    for pos in range(8, len(blob), max(1, len(blob) // 97)):
        data = bytearray(blob)
        data[pos] ^= 0x5A
        try:
            got = deserialize_q4linear(bytes(data))
        except BlobFormatError:
            continue
        # A flip that still loads may only touch bytes no field reads (padding, vtable slack, the name/reason text).
        assert (got.in_features, got.out_features, got.group_size) == (rec.in_features, rec.out_features, rec.group_size)
        assert (got.qweight == rec.qweight).all() and (got.scales == rec.scales).all()


@pytest.fixture
def method(pte):
    return Runtime.get().load_program(pte).load_method("forward")


BAD_INPUTS = {
    "no inputs": ([], "takes 1 inputs, got 0"),
    "two inputs": ([torch.randn(1, 4, 128), torch.randn(1, 4, 128)], "takes 1 inputs, got 2"),
    "a bare tensor": (torch.randn(1, 4, 128), r"takes a list of 1 inputs, got a Tensor \(pass \[x\]\)"),
    "not a tensor": ([[0.5] * 128], "input 0 must be a torch.Tensor, got list"),
    "fp16": ([torch.randn(1, 4, 128, dtype=torch.float16)], "dtype torch.float16, expected torch.float32"),
    "bf16": ([torch.randn(1, 4, 128, dtype=torch.bfloat16)], "dtype torch.bfloat16, expected torch.float32"),
    "fp64": ([torch.randn(1, 4, 128, dtype=torch.float64)], "dtype torch.float64, expected torch.float32"),
    "int64": ([torch.ones(1, 4, 128, dtype=torch.int64)], "dtype torch.int64, expected torch.float32"),
    "bool": ([torch.ones(1, 4, 128, dtype=torch.bool)], "dtype torch.bool, expected torch.float32"),
    "rank 2": ([torch.randn(4, 128)], "rank 2 .*expected rank 3"),
    "rank 4": ([torch.randn(1, 1, 4, 128)], "rank 4 .*expected rank 3"),
    "rank 0": ([torch.tensor(1.0)], "rank 0 .*expected rank 3"),
    "K too small": ([torch.randn(1, 4, 100)], "does not end in K=128"),
    "K too large": ([torch.randn(1, 4, 256)], "dim 2 is 256, above the exported upper bound 128"),
    "K = 0": ([torch.randn(1, 4, 0)], "does not end in K=128"),
    "M = 0": ([torch.randn(1, 0, 128)], r"M=0 .*outside the exported range \[1, 16\]"),
    "M above the bound": ([torch.randn(1, 17, 128)], "dim 1 is 17, above the exported upper bound 16"),
    "M far above the bound": ([torch.randn(1, 4096, 128)], "dim 1 is 4096, above the exported upper bound 16"),
    "batch above the bound": ([torch.randn(2, 4, 128)], "dim 0 is 2, above the exported upper bound 1"),
    "sparse": ([torch.randn(1, 4, 128).to_sparse()], "torch.sparse_coo tensor on cpu; the runtime takes dense"),
    "meta": ([torch.empty(1, 4, 128, device="meta")], "tensor on meta; the runtime takes dense"),
}


@pytest.mark.parametrize("inputs,message", list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_bad_inputs_raise_and_the_method_stays_usable(method, model, inputs, message):
    x = torch.randn(1, 3, 128)
    (before,) = method.execute([x])
    with pytest.raises(InputError, match=message):
        method.execute(inputs)
    (y,) = method.execute([x])
    assert rel_err(y, golden_linear(x, model[0])) < 1e-4
    assert torch.equal(y, before)   # the failed call left nothing behind


def test_every_bad_input_in_a_row_then_a_good_call_gives_the_golden(method, model):
    for inputs, message in BAD_INPUTS.values():
        with pytest.raises(InputError, match=message):
            method.execute(inputs)
    for m in (1, 5, 16):   # gemv and skinny, the buffers of the largest M
        x = torch.randn(1, m, 128)
        (y,) = method.execute([x])
        assert rel_err(y, golden_linear(x, model[0])) < 1e-4


# Non-contiguous inputs are handled, not refused: the runtime calls .contiguous()
# on every input, so a strided view computes exactly what its contiguous copy does.
STRIDED = {
    "transposed": lambda: torch.randn(1, 128, 5).transpose(1, 2),
    "sliced rows": lambda: torch.randn(1, 12, 128)[:, ::3, :],
    "sliced columns": lambda: torch.randn(1, 4, 256)[:, :, 64:192],
    "expanded (stride 0)": lambda: torch.randn(1, 1, 128).expand(1, 6, 128),
    "channels-last-like permute": lambda: torch.randn(128, 1, 7).permute(1, 2, 0),
    "M = 1, stride 2": lambda: torch.randn(1, 1, 256)[:, :, ::2],
    "M = 1 row at a storage offset": lambda: torch.randn(1, 3, 128)[:, 1:2, :],
}


@pytest.mark.parametrize("make", list(STRIDED.values()), ids=list(STRIDED))
def test_strided_inputs_give_the_golden(method, model, make):
    x = make()
    assert not x.is_contiguous() or x.storage_offset() > 0
    (y,) = method.execute([x])
    assert rel_err(y, golden_linear(x, model[0])) < 1e-4
    (y_contiguous,) = method.execute([x.contiguous()])
    assert torch.equal(y, y_contiguous)


@pytest.fixture(scope="module", params=["default", "regtiled", "shmem"])
def routed_method(request, model, pte, lower):
    """The method with the default routes (gemv / skinny) and with each other prefill kernel forced (linears-only,
    as linear_program)."""
    if request.param == "default":
        pte_bytes = pte
    else:
        pte_bytes = lower(model, torch.randn(1, 6, 128), {1: (1, 16)}, prefill_route=request.param, linears_only=True)
    return Runtime.get().load_program(pte_bytes).load_method("forward")


@pytest.mark.parametrize("m", [1, 5])
def test_nan_and_inf_propagate_as_in_torch_and_leave_no_trace(routed_method, model, m):
    method = routed_method
    x = torch.randn(1, m, 128, generator=torch.Generator().manual_seed(m))
    (clean,) = method.execute([x])
    row = m // 2
    for bad in (float("nan"), float("inf"), float("-inf")):
        xb = x.clone()
        xb[0, row, 17] = bad
        (y,) = method.execute([xb])
        golden = golden_linear(xb, model[0])   # fp64: inf * 0 = nan, inf * w = +-inf
        assert torch.equal(torch.isnan(y), torch.isnan(golden)), (bad, method.route_report())
        assert torch.equal(torch.isposinf(y), torch.isposinf(golden)) and torch.equal(torch.isneginf(y), torch.isneginf(golden))
        if bad != bad:   # NaN: the whole row
            assert torch.isnan(y[0, row]).all()
        others = [r for r in range(m) if r != row]
        assert torch.equal(y[0, others], clean[0, others])   # other rows untouched
        (after,) = method.execute([x])   # the next good call gives the golden, bit for bit
        assert torch.equal(after, clean)
    assert rel_err(clean, golden_linear(x, model[0])) < 1e-4


def test_no_adapter_gives_one_clear_error(monkeypatch):
    monkeypatch.setattr(gpu_module, "_context", None)
    monkeypatch.setattr(gpu_module.wgpu.gpu, "request_adapter_sync", lambda **kw: None)
    with pytest.raises(NoAdapterError, match="mesa-vulkan-drivers"):
        gpu_module.gpu_context()

    def refuse(**kw):
        raise RuntimeError("No adapter found")

    monkeypatch.setattr(gpu_module.wgpu.gpu, "request_adapter_sync", refuse)
    with pytest.raises(NoAdapterError, match="No adapter found"):
        gpu_module.gpu_context()


def test_unknown_method_name_is_refused(pte):
    with pytest.raises(KeyError, match="no method 'decode'"):
        Runtime.get().load_program(pte).load_method("decode")
