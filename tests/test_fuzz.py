"""Fuzzed loaders: mutated delegate blobs and .pte files end in a documented error or a correct load.

Mutations: truncation, bit flips, byte overwrites, insertions and deletions,
swapped and duplicated regions, and structural edits aimed (through
fbverify's walk of the valid buffer) at flatbuffer vtables, offsets, vector
and string counts, scalar fields, the schema version and file identifier, and
the .pte's extended header -- with values such as 2**31 elements or offsets
just past the end.

Every case must end in one of the documented exceptions or in a correct load:
a blob that still loads has the original payload and shape and computes what
the original computes; a .pte that still loads either raises a documented
error when executed or returns outputs of the shape the program declares
(bit-identical to the original's when the parsed program is unchanged).
No crash (any other exception fails), no hang (each case has a wall-clock
limit), no unbounded allocation (peak RSS may grow only by a bounded amount).

CI runs a sample (~450 cases, fixed seed); the long run draws fresh cases:

    EXECUTORCH_WGPU_FUZZ_CASES=10000 XDG_RUNTIME_DIR=/tmp .venv/bin/python -m pytest -q tests/test_fuzz.py
"""

from __future__ import annotations

import contextlib
import resource
import signal
import time

import numpy as np
import pytest
import torch
from hypothesis import given

import executorch_wgpu.backend.serialization.blob as blob_module
from executorch_wgpu.backend.serialization.blob import Q4LinearRecord, deserialize_q4linear, serialize_q4linear
from executorch_wgpu.errors import (
    BlobFormatError,
    InputError,
    OperatorError,
    ProgramFormatError,
    UnsupportedOperatorError,
)
from executorch_wgpu.runtime import Runtime
from executorch_wgpu.runtime_py.delegate import WebGPUDelegate
from executorch_wgpu.runtime_py.pte_checks import parse_pte, program_schema

# The mutation strategy, case counts and hypothesis settings are conftest's `fuzz` toolkit
# (test_native_fuzz runs the same corpus through the native delegate).
CASE_SECONDS = 30          # hard wall-clock limit of one case (a hang fails the test, it does not stall CI)
RSS_GROWTH_LIMIT = 512 << 20   # peak RSS may grow this much over a whole fuzz test


class CaseTimeout(BaseException):
    """Raised from SIGALRM; a BaseException so no `except Exception` in the code under test swallows it."""


@contextlib.contextmanager
def time_limit(seconds: float):
    def on_alarm(signum, frame):
        raise CaseTimeout(f"case ran longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- delegate blobs --

BLOB_X = {m: torch.randn(m, 64, generator=torch.Generator().manual_seed(m)) for m in (1, 5)}


@pytest.fixture(scope="module")
def blob_cases(fuzz):
    cases = {}
    for bias in (True, False):
        rec = fuzz.record(bias)
        blob = serialize_q4linear(rec)
        delegate = WebGPUDelegate(blob)
        golden = {m: delegate.execute([x], [])[0] for m, x in BLOB_X.items()}
        sites = fuzz.structure(blob_module._blob_schema(), blob)
        cases[bias] = (rec, blob, golden, sites, fuzz.BLOB_HEADER_SITES)
    return cases


def check_blob_case(stats, test: str, rec: Q4LinearRecord, golden: dict, data: bytes) -> None:
    stats.count(test, "cases")
    try:
        with time_limit(CASE_SECONDS):
            got = deserialize_q4linear(data)
    except BlobFormatError as e:   # BlobVersionError is one
        stats.count(test, "refused", type(e).__name__)
        return
    stats.count(test, "loaded")
    # The CRC covers the payload; the shape rules tie K, gs and n_stride to its sizes.
    assert np.array_equal(got.qweight, rec.qweight) and np.array_equal(got.scales, rec.scales)
    assert (got.bias is None) == (rec.bias is None)
    if rec.bias is not None:
        assert np.array_equal(got.bias, rec.bias)
    assert (got.in_features, got.group_size, got.n_stride) == (rec.in_features, rec.group_size, rec.n_stride)
    if got.out_features != rec.out_features:
        # Without a bias, N is tied to the payload only through n_stride: a corrupted N within the
        # same 16-column block loads (the .pte loader then refuses it against the program's shapes).
        assert rec.bias is None
        stats.count(test, "N changed within n_stride (no bias)")
    with time_limit(CASE_SECONDS):
        delegate = WebGPUDelegate(data)
        for m, x in BLOB_X.items():
            try:
                (y,) = delegate.execute([x], [])
            except InputError:   # a corrupted M range refuses a valid M: documented, not wrong
                stats.count(test, "InputError at run")
                continue
            n = min(got.out_features, rec.out_features)
            assert y.shape == (m, got.out_features)
            # Another route (kernel) may sum in another order: equal up to fp32 rounding.
            assert torch.allclose(y[:, :n], golden[m][:, :n], rtol=1e-5, atol=1e-5)
            assert (y[:, n:] == 0).all()   # columns beyond the original N are zero padding


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_mutated_blobs_are_refused_or_load_correctly(blob_cases, bias, fuzz, fuzz_stats):
    rec, blob, golden, sites, fixed = blob_cases[bias]
    test = f"blob[{'bias' if bias else 'no_bias'}]"
    rss0 = peak_rss()

    @fuzz.settings(fuzz.cases(120, 0.25), deadline_ms=2000)
    @given(fuzz.mutated(blob, sites, fixed))
    def run(data):
        check_blob_case(fuzz_stats, test, rec, golden, data)

    run()
    assert peak_rss() - rss0 < RSS_GROWTH_LIMIT


# -- .pte files --

@pytest.fixture(scope="module")
def pte_case(tiny_program, fuzz, blob_span):
    """conftest's TinyModel program (a q4 linear, then CPU ops with int, bool, list and null arguments),
    its output, its parsed program, and the sites to aim mutations at: the program's and the blob's fields."""
    pte = tiny_program.pte
    program_size = int.from_bytes(pte[16:24], "little")
    sites = fuzz.structure(program_schema(), pte[:program_size])
    blob_at, blob_len = blob_span(pte)
    sites += fuzz.structure(blob_module._blob_schema(), pte[blob_at:blob_at + blob_len], blob_at)
    fixed = [("identifier", 4, 4, "file_identifier"), ("eh_magic", 8, 4, "extended header magic"),
             ("eh_length", 12, 4, "extended header length"), ("eh_program_size", 16, 8, "program_size"),
             ("eh_segment_base", 24, 8, "segment_base_offset"), ("eh_segment_size", 32, 8, "segment_data_size")]
    return pte, tiny_program.y, parse_pte(pte).program, sites, fixed


PTE_LOAD_ERRORS = (ProgramFormatError, BlobFormatError, UnsupportedOperatorError)
PTE_RUN_ERRORS = (InputError, OperatorError, ProgramFormatError, UnsupportedOperatorError)


def check_pte_case(stats, test: str, original_program, x: torch.Tensor, golden: torch.Tensor, data: bytes) -> None:
    stats.count(test, "cases")
    with time_limit(CASE_SECONDS):
        try:
            program = Runtime.get().load_program(data)
            if "forward" not in program.method_names:
                with pytest.raises(KeyError, match="no method 'forward'"):
                    program.load_method("forward")
                stats.count(test, "refused", "KeyError (method renamed)")
                return
            method = program.load_method("forward")
        except PTE_LOAD_ERRORS as e:
            stats.count(test, "refused", type(e).__name__)
            return
        stats.count(test, "loaded")
        try:
            outputs = method.execute([x.clone()])
        except PTE_RUN_ERRORS as e:
            stats.count(test, "refused at run", type(e).__name__)
            return
    stats.count(test, "ran")
    parsed = parse_pte(data).program
    plan = next(p for p in parsed.execution_plan if p.name == "forward")
    assert len(outputs) == len(plan.outputs)
    for out, vid in zip(outputs, plan.outputs):
        spec = plan.values[vid].val
        if hasattr(spec, "sizes"):
            assert isinstance(out, torch.Tensor) and out.dim() == len(spec.sizes)
            assert all(0 <= got <= bound for got, bound in zip(out.shape, spec.sizes))
    if parsed == original_program:
        stats.count(test, "unchanged program")
        assert len(outputs) == 1 and torch.equal(outputs[0], golden)
    elif len(outputs) == 1 and isinstance(outputs[0], torch.Tensor) and outputs[0].shape == golden.shape:
        stats.count(test, "changed program, golden's shape")
    else:
        stats.count(test, "changed program, other declared shape")


def test_mutated_pte_files_are_refused_or_run_correctly(pte_case, tiny_program, fuzz, fuzz_stats):
    pte, golden, program, sites, fixed = pte_case
    rss0 = peak_rss()

    @fuzz.settings(fuzz.cases(240, 0.5), deadline_ms=5000)
    @given(fuzz.mutated(pte, sites, fixed))
    def run(data):
        check_pte_case(fuzz_stats, "pte", program, tiny_program.x, golden, data)

    run()
    assert peak_rss() - rss0 < RSS_GROWTH_LIMIT


# -- the bounds the fuzzing relies on, one by one --

def put(data: bytes, at: int, value: int, size: int = 4) -> bytes:
    out = bytearray(data)
    out[at:at + size] = value.to_bytes(size, "little")
    return bytes(out)


def test_huge_counts_and_offsets_in_a_blob_are_refused_before_use(blob_cases):
    rec, blob, golden, sites, fixed = blob_cases[True]
    lengths = [s for s in sites if s[0] == "length"]
    assert any(s[3].endswith("qweight") for s in lengths)
    for kind, at, size, path in lengths + [s for s in sites if s[0] in ("uoffset", "soffset")]:
        for value in (1 << 31, (1 << 32) - 1, len(blob)):
            mutated_blob = put(blob, at, value, size)
            start = time.perf_counter()
            with pytest.raises(BlobFormatError):
                deserialize_q4linear(mutated_blob)
            assert time.perf_counter() - start < 0.5, (path, value)


def test_huge_counts_and_offsets_in_a_pte_are_refused_before_use(pte_case):
    pte, golden, program, sites, fixed = pte_case
    lengths = [s for s in sites if s[0] == "length"]
    assert any("values" in s[3] for s in lengths) and any("storage" in s[3] or "data" in s[3] for s in lengths)
    for kind, at, size, path in lengths:
        for value in (1 << 31, (1 << 32) - 1):
            with pytest.raises((ProgramFormatError, BlobFormatError)):
                Runtime.get().load_program(put(pte, at, value, size)).load_method("forward")


def shared_table_bomb(slots: int, sizes: int) -> bytes:
    """A .pte whose plan lists `slots` values that all point at one tensor with `sizes` dims.

    The file is ~4 * (slots + sizes) bytes; unpacked naively it is slots * sizes
    Python ints (here 20,000 x 20,000 = 4e8: many GB). Legal flatbuffers
    syntax -- offsets may share -- but no ExecuTorch writer shares.
    """
    import flatbuffers
    from executorch.exir._serialize.generated.executorch_flatbuffer import (
        EValue, ExecutionPlan, KernelTypes, Program, Tensor,
    )

    b = flatbuffers.Builder(0)
    Tensor.StartSizesVector(b, sizes)
    for _ in range(sizes):
        b.PrependInt32(1)
    sizes_vec = b.EndVector()
    Tensor.Start(b)
    Tensor.AddScalarType(b, 6)
    Tensor.AddSizes(b, sizes_vec)
    tensor = Tensor.End(b)
    EValue.Start(b)
    EValue.AddValType(b, KernelTypes.KernelTypes.Tensor)
    EValue.AddVal(b, tensor)
    value = EValue.End(b)
    ExecutionPlan.StartValuesVector(b, slots)
    for _ in range(slots):
        b.PrependUOffsetTRelative(value)
    values = b.EndVector()
    name = b.CreateString("forward")
    ExecutionPlan.Start(b)
    ExecutionPlan.AddName(b, name)
    ExecutionPlan.AddValues(b, values)
    plan = ExecutionPlan.End(b)
    Program.StartExecutionPlanVector(b, 1)
    b.PrependUOffsetTRelative(plan)
    plans = b.EndVector()
    Program.Start(b)
    Program.AddExecutionPlan(b, plans)
    b.Finish(Program.End(b), file_identifier=b"ET12")
    return bytes(b.Output())


def test_offsets_that_share_one_region_are_refused_before_unpacking():
    # Sharing within the file's size is bounded work and passes the verifier (this
    # skeleton program then fails the later checks: it lacks most of a plan).
    with pytest.raises(ProgramFormatError) as refused:
        Runtime.get().load_program(shared_table_bomb(slots=3, sizes=2))
    assert "share or overlap" not in str(refused.value)
    bomb = shared_table_bomb(slots=20_000, sizes=20_000)
    assert len(bomb) < 200_000
    rss0, start = peak_rss(), time.perf_counter()
    with pytest.raises(ProgramFormatError, match="share or overlap"):
        Runtime.get().load_program(bomb)
    assert time.perf_counter() - start < 5 and peak_rss() - rss0 < 64 << 20


def test_extended_header_and_identifier_fields_are_checked(pte_case):
    pte, golden, program, sites, fixed = pte_case
    for at, size, value, message in [
        (4, 4, int.from_bytes(b"ET13", "little"), "identifier b'ET13'"),
        (16, 8, len(pte) + 1, "program is"),
        (16, 8, 1 << 63, "program is"),
        (24, 8, len(pte) + 8, "segments at offset"),
        (32, 8, 1 << 40, "truncated"),
    ]:
        with pytest.raises(ProgramFormatError, match=message):
            Runtime.get().load_program(put(pte, at, value, size))


def test_planned_tensor_larger_than_its_memory_is_refused(pte_case):
    """A tensor whose sizes claim 2**31 elements is refused before anything is allocated for it."""
    pte, golden, program, sites, fixed = pte_case
    size_vectors = [s for s in sites if s[0] == "length" and s[3].endswith(".sizes")]
    assert size_vectors
    _, at, _, _ = size_vectors[0]
    # the first element of the first tensor's sizes vector
    data = put(pte, at + 4, (1 << 31) - 1)
    with pytest.raises(ProgramFormatError, match="overflows planned memory|needs"):
        Runtime.get().load_program(data).load_method("forward")


def test_a_blob_whose_n_was_corrupted_is_refused_against_the_program(single_linear, lower, blob_span, fuzz):
    """Without a bias the CRC does not tie N to the payload (see blob.py): the .pte loader's shape check does."""
    pte = lower(single_linear(128, 24, bias=False), torch.randn(1, 6, 128), {1: (1, 16)}, linears_only=True)
    blob_at, blob_len = blob_span(pte)
    (site,) = [s for s in fuzz.structure(blob_module._blob_schema(), pte[blob_at:blob_at + blob_len], blob_at)
               if s[0] == "scalar" and s[3] == "Q4Linear.out_features"]
    for n in (20, 25, 32):   # same n_stride (32): the blob alone still loads
        data = put(pte, site[1], n, site[2])
        assert deserialize_q4linear(data[blob_at:]).out_features == n
        with pytest.raises(ProgramFormatError, match=f"does not end in {n}"):
            Runtime.get().load_program(data).load_method("forward")
