"""One blob, routes for more than one kind of adapter; the runtime takes its adapter's, and says so.

A kernel's best route differs by adapter: on a CPU Vulkan (lavapipe) the
register-tiled GEMM is fastest at every M, on a discrete GPU the GEMV and the
shared-memory GEMM. A lowering writes the default rule's routes plus, per kind
of adapter with a measured rule or a route table, that kind's routes
(Q4Linear.adapter_routes, schema version 4); the route report names the set a
call used and why.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import executorch_wgpu.backend.serialization.blob as blob_module
from executorch_wgpu.backend.route_table import LAST_BUCKET_M_MAX, RouteTable, RouteTableEntry, RouteTableError
from executorch_wgpu.backend.routing import RouteOptions, adapter_routes, decide_route
from executorch_wgpu.backend.serialization.blob import deserialize_q4linear, serialize_q4linear
from executorch_wgpu.runtime import Runtime
from executorch_wgpu.runtime_py.gpu import GPUContext, gpu_context
from executorch_wgpu.tools.reference import golden_linear, random_q4_layer, rel_err
from executorch_wgpu.tools.tune import table_from_bench


def table(adapter_class=None, k=256, n=64) -> RouteTable:
    entry = RouteTableEntry(k, n, 32, "skinny", ((LAST_BUCKET_M_MAX, "shmem"),))
    return RouteTable("lab", "Lab GPU", "2026-12-02", entries=[entry], adapter_class=adapter_class)


def test_a_default_lowering_carries_the_cpu_rule_beside_the_default_rule():
    options = RouteOptions()
    (cls, route), = adapter_routes(256, 64, 32, options)
    assert cls == "cpu" and {route.kernel_for(m) for m in (1, 2, 1000)} == {"regtiled"}
    assert decide_route(256, 64, 32, options).kernel_for(1) == "gemv"


@pytest.mark.parametrize("options", [RouteOptions(prefill_route="shmem", decode_route="gemv"),
                                     RouteOptions(adapter_rules=False), RouteOptions(route_table=table())],
                         ids=["both-halves-forced", "no-adapter-rules", "table-for-every-adapter"])
def test_forced_routes_and_tables_for_every_adapter_write_one_route_set(options):
    assert adapter_routes(256, 64, 32, options) == ()


@pytest.mark.parametrize("table_class", [None, "cpu"])
def test_forcing_one_half_keeps_each_kinds_other_half(table_class):
    """decode forced: every kind runs it at M == 1, and keeps its own prefill (its table's, else its rule's)."""
    options = RouteOptions(decode_route="skinny", route_table=table("cpu") if table_class else None)
    (cls, route), = adapter_routes(256, 64, 32, options)
    assert cls == "cpu" and route.source == "forced" and route.kernel_for(1) == "skinny"
    assert route.kernel_for(100) == ("shmem" if table_class else "regtiled")
    assert ("route table otherwise" if table_class else "the rule of this kind of adapter otherwise") in route.reason
    default = decide_route(256, 64, 32, options)
    assert default.kernel_for(1) == "skinny" and "default rule otherwise" in default.reason


def test_a_route_table_for_one_kind_of_adapter_gives_that_kind_its_routes_only():
    options = RouteOptions(route_table=table("cpu"))
    routes = dict(adapter_routes(256, 64, 32, options))
    assert routes["cpu"].source == "route-table" and routes["cpu"].kernel_for(1) == "skinny"
    assert decide_route(256, 64, 32, options).source == "default-rule"   # other adapters: the rule
    assert dict(adapter_routes(256, 72, 32, options))["cpu"].source == "default-rule"   # a shape it lacks


def test_adapter_routes_survive_the_blob_and_an_old_version_3_blob_still_loads(monkeypatch):
    layer = random_q4_layer(64, 32, seed=3)
    record = dataclasses.replace(layer.record("l"), adapter_routes=adapter_routes(64, 32, 32, RouteOptions()))
    back = deserialize_q4linear(serialize_q4linear(record))
    assert back.adapter_routes == record.adapter_routes and back.route == record.route
    monkeypatch.setattr(blob_module, "SCHEMA_VERSION", 3)
    old = serialize_q4linear(dataclasses.replace(record, adapter_routes=()))
    monkeypatch.undo()
    assert deserialize_q4linear(old).adapter_routes == ()


def test_the_blob_reader_refuses_a_kind_of_adapter_named_twice():
    layer = random_q4_layer(64, 32, seed=4)
    route = layer.record("l").route
    with pytest.raises(blob_module.BlobFormatError, match="must name each of .* at most once"):
        serialize_q4linear(dataclasses.replace(layer.record("l"), adapter_routes=(("cpu", route), ("cpu", route))))


@pytest.fixture
def linear_pte(lower, single_linear):
    """A q4 Linear(256, 64) lowered linears-only: its own WGQ4 delegate and route report entry."""
    model = single_linear(256, 64)
    return model, lower(model, torch.randn(4, 256), {0: (1, 48)}, linears_only=True)


def test_the_runtime_takes_its_adapters_routes_and_the_report_says_which(linear_pte):
    model, pte = linear_pte
    method = Runtime.get().load_program(pte).load_method("forward")
    for m in (1, 5):
        x = torch.randn(m, 256)
        (y,) = method.execute([x])
        assert rel_err(y, golden_linear(x, model[0])) < 1e-4
        (entry,) = method.route_report()
        if gpu_context().adapter_class == "cpu":
            assert entry["kernel"] == "regtiled" and "[routes for cpu adapters]" in entry["reason"]
        else:
            assert "the blob has routes for cpu adapters, not for" in entry["reason"]


def test_an_adapter_of_another_kind_takes_the_default_routes_and_the_report_says_why(linear_pte, monkeypatch):
    model, pte = linear_pte
    gpu_context()
    monkeypatch.setattr(GPUContext, "adapter_class", property(lambda self: "discrete-gpu"))
    method = Runtime.get().load_program(pte).load_method("forward")   # loaded on the "discrete GPU"
    x = torch.randn(1, 256)
    (y,) = method.execute([x])
    assert rel_err(y, golden_linear(x, model[0])) < 1e-4
    (entry,) = method.route_report()
    assert entry["kernel"] == "gemv"
    assert "default routes: the blob has routes for cpu adapters, not for discrete-gpu" in entry["reason"]


def test_route_tables_record_the_kind_of_adapter_tune_measured_on():
    results = {"adapter": {"device": "llvmpipe", "backend_type": "Vulkan", "adapter_type": "CPU"},
               "date": "2026-12-02", "rows": []}
    assert table_from_bench(results, "lavapipe").adapter_class == "cpu"
    saved = table("integrated-gpu").to_json()
    assert RouteTable.from_json(saved).adapter_class == "integrated-gpu"
    with pytest.raises(RouteTableError, match="adapter_class 'tpu'"):
        RouteTable.from_json({**saved, "adapter_class": "tpu"})
