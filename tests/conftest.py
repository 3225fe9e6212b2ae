"""What the tests share, as fixtures: programs lowered once per run, the helpers that lower and inspect
programs, the fuzzing toolkit of test_fuzz and test_native_fuzz, and the gate of the `native` marker.

Test modules import neither each other nor this file: they ask for what is here by
fixture name. What the package's tools need too lives in the package instead:
executorch_wgpu.tools.reference (random q4gsw layers, fp64 goldens, rel_err) and
executorch_wgpu.tools.models (quantize_q4, lower_to_pte).
"""

from __future__ import annotations

import dataclasses
import os
import time
import types
import zlib
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import executorch_wgpu.backend.serialization.blob as blob_module
from executorch_wgpu import native
from executorch_wgpu.backend.serialization import fbverify
from executorch_wgpu.backend.serialization.blob import Q4LinearRecord, Route, deserialize_q4linear
from executorch_wgpu.backend.serialization.generated.wgq4.Q4Linear import Q4Linear as FbQ4Linear
from executorch_wgpu.runtime import Runtime
from executorch_wgpu.tools.models import lower_to_pte, quantize_q4
from executorch_wgpu.tools.reference import golden_linear, random_q4_layer

# ---- collection -----------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
REQUIRE_NATIVE = "EXECUTORCH_WGPU_REQUIRE_NATIVE"


class RepositoryRootAsPlainDirectory:
    """The repository root has an __init__.py -- it is the package executorch_wgpu -- so pytest would collect
    it as a test package and import that __init__.py a second time, as the checkout folder's name (`main`),
    with the folder above put on sys.path. Collected as a plain directory, the package keeps its one name.
    (A plugin object, not a hook here: this conftest's hooks only see paths under tests/.)"""

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path: Path, parent: pytest.Collector) -> Optional[pytest.Collector]:
        return pytest.Dir.from_parent(parent, path=path) if path == REPO else None


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(RepositoryRootAsPlainDirectory(), "executorch_wgpu-repository-root")
    config.addinivalue_line(
        "markers", f"native: needs the native delegate (build/native); skipped, saying why, where it is not "
                   f"built -- failed instead when {REQUIRE_NATIVE}=1")


# ---- the `native` marker --------------------------------------------------------------------------


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before any fixture of a `native` test: skip it where the library is not built, or fail it where CI
    (EXECUTORCH_WGPU_REQUIRE_NATIVE=1) built it -- a skip there would hide a broken build."""
    if item.get_closest_marker("native") is None:
        return
    reason = native.unavailable_reason()
    if reason is None:
        return
    if os.environ.get(REQUIRE_NATIVE) == "1":
        pytest.fail(f"{REQUIRE_NATIVE}=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def native_lib() -> native.NativeLibrary:
    """The native delegate, loaded into this process: ExecuTorch's own runtime then runs our blobs."""
    return native.load()


# ---- helpers, handed to the tests as fixtures -----------------------------------------------------


def helper_fixture(name: str, helper):
    """A session fixture `name` whose value is the plain function `helper`: test modules cannot import this
    file, so they ask for its helpers by fixture name (`pytest --fixtures` shows the helper's docstring)."""

    def fixture():
        return helper

    fixture.__doc__ = helper.__doc__
    return pytest.fixture(scope="session", name=name)(fixture)


def blob_fields(blob: bytes) -> dict:
    """The Python reader's record of a blob, every dataclass field, plus the header; arrays as length and CRC."""
    rec = deserialize_q4linear(blob)
    root = FbQ4Linear.GetRootAs(blob, 0)
    out = {"schema_version": root.SchemaVersion(), "checksum": root.Checksum()}
    def route_fields(route: Route) -> dict:
        return {r.name: ([list(b) for b in route.prefill_buckets] if r.name == "prefill_buckets"
                         else getattr(route, r.name)) for r in dataclasses.fields(Route)}

    for f in dataclasses.fields(Q4LinearRecord):
        value = getattr(rec, f.name)
        if isinstance(value, Route):
            value = route_fields(value)
        elif f.name == "adapter_routes":
            value = [[cls, route_fields(route)] for cls, route in value]
        elif f.name in ("qweight", "scales", "bias") and value is not None:
            value = {"length": int(value.size), "crc32": zlib.crc32(np.ascontiguousarray(value).tobytes())}
        out[f.name] = value
    assert out["checksum"] == blob_module.payload_checksum(rec.qweight, rec.scales, rec.bias)
    return out


python_blob_fields = helper_fixture("python_blob_fields", blob_fields)   # what native describe_blob must say


# ---- lowering models ------------------------------------------------------------------------------


def lower_program(model: torch.nn.Module, example: torch.Tensor, dynamic_dims: Optional[dict] = None,
                  **partitioner_options) -> bytes:
    """.pte bytes of a one-input model, exported on `example` and lowered with WebGPUPartitioner(**options).

    dynamic_dims: {dim of the input: (min, max)}, e.g. {0: (1, 64)} for M in [1, 64]; None: static shapes.
    """
    dynamic_shapes = None
    if dynamic_dims:
        dynamic_shapes = ({d: torch.export.Dim(f"d{d}", min=lo, max=hi) for d, (lo, hi) in dynamic_dims.items()},)
    return lower_to_pte(model, (example,), dynamic_shapes, **partitioner_options)


def quantized_linear(k: int, n: int, bias: bool = True, group_size: int = 32, seed: int = 0) -> torch.nn.Module:
    """Sequential(Linear(k, n)), seeded, quantized to q4gsw by torchao: a one-layer model to lower."""
    torch.manual_seed(seed)
    return quantize_q4(torch.nn.Sequential(torch.nn.Linear(k, n, bias=bias)).eval(), group_size)


lower = helper_fixture("lower", lower_program)
single_linear = helper_fixture("single_linear", quantized_linear)


# ---- inspecting programs --------------------------------------------------------------------------


def delegate_blobs(pte: bytes) -> List[bytes]:
    """Every delegate blob of a .pte, found through ExecuTorch's own deserializer."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(pte).program
    return [program.backend_delegate_data[d.processed.index].data for d in program.execution_plan[0].delegates]


def delegate_blob_span(pte: bytes) -> Tuple[int, int]:
    """(offset, length) of the first delegate blob in a .pte's bytes, to mutate or replace it in place."""
    segment_base = int.from_bytes(pte[24:32], "little")   # the extended header's segment_base_offset
    start = pte.index(blob_module.FILE_IDENTIFIER, segment_base) - 4
    # A flatbuffer ignores what follows it, and the writer is deterministic: re-serializing gives the length.
    return start, len(blob_module.serialize_q4linear(deserialize_q4linear(pte[start:])))


blobs_in = helper_fixture("blobs_in", delegate_blobs)
blob_span = helper_fixture("blob_span", delegate_blob_span)


# ---- programs several test modules share, lowered once per run -----------------------------------


class Lowered(NamedTuple):
    model: torch.nn.Module   # the eager quantized model: eager outputs and fp64 goldens come from it
    pte: bytes


@pytest.fixture(scope="session")
def small_llama_graph_pte() -> types.SimpleNamespace:
    """The small Llama (seed 0, ExecuTorch's LLM transforms, a KV cache of max_tokens) lowered in graph mode once
    per session, for the tests that run it (test_graph, test_native_graph, test_native_llama_runner; its export
    is the slow part): pte (bytes), max_tokens, declines (what the partitioner declined). Each test builds its
    own eager model with the same build_llama call: the same weights, and a cache no other test has run."""
    from executorch_wgpu.tools import models

    max_tokens = 64
    model = models.build_llama("small", seed=0, llm_ops=True)
    with models.recording_declines() as declines:
        pte = models.export_llama_pte(model, max_tokens=max_tokens, linears_only=False)
    return types.SimpleNamespace(pte=pte, max_tokens=max_tokens, declines=declines)


@pytest.fixture(scope="session")
def linear_program() -> Lowered:
    """q4 Linear(128, 24) with bias on [1, M, 128] inputs, M in [1, 16] (test_bad_input, test_resources), lowered
    linears-only: one WGQ4 delegate, whose input checks and route report those tests pin."""
    model = quantized_linear(128, 24)
    return Lowered(model, lower_program(model, torch.randn(1, 6, 128), {1: (1, 16)}, linears_only=True))


class Mixed(torch.nn.Module):
    """q4 linear -> relu -> q4 linear, then LayerNorm and arithmetic: delegated layers between CPU ops."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(64, 128)
        self.down = torch.nn.Linear(128, 32, bias=False)
        self.norm = torch.nn.LayerNorm(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.down(torch.relu(self.up(x)))) * 2 + 1

    def golden(self, x: torch.Tensor) -> torch.Tensor:
        """forward in fp64, each linear from torchao's codes and scales (reference.golden_linear)."""
        h = golden_linear(torch.relu(golden_linear(x, self.up)), self.down)
        norm = self.norm
        return torch.nn.functional.layer_norm(h, norm.normalized_shape, norm.weight.double(), norm.bias.double(),
                                              norm.eps) * 2 + 1


@pytest.fixture(scope="session")
def mixed_program() -> Lowered:
    """Mixed, quantized, on [2, seq, 64] inputs with seq in [1, 32] (test_end_to_end, test_native), lowered
    linears-only: two WGQ4 delegates with CPU ops between and after them."""
    torch.manual_seed(0)
    model = quantize_q4(Mixed().eval())
    return Lowered(model, lower_program(model, torch.randn(2, 11, 64), {1: (1, 32)}, linears_only=True))


class TinyModel(torch.nn.Module):
    """A q4 linear (delegated) and CPU ops with int, bool, list and null arguments."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(128, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.fc(x))
        return y + y.sum(dim=-1, keepdim=True)


class FuzzedProgram(NamedTuple):
    model: torch.nn.Module
    pte: bytes
    x: torch.Tensor   # the input every mutated case runs on
    y: torch.Tensor   # what the unmutated program returns for x (checked against eager torch)


@pytest.fixture(scope="session")
def tiny_program() -> FuzzedProgram:
    """TinyModel on [1, seq, 128] inputs, seq in [1, 16]: the .pte that test_fuzz and test_native_fuzz mutate,
    lowered linears-only (a WGQ4 blob, and CPU ops whose arguments the mutations reach).

    docs/upstream/ keeps reproducers that are this program with one mutation.
    """
    torch.manual_seed(0)
    model = quantize_q4(TinyModel().eval())
    pte = lower_program(model, torch.randn(1, 6, 128), {1: (1, 16)}, linears_only=True)
    x = torch.randn(1, 3, 128, generator=torch.Generator().manual_seed(7))
    (y,) = Runtime.get().load_program(pte).load_method("forward").execute([x])
    with torch.no_grad():
        assert torch.allclose(y, model(x), atol=1e-4)
    return FuzzedProgram(model, pte, x, y)


# ---- fuzzing (test_fuzz, test_native_fuzz) --------------------------------------------------------

# CI runs each fuzz test's fixed sample; EXECUTORCH_WGPU_FUZZ_CASES=N draws N fresh cases over all of them.
FUZZ_LONG_RUN = int(os.environ.get("EXECUTORCH_WGPU_FUZZ_CASES", "0") or 0)
# Sites outside a blob's flatbuffer structure that mutations aim at too: (kind, offset, size, what).
BLOB_HEADER_SITES = [("identifier", 4, 4, "file_identifier")]


def fuzz_cases(ci: int, share: float) -> int:
    """CI: the fixed sample; long run: this test's share of EXECUTORCH_WGPU_FUZZ_CASES."""
    return max(ci, int(FUZZ_LONG_RUN * share)) if FUZZ_LONG_RUN else ci


def fuzz_settings(cases: int, deadline_ms: Optional[int]) -> settings:
    return settings(
        max_examples=cases,
        deadline=deadline_ms,           # hypothesis' per-case time bound (a slow case fails)
        derandomize=not FUZZ_LONG_RUN,  # CI: the same cases every run
        database=None,
        print_blob=True,
        suppress_health_check=list(HealthCheck),
    )


def fuzzed_record(bias: bool) -> Q4LinearRecord:
    """The 64 x 20 layer whose blob the fuzz tests mutate, with or without a bias."""
    return random_q4_layer(64, 20, 32, bias=bias, seed=3).record("fuzz.fc", m_max=64)


def structure(schema: fbverify.Schema, buf: bytes, base: int = 0) -> list:
    """(kind, offset, size, path) of every structural field of a valid flatbuffer, offsets shifted by base."""
    sites: list = []
    fbverify.verify(schema, buf, note=lambda kind, pos, size, path: sites.append((kind, base + pos, size, path)))
    return sites


def interesting(size: int, original: int, length: int) -> list:
    """Values worth writing into a field of `size` bytes: edges, the buffer's length, near the original."""
    top = (1 << (8 * size)) - 1
    values = {0, 1, 2, 3, 4, 7, 8, 0x7F, 0x80, 0xFF, top, top >> 1, (top >> 1) + 1, length - 1, length, length + 1,
              length * 2, original + 1, original - 1, original + 4, original - 4, original * 2, original + 0x100}
    if size >= 4:
        values |= {1 << 16, (1 << 31) - 1, 1 << 31, (1 << 32) - 1}
    if size >= 8:
        values |= {1 << 32, 1 << 40, 1 << 63}
    return sorted(v for v in values if 0 <= v <= top)


@st.composite
def mutated(draw, base: bytes, sites: list, fixed: list) -> bytes:
    """base with 1-3 mutations; fixed: extra (kind, offset, size, path) sites such as headers."""
    data = bytearray(base)
    all_sites = sites + fixed
    for _ in range(draw(st.sampled_from([1, 1, 1, 1, 2, 2, 3]), label="mutations")):
        n = len(data)
        op = draw(st.sampled_from(
            ["truncate", "flip", "overwrite", "structural", "structural", "structural", "scalar", "swap",
             "duplicate", "insert", "delete"]), label="op")
        if n == 0:
            break
        if op == "truncate":
            del data[draw(st.integers(0, n - 1), label="cut"):]
        elif op == "flip":
            for _ in range(draw(st.integers(1, 8), label="flips")):
                data[draw(st.integers(0, n - 1), label="at")] ^= 1 << draw(st.integers(0, 7), label="bit")
        elif op == "overwrite":
            at = draw(st.integers(0, n - 1), label="at")
            data[at:at + 16] = draw(st.binary(min_size=1, max_size=16), label="bytes")[: n - at]
        elif op in ("structural", "scalar"):
            pool = [s for s in all_sites if s[0] == "scalar"] if op == "scalar" else all_sites
            kind, at, size, path = draw(st.sampled_from(pool), label="site")
            if at + size > n:
                continue
            original = int.from_bytes(data[at:at + size], "little")
            value = draw(st.one_of(st.sampled_from(interesting(size, original, n)),
                                   st.integers(0, (1 << (8 * size)) - 1)), label=f"value for {kind} {path}")
            data[at:at + size] = value.to_bytes(size, "little")
        elif op in ("swap", "duplicate"):
            length = draw(st.integers(1, min(64, n)), label="length")
            a = draw(st.integers(0, n - length), label="a")
            b = draw(st.integers(0, n - length), label="b")
            src = bytes(data[a:a + length])
            if op == "swap":
                data[a:a + length] = data[b:b + length]
            data[b:b + length] = src
        elif op == "insert":
            at = draw(st.integers(0, n), label="at")
            data[at:at] = draw(st.binary(min_size=1, max_size=16), label="bytes")
        else:
            at = draw(st.integers(0, n - 1), label="at")
            del data[at:at + draw(st.integers(1, 16), label="length")]
    return bytes(data)


@pytest.fixture(scope="session")
def fuzz() -> types.SimpleNamespace:
    """The fuzzing toolkit: fuzz.cases(ci, share), fuzz.settings(cases, deadline_ms), fuzz.record(bias),
    fuzz.structure(schema, buf, base), the strategy fuzz.mutated(base, sites, fixed), fuzz.BLOB_HEADER_SITES."""
    return types.SimpleNamespace(cases=fuzz_cases, settings=fuzz_settings, record=fuzzed_record, structure=structure,
                                 mutated=mutated, BLOB_HEADER_SITES=BLOB_HEADER_SITES)


class FuzzStats:
    """How the cases of each fuzz test ended, counted by outcome (and by sub-outcome, e.g. the error type)."""

    def __init__(self) -> None:
        self.by_test: Dict[str, dict] = {}

    def count(self, test: str, key: str, sub: str = "") -> None:
        s = self.by_test.setdefault(test, {})
        if sub:
            s.setdefault(key, {})
            s[key][sub] = s[key].get(sub, 0) + 1
        else:
            s[key] = s.get(key, 0) + 1


@pytest.fixture(scope="module")
def fuzz_stats():
    """A FuzzStats for the module's fuzz tests, printed when they are done (`pytest -s` shows it)."""
    stats, start = FuzzStats(), time.perf_counter()
    yield stats
    print(f"\nfuzz stats ({time.perf_counter() - start:.1f} s):")
    for test, s in stats.by_test.items():
        print(f"  {test}: {s}")
