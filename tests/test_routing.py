"""The default route rule (backend/routing.py) on its own: no lowering, no GPU."""

import pytest

from executorch_wgpu import WebGPUPartitioner
from executorch_wgpu.backend.route_table import LAST_BUCKET_M_MAX
from executorch_wgpu.backend.routing import RouteOptions, decide_route, default_prefill_buckets


def rule(m, n, skinny_max_m=32, shmem_min_mn=2**18):
    """The rule as stated (measured on the H100, docs/PERFORMANCE.md), for one M."""
    if m == 1:
        return "gemv"
    return "skinny" if m <= skinny_max_m or m * n < shmem_min_mn else "shmem"


@pytest.mark.parametrize("n,bound", [
    (2048, 127),      # q: (2**18 - 1) // 2048
    (512, 511),       # kv
    (8192, 32),       # gate: 31 from M*N, so skinny_max_m decides
    (128256, 32),     # lm_head
])
def test_default_buckets_end_skinny_at_the_larger_of_the_two_bounds(n, bound):
    assert default_prefill_buckets(n, RouteOptions()) == ((bound, "skinny"), (LAST_BUCKET_M_MAX, "shmem"))


@pytest.mark.parametrize("skinny_max_m,shmem_min_mn", [(32, 2**18), (4, 512), (1, 64), (1, 2), (100, 1)])
@pytest.mark.parametrize("n", [1, 7, 64, 512, 2048, 128256])
def test_buckets_agree_with_the_rule_for_every_m(n, skinny_max_m, shmem_min_mn):
    options = RouteOptions(skinny_max_m=skinny_max_m, shmem_min_mn=shmem_min_mn)
    route = decide_route(256, n, 32, options)
    assert (route.source, route.prefill_kernel) == ("default-rule", route.prefill_buckets[-1][1])
    bound = route.prefill_buckets[0][0]
    for m in sorted({1, 2, 3, 31, 32, 33, 127, 128, 511, 512, 4096, bound - 1, bound, bound + 1, 10**7} - {0}):
        assert route.kernel_for(m) == rule(m, n, skinny_max_m, shmem_min_mn), (m, route.prefill_buckets)


def test_route_records_the_knobs_and_says_why():
    route = decide_route(2048, 2048, 32, RouteOptions())
    assert (route.decode_kernel, route.prefill_kernel, route.skinny_max_m, route.shmem_min_mn) == (
        "gemv", "shmem", 32, 2**18)
    assert route.reason == ("decode -> gemv; prefill M<=127 skinny, M>127 shmem by default rule "
                            "(M <= 32 or M*N < 262144 -> skinny, else shmem; K=2048, N=2048)")


def test_rule_with_no_skinny_m_above_one_is_one_shmem_bucket():
    assert default_prefill_buckets(64, RouteOptions(skinny_max_m=1, shmem_min_mn=64)) == ((LAST_BUCKET_M_MAX, "shmem"),)


def test_forced_prefill_kernel_means_no_buckets_and_keeps_the_knobs():
    route = decide_route(2048, 2048, 32, RouteOptions(prefill_route="regtiled", skinny_max_m=8))
    assert (route.source, route.prefill_kernel, route.prefill_buckets) == ("forced", "regtiled", ())
    assert [route.kernel_for(m) for m in (1, 2, 100, 10**6)] == ["gemv", "regtiled", "regtiled", "regtiled"]
    assert (route.skinny_max_m, route.shmem_min_mn) == (8, 2**18)
    forced_decode = decide_route(2048, 2048, 32, RouteOptions(decode_route="skinny"))
    assert forced_decode.decode_kernel == "skinny"
    assert forced_decode.prefill_buckets == default_prefill_buckets(2048, RouteOptions())


@pytest.mark.parametrize("knobs", [dict(skinny_max_m=0), dict(shmem_min_mn=0), dict(skinny_max_m=-1),
                                   dict(skinny_max_m=2**32), dict(shmem_min_mn=2**64), dict(skinny_max_m=1.5)])
def test_knobs_must_be_positive_and_fit_the_blob(knobs):
    with pytest.raises(ValueError, match=next(iter(knobs))):
        RouteOptions(**knobs)
    with pytest.raises(ValueError):
        WebGPUPartitioner(**knobs)


def test_partitioner_carries_the_knobs_as_compile_specs():
    specs = WebGPUPartitioner(skinny_max_m=16, shmem_min_mn=4096, linears_only=True).delegation_spec.compile_specs
    assert {s.key: s.value for s in specs} == {"skinny_max_m": b"16", "shmem_min_mn": b"4096"}
    # graph mode, the default: the same knobs plus the spec that marks a graph partition
    graph_specs = WebGPUPartitioner(skinny_max_m=16, shmem_min_mn=4096).delegation_spec.compile_specs
    assert {s.key: s.value for s in graph_specs} == {"skinny_max_m": b"16", "shmem_min_mn": b"4096", "graph": b"1"}
    back = RouteOptions.from_compile_specs(specs)
    assert (back.skinny_max_m, back.shmem_min_mn) == (16, 4096)
    with pytest.raises(ValueError, match="shmem_k_threshold"):
        RouteOptions.from_compile_specs(specs + [type(specs[0])("shmem_k_threshold", b"4096")])
