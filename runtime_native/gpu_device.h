// The process-wide wgpu-native device and the compiled pipelines.
//
// The C++ twin of runtime_py/gpu.py: one adapter (high-performance) and one
// device per process, created on first use, with timestamp queries when the
// adapter has them and its full storage-binding and buffer-size limits; one
// bind group layout per registry layout and one pipeline per kernel, compiled
// on first use from the WGSL the build generated from shaders/registry.py
// (kernel_registry.h). It lives until the process exits.
//
// wgpu-native would abort the process on an error nobody captures; every
// error it reports goes to an uncaptured-error callback that logs it and
// marks the device, so a failing call returns an error status instead.
#pragma once

#include <webgpu.h>

#include <map>
#include <mutex>
#include <string>

#include "plan.h"

namespace wgq4_native {

class GpuDevice {
 public:
  WGPUInstance instance = nullptr;
  WGPUAdapter adapter = nullptr;
  WGPUDevice device = nullptr;
  WGPUQueue queue = nullptr;
  bool has_timestamps = false;
  // shader-f16 (requested whenever the adapter offers it, unless kShaderF16Env is "0"): f16 kernels can
  // run; without it a blob's f16 prefill runs in fp32 (prefill_precision_on, q4_linear.h).
  bool has_shader_f16 = false;
  int adapter_class = -1;  // the adapter's kind as blobs name it (blob_reader.h); -1: wgpu says Unknown
  Limits limits{};  // the device's own

  // The limits layers created now are planned against: the device's, lowered by
  // set_limit_caps() (tests run the split paths on small layers that way).
  Limits plan_limits() const;
  std::string adapter_name;

  // The bind group layout of a kernel (shared by kernels with the same registry
  // layout); nullptr with *error set when wgpu refuses it.
  WGPUBindGroupLayout bind_group_layout(const KernelInfo& kernel, std::string* error);
  // The pipeline of a kernel; nullptr with *error set when it does not compile.
  WGPUComputePipeline pipeline(const KernelInfo& kernel, std::string* error);
  // What a q4gsw layer binds to an output part it lacks (kQ4OutputParts[part], part >= 1; runtime_py/gpu.py
  // unused_part_buffers): one small buffer per binding, made once, which no kernel writes (store_y writes a
  // part only when its columns exist); nullptr with *error set when wgpu refuses it.
  WGPUBuffer unused_part_buffer(size_t part, std::string* error);
  static constexpr uint64_t kUnusedPartBytes = 16;

  // Runs fn inside a validation + out-of-memory error scope; returns "" or the first error wgpu reported.
  template <typename Fn>
  std::string checked(Fn&& fn) {
    push_error_scopes();
    fn();
    return pop_error_scopes();
  }

  // Waits for a callback registered with WGPUCallbackMode_AllowProcessEvents to set *done.
  void wait_for(const bool* done);

  // The state of one readback map. It must outlive a wait that gave up: its
  // callback may still run later, so callers keep it with the buffer.
  struct MapState {
    WGPUMapAsyncStatus status = WGPUMapAsyncStatus(0);  // 0 until the map completes
    std::string message;
  };
  // Maps [0, bytes) of `buffer` for reading and waits: polls without blocking
  // for a short spin (a decode call's GPU work takes tens of µs, less than a
  // blocking wait's wake-up), then blocks; gives up after 120 s instead of
  // hanging. "" when mapped, else what went wrong (the map is not held then).
  std::string map_for_reading(WGPUBuffer buffer, uint64_t bytes, MapState* state);

  // Errors wgpu reported outside any scope since the last call (empty if none).
  std::string take_uncaptured_error();
  void record_uncaptured_error(const std::string& message);

  float timestamp_period_ns = 1.0f;  // nanoseconds per timestamp tick
  std::mutex mutex;  // one GPU call at a time in the process
 private:
  void push_error_scopes();
  std::string pop_error_scopes();
  WGPUBuffer unused_parts_[kQ4OutputPartCount] = {};
  struct Layouts {
    WGPUBindGroupLayout group = nullptr;
    WGPUPipelineLayout pipeline = nullptr;
  };
  const Layouts* layouts(const KernelInfo& kernel, std::string* error);
  std::map<const WGPUBufferBindingType*, Layouts> layouts_;
  std::map<const KernelInfo*, WGPUComputePipeline> pipelines_;
  std::mutex uncaptured_mutex_;
  std::string uncaptured_;
};

// Caps on the limits layers created from now on are planned against (0: no cap).
// Caps only lower limits (runtime_py/gpu.py capped_plan_limits).
void set_limit_caps(uint64_t max_binding_bytes, uint32_t max_workgroups_per_dim);

// The shared device; nullptr with *error naming the problem (no adapter, ...).
GpuDevice* shared_gpu_device(std::string* error);

std::string to_string(WGPUStringView s);

}  // namespace wgq4_native
