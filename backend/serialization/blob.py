"""Write and read the delegate blob described by schema.fbs.

The writer runs in preprocess; the reader in the runtime's loader. The reader
trusts nothing: it checks the magic, the schema version, every flatbuffer
offset, count and length against the blob's size (fbverify.py, before the
generated readers follow any of them), every length against the layer's
shape, and a CRC-32 of the payload, and turns any failure into a
BlobFormatError that says what is wrong. The CRC covers the payload only:
a corrupted header field the shape rules cannot catch (N of a layer without
bias, within the same 16-column block) loads; the .pte loader then refuses it
against the program's tensor shapes (runtime_py/pte_checks.py).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Optional, Tuple

import flatbuffers
import numpy as np

from executorch_wgpu.errors import BlobFormatError, BlobVersionError
from executorch_wgpu.backend.serialization import fbverify
from executorch_wgpu.backend.serialization.generated.wgq4 import AdapterRoute as fb_adapter_route
from executorch_wgpu.backend.serialization.generated.wgq4 import Q4Linear as fb_linear
from executorch_wgpu.backend.serialization.generated.wgq4 import Route as fb_route
from executorch_wgpu.backend.serialization.generated.wgq4 import RouteBucket as fb_bucket
from executorch_wgpu.shaders import registry

# The versions and what each changed: docs/PERFORMANCE.md, "Blob schema versions".
SCHEMA_VERSION = 4              # what the writer writes
OLDEST_READABLE_VERSION = 3     # the readers read every version from this one to SCHEMA_VERSION
FILE_IDENTIFIER = b"WGQ4"
# The delegate id preprocess writes into the .pte and the runtime dispatches on
# (the name of the BackendDetails subclass, as ExecuTorch requires).
BACKEND_ID = "WebGPUBackend"

ROUTE_SOURCES = ("default-rule", "forced", "route-table")
# Kinds of adapter a blob may carry routes for, in schema enum order (AdapterClass).
ADAPTER_CLASSES = ("discrete-gpu", "integrated-gpu", "cpu")
_WGPU_ADAPTER_TYPES = {"DiscreteGPU": "discrete-gpu", "IntegratedGPU": "integrated-gpu", "CPU": "cpu"}


def adapter_class_of(adapter_type: Optional[str]) -> Optional[str]:
    """The adapter class of a wgpu adapter type ("DiscreteGPU", ...); None for a type with no class (Unknown, virtual)."""
    return _WGPU_ADAPTER_TYPES.get(adapter_type or "")

# Shape rules the packed layout relies on; kept here because both the packer
# and this reader must agree on them.
N_ALIGN = 16          # n_stride = N rounded up to a multiple of this: whole 16-column weight blocks
QW_BLOCK = 16         # columns per block of the packed weights (see schema.fbs)
GROUP_ALIGN = 32      # group sizes must be multiples of this (8 nibbles per word, 32-wide K tiles)


def round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


@dataclass(frozen=True)
class Route:
    """Which kernel runs a layer for M == 1 and for M > 1, and why."""

    decode_kernel: str
    prefill_kernel: str
    source: str
    skinny_max_m: int               # the default rule's knobs in force; 0 when the route came from a table
    shmem_min_mn: int
    reason: str
    table: str = ""                 # route table name, adapter and date, when source == "route-table"
    prefill_buckets: tuple = ()     # ((m_max, kernel), ...) by increasing m_max; empty: prefill_kernel for all M > 1

    def kernel_for(self, m: int) -> str:
        if m == 1:
            return self.decode_kernel
        for m_max, kernel in self.prefill_buckets:
            if m <= m_max:
                return kernel
        return self.prefill_buckets[-1][1] if self.prefill_buckets else self.prefill_kernel


@dataclass(frozen=True, eq=False)
class Q4LinearRecord:
    """One q4gsw linear layer, packed (see schema.fbs for the layout)."""

    name: str
    in_features: int
    out_features: int
    group_size: int
    n_stride: int
    m_min: int
    m_max: int
    qweight: np.ndarray          # uint32, (K / 8) * n_stride
    scales: np.ndarray           # float32, (K / gs) * n_stride
    bias: Optional[np.ndarray]   # float32, N, or None
    route: Route                 # on an adapter of a kind adapter_routes does not name
    adapter_routes: Tuple[Tuple[str, Route], ...] = ()   # ((adapter class, route), ...), each class once
    prefill_precision: str = "fp32"   # one of registry.PRECISIONS: "f16" / "int8" ask for that prefill (schema.fbs Precision)

    def route_for_adapter(self, adapter_class: Optional[str]) -> Tuple[Route, str]:
        """The routes a runtime on an adapter of this class (None: unknown) takes, and why, in words."""
        for cls, route in self.adapter_routes:
            if cls == adapter_class:
                return route, f"routes for {cls} adapters"
        if not self.adapter_routes:
            return self.route, "the blob's routes for every adapter"
        named = ", ".join(cls for cls, _ in self.adapter_routes)
        return self.route, f"default routes: the blob has routes for {named} adapters, not for {adapter_class or 'an adapter of unknown type'}"


def payload_checksum(qweight: np.ndarray, scales: np.ndarray, bias: Optional[np.ndarray]) -> int:
    crc = zlib.crc32(np.ascontiguousarray(qweight).data.cast("B"))
    crc = zlib.crc32(np.ascontiguousarray(scales).data.cast("B"), crc)
    if bias is not None:
        crc = zlib.crc32(np.ascontiguousarray(bias).data.cast("B"), crc)
    return crc


def serialize_q4linear(rec: Q4LinearRecord) -> bytes:
    """Bytes of the blob for rec. The same record always gives the same bytes."""
    check_record(rec)
    qweight = np.ascontiguousarray(rec.qweight, dtype="<u4")
    scales = np.ascontiguousarray(rec.scales, dtype="<f4")
    bias = None if rec.bias is None else np.ascontiguousarray(rec.bias, dtype="<f4")
    b = flatbuffers.Builder(qweight.nbytes + scales.nbytes + 4096)

    name = b.CreateString(rec.name)
    route = _write_route(b, rec.route)
    adapter_entries = []
    for cls, adapter_route in rec.adapter_routes:
        written = _write_route(b, adapter_route)
        fb_adapter_route.Start(b)
        fb_adapter_route.AddAdapterClass(b, ADAPTER_CLASSES.index(cls))
        fb_adapter_route.AddRoute(b, written)
        adapter_entries.append(fb_adapter_route.End(b))
    fb_linear.StartAdapterRoutesVector(b, len(adapter_entries))
    for entry in reversed(adapter_entries):
        b.PrependUOffsetTRelative(entry)
    adapter_vec = b.EndVector()
    qweight_vec = b.CreateNumpyVector(qweight)
    scales_vec = b.CreateNumpyVector(scales)
    bias_vec = None if bias is None else b.CreateNumpyVector(bias)

    fb_linear.Start(b)
    fb_linear.AddSchemaVersion(b, SCHEMA_VERSION)
    fb_linear.AddName(b, name)
    fb_linear.AddInFeatures(b, rec.in_features)
    fb_linear.AddOutFeatures(b, rec.out_features)
    fb_linear.AddGroupSize(b, rec.group_size)
    fb_linear.AddNStride(b, rec.n_stride)
    fb_linear.AddMMin(b, rec.m_min)
    fb_linear.AddMMax(b, rec.m_max)
    fb_linear.AddQweight(b, qweight_vec)
    fb_linear.AddScales(b, scales_vec)
    if bias_vec is not None:
        fb_linear.AddBias(b, bias_vec)
    fb_linear.AddRoute(b, route)
    fb_linear.AddChecksum(b, payload_checksum(qweight, scales, bias))
    fb_linear.AddAdapterRoutes(b, adapter_vec)
    if rec.prefill_precision != "fp32":   # absent means fp32: an fp32 blob's bytes stay what they were
        fb_linear.AddPrefillPrecision(b, registry.PRECISIONS.index(rec.prefill_precision))
    b.Finish(fb_linear.End(b), file_identifier=FILE_IDENTIFIER)
    return bytes(b.Output())


def _write_route(b: flatbuffers.Builder, route: Route) -> int:
    reason = b.CreateString(route.reason)
    table = b.CreateString(route.table)
    buckets = []
    for m_max, kernel in route.prefill_buckets:
        fb_bucket.Start(b)
        fb_bucket.AddMMax(b, m_max)
        fb_bucket.AddKernel(b, registry.kernel(kernel).route_id)
        buckets.append(fb_bucket.End(b))
    fb_route.StartPrefillBucketsVector(b, len(buckets))
    for bucket in reversed(buckets):
        b.PrependUOffsetTRelative(bucket)
    bucket_vec = b.EndVector()
    fb_route.Start(b)
    fb_route.AddDecodeKernel(b, registry.kernel(route.decode_kernel).route_id)
    fb_route.AddPrefillKernel(b, registry.kernel(route.prefill_kernel).route_id)
    fb_route.AddSource(b, ROUTE_SOURCES.index(route.source))
    fb_route.AddSkinnyMaxM(b, route.skinny_max_m)
    fb_route.AddShmemMinMn(b, route.shmem_min_mn)
    fb_route.AddReason(b, reason)
    fb_route.AddTable(b, table)
    fb_route.AddPrefillBuckets(b, bucket_vec)
    return fb_route.End(b)


_schema: Optional[fbverify.Schema] = None


def _blob_schema() -> fbverify.Schema:
    """schema.fbs, parsed once, for the verifier."""
    global _schema
    if _schema is None:
        _schema = fbverify.schema_from_package("executorch_wgpu.backend.serialization", "schema.fbs")
    return _schema


def deserialize_q4linear(data: bytes) -> Q4LinearRecord:
    """Parse and validate a blob; raises BlobFormatError (or BlobVersionError)."""
    data = bytes(data)
    if len(data) < 8:
        raise BlobFormatError(f"delegate blob is truncated: {len(data)} bytes, a blob has at least 8")
    if data[4:8] != FILE_IDENTIFIER:
        raise BlobFormatError(
            f"not an executorch_wgpu blob: magic {data[4:8]!r} at offset 4, expected {FILE_IDENTIFIER!r}"
        )
    try:
        root = fb_linear.Q4Linear.GetRootAs(data, 0)
        version = root.SchemaVersion()
    except (IndexError, struct.error, ValueError, TypeError, OverflowError) as e:
        raise BlobFormatError(f"delegate blob is truncated or corrupted: cannot read its header ({e})") from e
    if not OLDEST_READABLE_VERSION <= version <= SCHEMA_VERSION:
        raise BlobVersionError(
            f"delegate blob has schema version {version}; this executorch_wgpu reads versions "
            f"{OLDEST_READABLE_VERSION} to {SCHEMA_VERSION} only: "
            + ("a newer executorch_wgpu wrote it: upgrade executorch_wgpu, or re-export the model with this one"
               if version > SCHEMA_VERSION else "re-export the model with this version of executorch_wgpu")
        )
    # Every offset, count and length against the blob's size before the generated
    # readers follow them (they trust the buffer).
    try:
        fbverify.verify(_blob_schema(), data)
    except fbverify.FlatbufferVerifyError as e:
        raise BlobFormatError(f"delegate blob is truncated or corrupted: {e}") from e
    try:
        rec = _read_record(root)
        checksum = root.Checksum()
    except (IndexError, struct.error, ValueError, UnicodeDecodeError, TypeError, OverflowError) as e:
        raise BlobFormatError(f"delegate blob is truncated or corrupted: {e}") from e
    check_record(rec)
    if payload_checksum(rec.qweight, rec.scales, rec.bias) != checksum:
        raise BlobFormatError(f"delegate blob of layer {rec.name!r} is corrupted: payload checksum mismatch")
    return rec


def _read_record(root: fb_linear.Q4Linear) -> Q4LinearRecord:
    r = root.Route()
    if r is None:
        raise BlobFormatError("delegate blob is corrupted: it has no route record")
    route = _read_route(r)
    adapter_routes = []
    for i in range(root.AdapterRoutesLength()):
        entry = root.AdapterRoutes(i)
        cls, adapter_route = entry.AdapterClass(), entry.Route()
        if not 0 <= cls < len(ADAPTER_CLASSES):
            raise BlobFormatError(f"delegate blob is corrupted: unknown adapter class enum value {cls}")
        if adapter_route is None:
            raise BlobFormatError("delegate blob is corrupted: an adapter route has no route record")
        adapter_routes.append((ADAPTER_CLASSES[cls], _read_route(adapter_route)))
    precision = root.PrefillPrecision()
    if not 0 <= precision < len(registry.PRECISIONS):
        raise BlobFormatError(f"delegate blob is corrupted: unknown prefill precision enum value {precision}")
    qweight = root.QweightAsNumpy()
    scales = root.ScalesAsNumpy()
    bias = root.BiasAsNumpy() if root.BiasLength() > 0 else None
    if not isinstance(qweight, np.ndarray) or not isinstance(scales, np.ndarray):
        raise BlobFormatError("delegate blob is corrupted: weight or scale vector is missing")
    return Q4LinearRecord(
        name=(root.Name() or b"").decode("utf-8"),
        in_features=root.InFeatures(),
        out_features=root.OutFeatures(),
        group_size=root.GroupSize(),
        n_stride=root.NStride(),
        m_min=root.MMin(),
        m_max=root.MMax(),
        qweight=qweight,
        scales=scales,
        bias=bias if isinstance(bias, np.ndarray) else None,
        route=route,
        adapter_routes=tuple(adapter_routes),
        prefill_precision=registry.PRECISIONS[precision],
    )


def _read_route(r: fb_route.Route) -> Route:
    source = r.Source()
    if not 0 <= source < len(ROUTE_SOURCES):
        raise BlobFormatError(f"delegate blob is corrupted: unknown route source enum value {source}")
    return Route(
        decode_kernel=_kernel_named_by(r.DecodeKernel(), "decode kernel"),
        prefill_kernel=_kernel_named_by(r.PrefillKernel(), "prefill kernel"),
        source=ROUTE_SOURCES[source],
        skinny_max_m=r.SkinnyMaxM(),
        shmem_min_mn=r.ShmemMinMn(),
        reason=(r.Reason() or b"").decode("utf-8"),
        table=(r.Table() or b"").decode("utf-8"),
        prefill_buckets=tuple(_read_bucket(r.PrefillBuckets(i)) for i in range(r.PrefillBucketsLength())),
    )


def _kernel_named_by(route_id: int, what: str) -> str:
    if route_id not in registry.BY_ROUTE_ID:
        raise BlobFormatError(f"delegate blob is corrupted: unknown {what} route id {route_id}")
    return registry.BY_ROUTE_ID[route_id].name


def _read_bucket(bucket) -> tuple:
    return bucket.MMax(), _kernel_named_by(bucket.Kernel(), "prefill bucket kernel")


def check_record(rec: Q4LinearRecord) -> None:
    """Every length and shape rule of schema.fbs, checked before any use."""
    k, n, gs = rec.in_features, rec.out_features, rec.group_size

    def fail(what: str) -> None:
        raise BlobFormatError(f"delegate blob of layer {rec.name!r} is invalid: {what}")

    if k <= 0 or n <= 0:
        fail(f"in_features={k}, out_features={n} must be positive")
    if gs <= 0 or gs % GROUP_ALIGN or k % gs:
        fail(f"group_size={gs} must be a positive multiple of {GROUP_ALIGN} dividing in_features={k}")
    if rec.n_stride != round_up(n, N_ALIGN):
        fail(f"n_stride={rec.n_stride}, expected {round_up(n, N_ALIGN)} for out_features={n}")
    if not 1 <= rec.m_min <= rec.m_max:
        fail(f"M range [{rec.m_min}, {rec.m_max}] is empty or starts below 1")
    if rec.qweight.size != k // 8 * rec.n_stride:
        fail(f"qweight has {rec.qweight.size} words, expected {k // 8 * rec.n_stride}")
    if rec.scales.size != k // gs * rec.n_stride:
        fail(f"scales has {rec.scales.size} values, expected {k // gs * rec.n_stride}")
    if rec.bias is not None and rec.bias.size != n:
        fail(f"bias has {rec.bias.size} values, expected {n}")
    if rec.prefill_precision not in registry.PRECISIONS:
        fail(f"prefill precision {rec.prefill_precision!r} is not one of {registry.PRECISIONS}")
    classes = [cls for cls, _ in rec.adapter_routes]
    if any(cls not in ADAPTER_CLASSES for cls in classes) or len(set(classes)) != len(classes):
        fail(f"adapter routes for {classes} must name each of {ADAPTER_CLASSES} at most once")
    for route in (rec.route, *(route for _, route in rec.adapter_routes)):
        if route.decode_kernel not in registry.DECODE_KERNELS or route.prefill_kernel not in registry.PREFILL_KERNELS:
            fail(f"route {route.decode_kernel}/{route.prefill_kernel} is not a known kernel pair")
        if route.source not in ROUTE_SOURCES:
            fail(f"route source {route.source!r} is not one of {ROUTE_SOURCES}")
        bounds = [m_max for m_max, _ in route.prefill_buckets]
        if any(b <= a for a, b in zip(bounds, bounds[1:])) or any(b < 2 for b in bounds):
            fail(f"prefill bucket bounds {bounds} must be >= 2 and strictly increasing")
        if any(kernel not in registry.PREFILL_KERNELS for _, kernel in route.prefill_buckets):
            fail(f"prefill buckets {route.prefill_buckets} name a kernel that cannot run M > 1")
