"""The blob schema: one .fbs, its generated mirror kept current, exact round trips."""

import filecmp
import pathlib

import numpy as np

from executorch_wgpu.backend.preprocess import WebGPUBackend
from executorch_wgpu.backend.routing import RouteOptions
from executorch_wgpu.backend.serialization import regenerate
from executorch_wgpu.backend.serialization.blob import BACKEND_ID, deserialize_q4linear, serialize_q4linear
from executorch_wgpu.tools.reference import random_q4_layer


def record(bias=True, route_options=RouteOptions(prefill_route="shmem")):
    return random_q4_layer(64, 20, 32, bias=bias, seed=1).record("layers.0.fc", route_options, m_max=512)


def test_generated_python_matches_schema(tmp_path):
    regenerate.generate(tmp_path)
    here = pathlib.Path(regenerate.__file__).parent / "generated" / "wgq4"
    fresh = tmp_path / "wgq4"
    names = sorted(p.name for p in fresh.glob("*.py"))
    assert names == sorted(p.name for p in here.glob("*.py"))
    assert filecmp.cmpfiles(fresh, here, names, shallow=False)[0] == names


def test_round_trip_keeps_every_field():
    for bias in (True, False):
        rec = record(bias)
        got = deserialize_q4linear(serialize_q4linear(rec))
        for field in ("name", "in_features", "out_features", "group_size", "n_stride", "m_min", "m_max", "route"):
            assert getattr(got, field) == getattr(rec, field)
        assert np.array_equal(got.qweight, rec.qweight) and np.array_equal(got.scales, rec.scales)
        assert (got.bias is None) == (rec.bias is None)
        if bias:
            assert np.array_equal(got.bias, rec.bias)
        assert got.route.source == "forced" and got.route.prefill_kernel == "shmem"


def test_round_trip_keeps_the_default_rules_buckets_and_knobs_of_any_width():
    # shmem_min_mn is a ulong: a value past 2**32 must come back whole.
    rec = record(route_options=RouteOptions(skinny_max_m=2**32 - 1, shmem_min_mn=2**40 + 3))
    route = deserialize_q4linear(serialize_q4linear(rec)).route
    assert route == rec.route
    assert (route.source, route.skinny_max_m, route.shmem_min_mn) == ("default-rule", 2**32 - 1, 2**40 + 3)
    assert route.prefill_buckets[0] == ((2**40 + 2) // 20, "skinny") and route.prefill_buckets[-1][1] == "shmem"


def test_serialization_is_deterministic():
    assert serialize_q4linear(record()) == serialize_q4linear(record())


def test_backend_id_in_blob_module_names_the_backend_class():
    assert WebGPUBackend.__name__ == BACKEND_ID
