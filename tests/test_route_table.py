"""Measured route tables: built by `tune`, read by the partitioner, baked into blobs, obeyed by the runtime."""

import json

import pytest
import torch

from executorch_wgpu import WebGPUPartitioner
from executorch_wgpu.backend.route_table import RouteTable, RouteTableEntry, RouteTableError
from executorch_wgpu.backend.routing import DECODE_KERNELS, PREFILL_KERNELS, RouteOptions, decide_route
from executorch_wgpu.backend.serialization.blob import Route, deserialize_q4linear, serialize_q4linear
from executorch_wgpu.runtime import Runtime
from executorch_wgpu.tools.reference import golden_linear, random_q4_layer, rel_err
from executorch_wgpu.tools.tune import LAST_BUCKET_M_MAX, TuneError, main as tune_main, table_from_bench

ADAPTER = {"vendor": "v", "device": "Test GPU", "description": "driver 1.2", "backend_type": "Vulkan",
           "adapter_type": "DiscreteGPU"}


def bench_row(k, n, m, **us_by_kernel):
    """One bench.bench() row: kernel=µs is a correct run, kernel=(µs, False) one outside the tolerance."""
    kernels = {}
    for kernel, value in us_by_kernel.items():
        us, ok = value if isinstance(value, tuple) else (value, True)
        kernels[kernel] = {"us": us, "rel_err": 1e-7 if ok else 0.5, "ok": ok}
    return {"shape": f"{k}x{n}", "K": k, "N": n, "M": m, "group_size": 32, "kernels": kernels}


def bench_results(*rows):
    return {"date": "2026-01-02T03:04:05+00:00", "adapter": ADAPTER, "rows": list(rows)}


def table(entries, name="t1"):
    return RouteTable(name=name, adapter="Test GPU, Vulkan", date="2026-01-02", command="tune", entries=entries)


def entry(k, n, decode="gemv", prefill=((8, "regtiled"), (LAST_BUCKET_M_MAX, "shmem"))):
    return RouteTableEntry(k, n, 32, decode, tuple(prefill), {"1": {decode: 1.0}})


# ---- tune: measurements -> table ---------------------------------------------------------------


def test_table_from_bench_takes_fastest_correct_kernel_per_m_and_merges_equal_neighbours():
    results = bench_results(
        bench_row(256, 64, 1, gemv=5.0, regtiled=7.0, shmem=9.0),
        bench_row(256, 64, 2, regtiled=6.0, shmem=9.0),
        bench_row(256, 64, 8, regtiled=8.0, shmem=9.0),
        bench_row(256, 64, 32, regtiled=20.0, shmem=12.0),
        bench_row(256, 64, 128, regtiled=60.0, shmem=30.0),
        bench_row(512, 128, 1, gemv=9.0, regtiled=4.0),
        bench_row(512, 128, 16, regtiled=5.0, shmem=6.0),
        bench_row(512, 128, 64, regtiled=9.0, shmem=8.0),
        bench_row(512, 128, 256, regtiled=10.0, shmem=20.0),
    )
    t = table_from_bench(results, "lab", "python -m executorch_wgpu tune --quick")
    first, second = t.entries
    assert (first.K, first.N, first.group_size, first.decode) == (256, 64, 32, "gemv")
    # M=2 and M=8 regtiled, M=32 and M=128 shmem: the bound between 8 and 32 is floor(sqrt(256)) = 16.
    assert first.prefill == ((16, "regtiled"), (LAST_BUCKET_M_MAX, "shmem"))
    assert (second.decode, second.prefill) == ("regtiled", ((32, "regtiled"), (128, "shmem"),
                                                            (LAST_BUCKET_M_MAX, "regtiled")))
    assert first.measured_us["32"] == {"regtiled": 20.0, "shmem": 12.0}
    assert sorted(first.measured_us, key=int) == ["1", "2", "8", "32", "128"]
    assert (t.name, t.date, t.command) == ("lab", "2026-01-02T03:04:05+00:00", "python -m executorch_wgpu tune --quick")
    assert t.adapter == "Test GPU, Vulkan, driver 1.2"


def test_bucket_bound_between_measured_m_is_their_floored_geometric_mean():
    results = bench_results(bench_row(64, 32, 1, gemv=1.0), bench_row(64, 32, 16, regtiled=1.0, shmem=2.0),
                            bench_row(64, 32, 64, regtiled=2.0, shmem=1.0))
    (e,) = table_from_bench(results, "t").entries
    assert e.prefill == ((32, "regtiled"), (LAST_BUCKET_M_MAX, "shmem"))   # sqrt(16 * 64) = 32


def test_kernel_outside_tolerance_or_failing_to_run_is_never_chosen():
    failed = bench_row(256, 64, 16, shmem=10.0)
    failed["kernels"]["regtiled"] = {"error": "dispatch too large"}
    results = bench_results(
        bench_row(256, 64, 1, gemv=(1.0, False), regtiled=3.0, shmem=4.0),   # the fastest is wrong
        failed,
        bench_row(256, 64, 64, regtiled=(1.0, False), shmem=50.0),
    )
    (e,) = table_from_bench(results, "t").entries
    assert e.decode == "regtiled"
    assert e.prefill == ((LAST_BUCKET_M_MAX, "shmem"),)
    assert "gemv" not in e.measured_us["1"] and "regtiled" not in e.measured_us["64"]


def test_kernels_a_route_cannot_name_are_not_chosen():
    results = bench_results(bench_row(64, 32, 1, gemv=3.0, experimental=1.0),
                            bench_row(64, 32, 4, gemv=0.5, experimental=0.5, regtiled=2.0))
    (e,) = table_from_bench(results, "t").entries
    assert (e.decode, e.prefill) == ("gemv", ((LAST_BUCKET_M_MAX, "regtiled"),))   # gemv cannot run M > 1


def test_shape_without_a_correct_decode_or_prefill_kernel_is_a_tune_error():
    no_decode = bench_results(bench_row(64, 32, 1, gemv=(1.0, False)), bench_row(64, 32, 4, regtiled=1.0))
    with pytest.raises(TuneError, match="K=64 N=32 .*M=1"):
        table_from_bench(no_decode, "t")
    no_prefill = bench_results(bench_row(64, 32, 1, gemv=1.0))
    with pytest.raises(TuneError, match="K=64 N=32 .*M > 1"):
        table_from_bench(no_prefill, "t")


# ---- the file -----------------------------------------------------------------------------------


def test_save_then_load_gives_the_same_table(tmp_path):
    original = table([entry(256, 64), entry(512, 128, "regtiled", ((LAST_BUCKET_M_MAX, "regtiled"),))])
    path = tmp_path / "routes.json"
    original.save(path)
    loaded = RouteTable.load(path)
    assert loaded == original
    assert [e.measured_us for e in loaded.entries] == [e.measured_us for e in original.entries]


def bad_table_files():
    good = table([entry(256, 64)]).to_json()
    wrong_version = dict(good, version=99)
    wrong_format = dict(good, format="something-else")
    missing_entries = {k: v for k, v in good.items() if k != "entries"}
    bad_kernel = json.loads(json.dumps(good))
    bad_kernel["entries"][0]["decode"] = "fastest"
    bad_bounds = json.loads(json.dumps(good))
    bad_bounds["entries"][0]["prefill"] = [{"m_max": 64, "kernel": "shmem"}, {"m_max": 8, "kernel": "regtiled"}]
    return {
        "not-json": ("{ nope", "not valid JSON"),
        "wrong-version": (json.dumps(wrong_version), "version 99"),
        "wrong-format": (json.dumps(wrong_format), "not a route table"),
        "missing-entries": (json.dumps(missing_entries), "malformed"),
        "unknown-kernel": (json.dumps(bad_kernel), "'fastest'"),
        "decreasing-bounds": (json.dumps(bad_bounds), "strictly increasing"),
    }


@pytest.mark.parametrize("case", sorted(bad_table_files()))
def test_unusable_table_file_raises_route_table_error_naming_the_file(tmp_path, case):
    text, problem = bad_table_files()[case]
    path = tmp_path / f"{case}.json"
    path.write_text(text)
    with pytest.raises(RouteTableError, match=problem) as info:
        RouteTable.load(path)
    assert str(path) in str(info.value)


def test_missing_table_file_raises_route_table_error_naming_the_file(tmp_path):
    with pytest.raises(RouteTableError, match="cannot read route table .*absent.json"):
        RouteTable.load(tmp_path / "absent.json")


def test_partitioner_refuses_an_unusable_table_when_constructed(tmp_path):
    path = tmp_path / "routes.json"
    path.write_text(json.dumps(dict(table([]).to_json(), version=0)))
    with pytest.raises(RouteTableError, match="routes.json"):
        WebGPUPartitioner(route_table=path)
    with pytest.raises(RouteTableError, match="absent.json"):
        WebGPUPartitioner(route_table=str(tmp_path / "absent.json"))


# ---- routes -------------------------------------------------------------------------------------


def test_kernel_for_uses_buckets_with_inclusive_bounds_and_the_last_above_them():
    route = Route("regtiled", "shmem", "route-table", 0, 0, "measured", "t1",
                  prefill_buckets=((8, "regtiled"), (64, "shmem"), (256, "regtiled")))
    assert [route.kernel_for(m) for m in (1, 2, 8, 9, 64, 65, 256, 257, 10**6)] == [
        "regtiled", "regtiled", "regtiled", "shmem", "shmem", "regtiled", "regtiled", "regtiled", "regtiled"]
    no_buckets = Route("gemv", "shmem", "forced", 32, 2**18, "prefill=shmem forced")
    assert [no_buckets.kernel_for(m) for m in (1, 2, 4096)] == ["gemv", "shmem", "shmem"]


def test_decide_route_takes_the_table_entry_of_the_layer_shape():
    options = RouteOptions(route_table=table([entry(256, 64)]))
    route = decide_route(256, 64, 32, options)
    assert (route.source, route.decode_kernel, route.prefill_kernel) == ("route-table", "gemv", "shmem")
    assert route.prefill_buckets == ((8, "regtiled"), (LAST_BUCKET_M_MAX, "shmem"))
    assert route.table.startswith("t1 (") and "M<=8 regtiled, M>8 shmem" in route.reason
    assert (route.skinny_max_m, route.shmem_min_mn) == (0, 0)   # the default rule's knobs were not in force


def test_decide_route_falls_back_to_the_default_rule_for_a_shape_the_table_lacks():
    options = RouteOptions(route_table=table([entry(256, 64)]))
    for k, n, gs in ((256, 128, 32), (256, 64, 64)):   # other N; same K, N with another group size
        route = decide_route(k, n, gs, options)
        rule = decide_route(k, n, gs, RouteOptions())
        assert (route.source, route.decode_kernel, route.prefill_kernel, route.prefill_buckets) == (
            "default-rule", rule.decode_kernel, rule.prefill_kernel, rule.prefill_buckets)
        assert (route.skinny_max_m, route.shmem_min_mn) == (32, 2**18)
        assert f"has no entry for K={k}, N={n}, group_size={gs}" in route.reason and route.table == ""


def test_forced_prefill_route_overrides_the_table_and_drops_its_buckets():
    options = RouteOptions(prefill_route="regtiled", route_table=table([entry(256, 64, decode="shmem")]))
    route = decide_route(256, 64, 32, options)
    assert (route.source, route.decode_kernel, route.prefill_kernel, route.prefill_buckets) == (
        "forced", "shmem", "regtiled", ())   # decode still from the table
    assert "prefill=regtiled forced" in route.reason and route.table.startswith("t1")
    assert (route.skinny_max_m, route.shmem_min_mn) == (0, 0)


def test_forced_decode_route_keeps_the_tables_prefill_buckets():
    route = decide_route(256, 64, 32, RouteOptions(decode_route="regtiled", route_table=table([entry(256, 64)])))
    assert (route.source, route.decode_kernel) == ("forced", "regtiled")
    assert route.prefill_buckets == ((8, "regtiled"), (LAST_BUCKET_M_MAX, "shmem"))


def test_compile_specs_carry_the_table_routes_without_the_timings():
    options = RouteOptions(skinny_max_m=16, shmem_min_mn=2**20, route_table=table([entry(256, 64)]))
    specs = options.to_compile_specs()
    (spec,) = [s for s in specs if s.key == "route_table"]
    assert b"measured_us\":{}" in spec.value
    back = RouteOptions.from_compile_specs(specs)
    assert back.route_table == options.route_table and (back.skinny_max_m, back.shmem_min_mn) == (16, 2**20)
    assert back.route_table.entries[0].measured_us == {}


def test_blob_round_trip_keeps_route_table_source_name_and_buckets():
    rec = random_q4_layer(256, 64, 32, bias=True, seed=3).record(
        "fc", RouteOptions(route_table=table([entry(256, 64)])), m_max=512)
    route = rec.route
    got = deserialize_q4linear(serialize_q4linear(rec)).route
    assert got == route
    assert (got.source, got.table, got.prefill_buckets) == ("route-table", route.table, route.prefill_buckets)


# ---- end to end: lower with a table, run on our runtime -----------------------------------------


def lower_and_load(lower, model, x, **partitioner_options):
    """Linears-only: the layer's own WGQ4 delegate, whose route report entry these tests read."""
    pte = lower(model, x, {0: (1, 64)}, linears_only=True, **partitioner_options)
    return Runtime.get().load_program(pte).load_method("forward")


def run_at(method, model, m, k):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    (y,) = method.execute([x])
    assert rel_err(y, golden_linear(x, model[0])) < 1e-4
    (report,) = method.route_report()
    return report


def test_lowering_with_a_table_runs_its_kernel_per_m_bucket(tmp_path, lower, single_linear):
    path = tmp_path / "routes.json"
    table([entry(256, 64)], name="lab-table").save(path)
    model = single_linear(256, 64)
    method = lower_and_load(lower, model, torch.randn(4, 256), route_table=path)
    for m, kernel in ((1, "gemv"), (4, "regtiled"), (32, "shmem")):
        report = run_at(method, model, m, 256)
        assert report["kernel"] == kernel
        assert "(route-table)" in report["reason"] and "M<=8 regtiled, M>8 shmem" in report["reason"]


def test_forced_prefill_route_wins_over_the_table_at_run_time(lower, single_linear):
    model = single_linear(256, 64)
    method = lower_and_load(lower, model, torch.randn(4, 256), route_table=table([entry(256, 64)]),
                            prefill_route="regtiled")
    report = run_at(method, model, 32, 256)
    assert report["kernel"] == "regtiled" and "(forced)" in report["reason"]


def test_layer_shape_missing_from_the_table_runs_the_default_rule(lower, single_linear):
    model = single_linear(256, 72)
    method = lower_and_load(lower, model, torch.randn(4, 256), route_table=table([entry(256, 64)]),
                            adapter_rules=False)
    rule = decide_route(256, 72, 32, RouteOptions())
    for m in (1, 32):
        report = run_at(method, model, m, 256)
        assert report["kernel"] == rule.kernel_for(m)
        assert "(default-rule)" in report["reason"] and "no entry for K=256, N=72" in report["reason"]


def test_tune_quick_writes_a_loadable_table_on_this_adapter(tmp_path, capsys):
    out = tmp_path / "routes.json"
    tune_main(["--quick", "--shapes", "q", "--m", "1,16", "--reps", "2", "--warmup", "1", "--out", str(out)])
    t = RouteTable.load(out)
    assert t.name == "routes" and "--quick" in t.command
    e = t.entry_for(256, 256, 32)
    assert e is not None and e.decode in DECODE_KERNELS
    assert len(e.prefill) == 1 and e.prefill[0][0] == LAST_BUCKET_M_MAX and e.prefill[0][1] in PREFILL_KERNELS
    assert set(e.measured_us) == {"1", "16"}
    printed = capsys.readouterr().out
    assert str(out) in printed and "K=256 N=256 gs=32: decode" in printed


def test_same_table_lowers_to_identical_bytes(lower, single_linear):
    model = single_linear(128, 40)
    x = torch.randn(3, 128)
    routes = table([entry(128, 40)])
    assert lower(model, x, route_table=routes, linears_only=True) == lower(model, x, route_table=routes,
                                                                           linears_only=True)
