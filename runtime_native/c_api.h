// A small C API of the native library, for executorch_wgpu.native (ctypes):
// what tests and the benchmark need to see inside the delegate. ExecuTorch
// itself needs none of it -- it finds the backend through its registry.
//
// Every char* returned is a NUL-terminated JSON (or WGSL) string owned by the
// caller: release it with wgq4_native_free.
#pragma once

#include <cstddef>
#include <cstdint>

// The library is built with hidden visibility; these are its exported symbols.
#define WGQ4_API __attribute__((visibility("default")))

extern "C" {

// {"backend_id", "schema_version", "registered", "kernels": [registry kernel names]}
WGQ4_API char* wgq4_native_info();
// {"adapter", "timestamps", "adapter_class", "timestamp_period_ns", "max_binding_bytes", "max_workgroups_per_dim"} or {"error"}
WGQ4_API char* wgq4_native_adapter();
// Every field of a blob as this library's reader sees it (vectors as length
// and CRC-32 of their bytes), or {"error": what is wrong with it}.
WGQ4_API char* wgq4_native_describe_blob(const void* data, size_t size);
// The plan of a call (plan.h; precision: what the layer's prefill runs in, an index into kPrecisionNames):
// {"kernel" (the kernel the call runs), "m", "k_splits", "k_chunk", "partial_bytes", "dispatches":
// [[kernel name, gx, gy, gz], ...]} or {"error"}.
WGQ4_API char* wgq4_native_plan(int kernel, uint64_t m, uint32_t k, uint32_t n, uint32_t n_stride, uint32_t group_size,
                       uint32_t max_groups, int precision);
// The calls since the last take, oldest first (call_log.h), as a JSON list.
WGQ4_API char* wgq4_native_take_calls();
// The WGSL the library compiles for a registry kernel (its assembled source), or NULL.
WGQ4_API char* wgq4_native_kernel_source(const char* name);
// The floor of any delegate call's round trip: write 4 bytes, submit one
// 256-byte copy, map the copy's destination and wait, `iters` times after a
// warm-up, with the same spin-then-block poll as a call. {"median_us",
// "p10_us", "p90_us", "iters"} or {"error"}.
WGQ4_API char* wgq4_native_submit_roundtrip(int iters);
// Caps on the limits layers loaded from now on are planned against (0: none).
WGQ4_API void wgq4_native_set_limit_caps(uint64_t max_binding_bytes, uint32_t max_workgroups_per_dim);
// Graph delegates (graph mode, WGGR blobs: graph_delegate.h).
//
// Puts the state (the KV cache) of every live graph delegate in the process back
// to its value at load, as a fresh load has it: Method.reset_state() of the
// Python runtime, for programs ExecuTorch's runtime loaded. Returns how many
// delegates were reset, or -1 when one failed (logged).
WGQ4_API long executorch_wgpu_reset_state();
// ExecuTorch's own route to the same: executorch::runtime::set_option("WebGPUBackend",
// {key: value}) with one bool option; returns its Error code (0: Ok).
WGQ4_API int wgq4_native_set_backend_option(const char* key, int value);
// The C++ reader's verdict on a graph blob: {"schema_version", "symbols", "exprs",
// "checks", "buffers", "inputs", "outputs", "steps", "linears"} (counts), or
// {"error", "version": whether it is a schema version problem}.
WGQ4_API char* wgq4_native_describe_graph_blob(const void* data, size_t size);
// The last call of any graph delegate: {"dispatches", "gpu_us", "prepare_us",
// "encode_us", "wait_us", "readback_us", "wall_us"}, or null when none ran.
WGQ4_API char* wgq4_native_last_graph_call();
WGQ4_API void wgq4_native_free(char* s);
}
