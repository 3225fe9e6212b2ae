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
import executorch_wgpu.runtime.gpu as gpu_module

from helpers import golden_linear, lower, rel_err, single_linear


@pytest.fixture(scope="module")
def model():
    return single_linear(128, 24)


@pytest.fixture(scope="module")
def pte(model):
    return lower(model, torch.randn(1, 6, 128), {1: (1, 16)})


@pytest.fixture(scope="module")
def blob(pte):
    start = pte.index(blob_module.FILE_IDENTIFIER) - 4
    rec = deserialize_q4linear(pte[start:])   # flatbuffers ignore trailing bytes; re-serialize to get it exactly
    return serialize_q4linear(rec)


def test_truncated_pte_is_refused(pte):
    for cut in (0, 7, 64, len(pte) // 2, len(pte) - 1):
        with pytest.raises((ProgramFormatError, BlobFormatError)):
            Runtime.get().load_program(pte[:cut]).load_method("forward")


def test_non_pte_bytes_are_refused():
    with pytest.raises(ProgramFormatError, match="not an ExecuTorch .pte"):
        Runtime.get().load_program(b"\x00" * 64)


def test_corrupted_weights_inside_pte_fail_the_checksum(pte):
    start = pte.index(blob_module.FILE_IDENTIFIER) - 4
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


@pytest.mark.parametrize("inputs,message", [
    ([], "takes 1 inputs, got 0"),
    ([torch.randn(1, 4, 128), torch.randn(1, 4, 128)], "takes 1 inputs, got 2"),
    ([torch.randn(1, 4, 128, dtype=torch.float16)], "dtype torch.float16"),
    ([torch.ones(1, 4, 128, dtype=torch.int64)], "dtype torch.int64"),
    ([torch.randn(4, 128)], "rank 2"),
    ([torch.randn(1, 4, 100)], "does not end in K=128"),
    ([torch.randn(1, 17, 128)], "above the exported upper bound 16"),
    ([torch.randn(2, 4, 128)], "dim 0 is 2, above the exported upper bound 1"),
])
def test_bad_inputs_raise_and_the_method_stays_usable(method, model, inputs, message):
    with pytest.raises(InputError, match=message):
        method.execute(inputs)
    x = torch.randn(1, 3, 128)
    (y,) = method.execute([x])
    assert rel_err(y, golden_linear(x, model[0])) < 1e-4


def test_zero_tokens_are_refused_by_the_delegate(method):
    with pytest.raises(InputError, match="M=0"):
        method.execute([torch.randn(1, 0, 128)])


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
