// One q4gsw linear layer on the GPU: weights uploaded once at init, one
// submit per call.
//
// The C++ twin of runtime_py/q4_linear.py (Q4LinearGPU: a layer, or a column
// part of one, within the device's limits) and runtime_py/split_linear.py
// (Q4Layer: splits a layer beyond one binding or grid over N into parts and
// over M into row chunks). A call writes x and, when they change, the
// kernel parameters; records one compute pass with the kernel the blob routes
// this M to; copies y and the pass's timestamps into one staging buffer;
// submits once and maps once.
#pragma once

#include <webgpu.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "blob_reader.h"
#include "call_log.h"
#include "gpu_device.h"
#include "plan.h"

namespace wgq4_native {

// The precision (an index into kPrecisionNames) a layer's prefill runs in on this device: the blob's, where a
// prefill kernel of its route has a variant in it and the device has the variant's features (f16: shader-f16);
// else fp32 (0). *note: what its route-report reason adds; a missing feature is also logged once per process.
// The twin of runtime_py/q4_linear.py prefill_precision_on (same words).
int prefill_precision_on(const GpuDevice& gpu, const LinearBlob& blob, const Route& route, std::string* note);

// A layer's shape and route: the blob minus its payload (freed after upload).
struct LayerInfo {
  std::string name;
  uint32_t in_features, out_features, group_size, n_stride;
  uint64_t m_min, m_max;
  Route route;
  bool has_bias;
  int precision;  // what its prefill runs in (prefill_precision_on)
};

class Q4LinearPart {
 public:
  // Columns [n0, n1) of the layer in `blob` (multiples of 16), uploaded.
  static std::unique_ptr<Q4LinearPart> create(GpuDevice* gpu, const Limits& limits, const LinearBlob& blob,
                                              uint32_t n0, uint32_t n1, std::string* error);
  ~Q4LinearPart();
  Q4LinearPart(const Q4LinearPart&) = delete;
  Q4LinearPart& operator=(const Q4LinearPart&) = delete;

  // y[r * y_row_stride + j] = row r of x @ dequant(W[:, n0 + j])^T + b for r < m, j < out_features.
  std::string run(const float* x, uint64_t m, float* y, uint64_t y_row_stride, CallRecord* call);

  uint32_t out_features() const { return n_; }
  uint32_t n_stride() const { return n_stride_; }

 private:
  Q4LinearPart() = default;
  // A plan with the pipelines of its dispatches, made once per (kernel, M).
  struct PlannedCall {
    Plan plan;
    std::vector<WGPUComputePipeline> pipelines;
  };
  std::string plan(Kernel kernel, uint64_t m, const PlannedCall** out);
  std::string ensure_buffers(uint64_t m, uint64_t partial_bytes);

  GpuDevice* gpu_ = nullptr;
  Limits limits_{};
  std::string name_;
  uint32_t k_ = 0, n_ = 0, n_stride_ = 0, group_size_ = 0;
  uint64_t m_max_ = 0;
  Route route_;
  int precision_ = 0;  // prefill_precision_on
  WGPUBuffer qweight_ = nullptr, scales_ = nullptr, bias_ = nullptr, params_ = nullptr;
  WGPUBuffer x_ = nullptr, y_ = nullptr, staging_ = nullptr, partial_ = nullptr, resolve_ = nullptr;
  WGPUQuerySet queries_ = nullptr;
  WGPUBindGroup bind_group_ = nullptr;
  uint64_t capacity_rows_ = 0, partial_size_ = 0, y_capacity_bytes_ = 0, ts_offset_ = 0;
  uint64_t params_for_[3] = {0, 0, 0};  // the (M, k_splits, k_chunk) params_ holds
  std::map<std::pair<int, uint64_t>, PlannedCall> plans_;
  GpuDevice::MapState map_state_;  // the readback's; kept here, see map_for_reading
};

class Q4Layer {
 public:
  static std::unique_ptr<Q4Layer> create(GpuDevice* gpu, const LinearBlob& blob, std::string* error);

  // y (m x N, row-major) = x (m x K) @ dequant(W)^T + b; fills *call.
  std::string run(const float* x, uint64_t m, float* y, CallRecord* call);

  const LayerInfo& info() const { return info_; }

 private:
  GpuDevice* gpu_ = nullptr;
  Limits limits_{};
  LayerInfo info_;
  std::vector<std::unique_ptr<Q4LinearPart>> parts_;
  std::map<uint64_t, uint64_t> rows_;  // M -> rows per chunk, planned once per M
  std::string reasons_[2];             // route-report reason of a decode (M == 1) and a prefill call
};

}  // namespace wgq4_native
