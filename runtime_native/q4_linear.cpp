// See q4_linear.h.
#include "q4_linear.h"

#include <wgpu.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <map>
#include <set>

#include <executorch/runtime/platform/log.h>

namespace wgq4_native {

namespace {

using Clock = std::chrono::steady_clock;
constexpr uint64_t kTimestampBytes = 16;  // two u64 ticks
constexpr WGPUBufferUsage kStorage = WGPUBufferUsage_Storage | WGPUBufferUsage_CopyDst;

double us_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::micro>(b - a).count();
}

WGPUBuffer make_buffer(WGPUDevice device, const std::string& label, uint64_t size, WGPUBufferUsage usage) {
  WGPUBufferDescriptor desc = WGPU_BUFFER_DESCRIPTOR_INIT;
  desc.label = WGPUStringView{label.c_str(), label.size()};
  desc.size = size;
  desc.usage = usage;
  return wgpuDeviceCreateBuffer(device, &desc);
}

void release(WGPUBuffer& b) {
  if (b) wgpuBufferRelease(b);
  b = nullptr;
}

uint64_t next_pow2(uint64_t v) {
  uint64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

}  // namespace

int prefill_precision_on(const GpuDevice& gpu, const LinearBlob& blob, const Route& route, std::string* note) {
  static std::atomic<bool> logged_fallback[kPrecisionCount] = {};
  note->clear();
  const int precision = blob.prefill_precision;
  if (precision == 0) return 0;
  const std::string name = kPrecisionNames[precision];
  std::vector<Kernel> routed;
  if (route.prefill_buckets.empty()) routed.push_back(route.prefill_kernel);
  for (const RouteBucket& b : route.prefill_buckets) routed.push_back(b.kernel);
  std::map<std::string, const KernelInfo*> kernels;  // name -> its variant or nullptr, sorted as Python's sorted()
  for (Kernel k : routed) kernels[kernel_name(k)] = precision_variant(k, precision);
  std::string all, variants, runs_as;
  bool needs_shader_f16 = false;
  for (const auto& [kernel, variant] : kernels) {
    all += (all.empty() ? "" : ", ") + kernel;
    if (!variant) continue;
    variants += (variants.empty() ? "" : ", ") + kernel;
    runs_as += (runs_as.empty() ? "" : ", ") + kernel + " runs as " + variant->name;
    needs_shader_f16 = needs_shader_f16 || variant->needs_shader_f16;
  }
  if (variants.empty()) {
    *note = "; " + name + " prefill asked, but its prefill kernels (" + all + ") have no " + name + " variant: fp32";
    return 0;
  }
  if (needs_shader_f16 && !gpu.has_shader_f16) {
    if (!logged_fallback[precision].exchange(true))
      ET_LOG(Info,
             "WebGPUBackend: this program asks for %s prefill, but adapter %s lacks shader-f16: its layers' prefill "
             "runs in fp32 (route report reasons name them)",
             name.c_str(), gpu.adapter_name.c_str());
    *note = "; " + name + " prefill asked, but this adapter lacks shader-f16: " + variants + " in fp32";
    return 0;
  }
  *note = "; " + name + " prefill: " + runs_as;
  return precision;
}

std::unique_ptr<Q4LinearPart> Q4LinearPart::create(GpuDevice* gpu, const Limits& limits, const LinearBlob& blob,
                                                   uint32_t n0, uint32_t n1, std::string* error) {
  std::unique_ptr<Q4LinearPart> p(new Q4LinearPart());
  p->gpu_ = gpu;
  p->limits_ = limits;
  p->k_ = blob.in_features;
  p->group_size_ = blob.group_size;
  p->n_ = std::min(blob.out_features, n1) - n0;
  p->n_stride_ = n1 - n0;
  p->m_max_ = blob.m_max;
  std::string why;
  p->route_ = blob.route_for_adapter(gpu->adapter_class, &why);
  std::string precision_note;
  p->precision_ = prefill_precision_on(*gpu, blob, p->route_, &precision_note);
  p->name_ = (n0 == 0 && n1 == blob.n_stride) ? blob.name
                                               : blob.name + "[" + std::to_string(n0) + ":" + std::to_string(n0 + p->n_) + "]";
  const uint64_t k8 = blob.in_features / 8, groups = blob.in_features / blob.group_size;
  const uint64_t qweight_bytes = k8 * p->n_stride_ * 4, scales_bytes = groups * p->n_stride_ * 4;
  if (std::max(qweight_bytes, scales_bytes) > limits.max_binding_bytes) {
    *error = "layer " + py_repr(p->name_) + ": a " + std::to_string(std::max(qweight_bytes, scales_bytes)) +
             "-byte weight buffer exceeds the " + std::to_string(limits.max_binding_bytes) + "-byte binding limit";
    return nullptr;
  }
  std::vector<float> bias(p->n_stride_, 0.0f);
  if (blob.bias) std::copy(blob.bias + n0, blob.bias + n0 + p->n_, bias.begin());
  WGPUDevice dev = gpu->device;
  std::string problem = gpu->checked([&] {
    p->qweight_ = make_buffer(dev, p->name_ + ".qweight", qweight_bytes, kStorage);
    p->scales_ = make_buffer(dev, p->name_ + ".scales", scales_bytes, kStorage);
    p->bias_ = make_buffer(dev, p->name_ + ".bias", uint64_t(p->n_stride_) * 4, kStorage);
    p->params_ = make_buffer(dev, p->name_ + ".params", sizeof(Q4Params), WGPUBufferUsage_Uniform | WGPUBufferUsage_CopyDst);
    if (p->qweight_ && p->scales_ && p->bias_) {
      wgpuQueueWriteBuffer(gpu->queue, p->qweight_, 0, blob.qweight + uint64_t(n0) * k8, qweight_bytes);
      wgpuQueueWriteBuffer(gpu->queue, p->scales_, 0, blob.scales + uint64_t(n0) * groups, scales_bytes);
      wgpuQueueWriteBuffer(gpu->queue, p->bias_, 0, bias.data(), bias.size() * 4);
    }
    if (gpu->has_timestamps) {
      WGPUQuerySetDescriptor qd = WGPU_QUERY_SET_DESCRIPTOR_INIT;
      qd.type = WGPUQueryType_Timestamp;
      qd.count = 2;
      p->queries_ = wgpuDeviceCreateQuerySet(dev, &qd);
      p->resolve_ = make_buffer(dev, p->name_ + ".timestamps", kTimestampBytes,
                                WGPUBufferUsage_QueryResolve | WGPUBufferUsage_CopySrc);
    }
  });
  if (!problem.empty() || !p->qweight_ || !p->scales_ || !p->bias_ || !p->params_) {
    *error = "layer " + py_repr(p->name_) + ": uploading its weights failed: " + (problem.empty() ? "no buffer" : problem);
    return nullptr;
  }
  return p;
}

Q4LinearPart::~Q4LinearPart() {
  if (bind_group_) wgpuBindGroupRelease(bind_group_);
  if (queries_) wgpuQuerySetRelease(queries_);
  for (WGPUBuffer* b : {&qweight_, &scales_, &bias_, &params_, &x_, &y_, &staging_, &partial_, &resolve_}) release(*b);
}

std::string Q4LinearPart::plan(Kernel kernel, uint64_t m, const PlannedCall** out) {
  auto key = std::make_pair(int(kernel), m);
  auto found = plans_.find(key);
  if (found == plans_.end()) {
    PlannedCall call;
    std::string problem =
        plan_call(kernel, m, k_, n_, n_stride_, group_size_, limits_.max_workgroups_per_dim, &call.plan, precision_);
    if (!problem.empty()) return problem;
    for (const Dispatch& d : call.plan.dispatches) {
      WGPUComputePipeline pipeline = gpu_->pipeline(*d.kernel, &problem);
      if (!pipeline) return problem;
      call.pipelines.push_back(pipeline);
    }
    found = plans_.emplace(key, std::move(call)).first;
  }
  *out = &found->second;
  return "";
}

// Grow x/y/staging (to m rows) and the split-K scratch; rebuild the bind group when any grows.
std::string Q4LinearPart::ensure_buffers(uint64_t m, uint64_t partial_bytes) {
  WGPUDevice dev = gpu_->device;
  const uint64_t max_binding = limits_.max_binding_bytes;
  bool grown = false;
  std::string layout_problem;
  // Every q4gsw linear kernel shares gemv's layout, so one bind group serves any route.
  WGPUBindGroupLayout layout = gpu_->bind_group_layout(kernel_info(Kernel::Gemv), &layout_problem);
  WGPUBuffer unused[kQ4OutputPartCount] = {};  // the output parts a layer of its own lacks
  for (size_t p = 1; p < kQ4OutputPartCount && layout; ++p)
    if (!(unused[p] = gpu_->unused_part_buffer(p, &layout_problem))) layout = nullptr;
  std::string problem = gpu_->checked([&] {
    if (m > capacity_rows_) {
      // Room for the next power of two of rows (fewer regrowths), within the binding limit.
      const uint64_t row_bytes = uint64_t(std::max(k_, n_)) * 4;
      const uint64_t rows = std::max(std::min({next_pow2(m), m_max_, max_binding / row_bytes}), m);
      release(x_);
      release(y_);
      release(staging_);
      x_ = make_buffer(dev, name_ + ".x", rows * k_ * 4, kStorage);
      y_capacity_bytes_ = rows * n_ * 4;
      y_ = make_buffer(dev, name_ + ".y", y_capacity_bytes_, WGPUBufferUsage_Storage | WGPUBufferUsage_CopySrc);
      ts_offset_ = (y_capacity_bytes_ + 7) / 8 * 8;
      staging_ = make_buffer(dev, name_ + ".staging", ts_offset_ + kTimestampBytes,
                             WGPUBufferUsage_MapRead | WGPUBufferUsage_CopyDst);
      capacity_rows_ = rows;
      grown = true;
    }
    if (!partial_ || partial_bytes > partial_size_) {
      release(partial_);
      partial_size_ = std::max<uint64_t>(partial_bytes, 16);
      partial_ = make_buffer(dev, name_ + ".partial", partial_size_, WGPUBufferUsage_Storage);
      grown = true;
    }
    if (grown && x_ && y_ && staging_ && partial_ && layout) {
      WGPUBuffer buffers[kQ4BindingCount];
      buffers[kBindParams] = params_, buffers[kBindX] = x_, buffers[kBindQweight] = qweight_;
      buffers[kBindScales] = scales_, buffers[kBindBias] = bias_, buffers[kBindY] = y_, buffers[kBindPartial] = partial_;
      for (size_t p = 1; p < kQ4OutputPartCount; ++p) buffers[kQ4OutputParts[p]] = unused[p];
      WGPUBindGroupEntry entries[kQ4BindingCount];
      for (uint32_t i = 0; i < kQ4BindingCount; ++i) {
        entries[i] = WGPU_BIND_GROUP_ENTRY_INIT;
        entries[i].binding = i;
        entries[i].buffer = buffers[i];
        entries[i].offset = 0;
        entries[i].size = wgpuBufferGetSize(buffers[i]);
      }
      WGPUBindGroupDescriptor desc = WGPU_BIND_GROUP_DESCRIPTOR_INIT;
      desc.layout = layout;
      desc.entryCount = kQ4BindingCount;
      desc.entries = entries;
      if (bind_group_) wgpuBindGroupRelease(bind_group_);
      bind_group_ = wgpuDeviceCreateBindGroup(dev, &desc);
    }
  });
  if (!problem.empty() || !x_ || !y_ || !staging_ || !partial_ || !bind_group_) {
    capacity_rows_ = 0;  // rebuilt on the next call
    return "layer " + py_repr(name_) + ": allocating buffers for M=" + std::to_string(m) + " failed: " +
           (!problem.empty() ? problem : !layout_problem.empty() ? layout_problem : "no buffer");
  }
  return "";
}

std::string Q4LinearPart::run(const float* x, uint64_t m, float* y, uint64_t y_row_stride, CallRecord* call) {
  const Kernel kernel = route_.kernel_for(m);
  const PlannedCall* planned = nullptr;
  std::string problem = plan(kernel, m, &planned);
  const Plan* p = planned ? &planned->plan : nullptr;
  if (problem.empty()) problem = ensure_buffers(m, p->partial_bytes);
  if (!problem.empty()) return problem;
  WGPUQueue queue = gpu_->queue;
  if (params_for_[0] != m || params_for_[1] != p->k_splits || params_for_[2] != p->k_chunk) {
    const Q4Params params = q4_params(*p, k_, n_, n_stride_, group_size_);
    wgpuQueueWriteBuffer(queue, params_, 0, &params, sizeof(params));
    params_for_[0] = m, params_for_[1] = p->k_splits, params_for_[2] = p->k_chunk;
  }

  const auto t0 = Clock::now();
  wgpuQueueWriteBuffer(queue, x_, 0, x, m * k_ * 4);
  const auto t1 = Clock::now();
  WGPUCommandEncoder encoder = wgpuDeviceCreateCommandEncoder(gpu_->device, nullptr);
  WGPUPassTimestampWrites timestamps = WGPU_PASS_TIMESTAMP_WRITES_INIT;
  WGPUComputePassDescriptor pass_desc = WGPU_COMPUTE_PASS_DESCRIPTOR_INIT;
  if (queries_) {
    timestamps.querySet = queries_;
    timestamps.beginningOfPassWriteIndex = 0;
    timestamps.endOfPassWriteIndex = 1;
    pass_desc.timestampWrites = &timestamps;
  }
  WGPUComputePassEncoder pass = wgpuCommandEncoderBeginComputePass(encoder, &pass_desc);
  wgpuComputePassEncoderSetBindGroup(pass, 0, bind_group_, 0, nullptr);
  for (size_t i = 0; i < p->dispatches.size(); ++i) {
    const auto& g = p->dispatches[i].grid;
    wgpuComputePassEncoderSetPipeline(pass, planned->pipelines[i]);
    wgpuComputePassEncoderDispatchWorkgroups(pass, g[0], g[1], g[2]);
  }
  wgpuComputePassEncoderEnd(pass);
  wgpuComputePassEncoderRelease(pass);
  const uint64_t y_bytes = m * n_ * 4;
  wgpuCommandEncoderCopyBufferToBuffer(encoder, y_, 0, staging_, 0, y_bytes);
  uint64_t read_bytes = y_bytes;
  if (queries_) {
    wgpuCommandEncoderResolveQuerySet(encoder, queries_, 0, 2, resolve_, 0);
    wgpuCommandEncoderCopyBufferToBuffer(encoder, resolve_, 0, staging_, ts_offset_, kTimestampBytes);
    read_bytes = ts_offset_ + kTimestampBytes;
  }
  WGPUCommandBuffer commands = wgpuCommandEncoderFinish(encoder, nullptr);
  wgpuQueueSubmit(queue, 1, &commands);
  wgpuCommandBufferRelease(commands);
  wgpuCommandEncoderRelease(encoder);
  const auto t2 = Clock::now();

  problem = gpu_->map_for_reading(staging_, read_bytes, &map_state_);
  const auto t3 = Clock::now();
  if (!problem.empty()) return "layer " + py_repr(name_) + ": " + problem;
  const auto* bytes = static_cast<const uint8_t*>(wgpuBufferGetConstMappedRange(staging_, 0, read_bytes));
  if (!bytes) {
    wgpuBufferUnmap(staging_);
    return "layer " + py_repr(name_) + ": the mapped result is not readable";
  }
  if (y_row_stride == n_) {
    std::memcpy(y, bytes, y_bytes);
  } else {
    for (uint64_t r = 0; r < m; ++r) std::memcpy(y + r * y_row_stride, bytes + r * n_ * 4, uint64_t(n_) * 4);
  }
  call->gpu_us = -1;
  if (queries_) {
    uint64_t ticks[2];
    std::memcpy(ticks, bytes + ts_offset_, sizeof(ticks));
    if (ticks[1] >= ticks[0]) call->gpu_us = double(ticks[1] - ticks[0]) * gpu_->timestamp_period_ns / 1000.0;
  }
  wgpuBufferUnmap(staging_);
  const auto t4 = Clock::now();
  call->name = name_;
  call->m = m;
  call->k = k_;
  call->n = n_;
  call->kernel = p->runs->name;
  call->upload_us = us_between(t0, t1);
  call->submit_us = us_between(t1, t2);
  call->wait_us = us_between(t2, t3);
  call->readback_us = us_between(t3, t4);
  return "";
}

std::unique_ptr<Q4Layer> Q4Layer::create(GpuDevice* gpu, const LinearBlob& blob, std::string* error) {
  std::unique_ptr<Q4Layer> layer(new Q4Layer());
  layer->gpu_ = gpu;
  layer->limits_ = gpu->plan_limits();
  // The routes of this adapter's kind when the blob has them, else its default ones; the
  // route report says which (as runtime_py/q4_linear.py words it).
  std::string choice;
  const Route& route = blob.route_for_adapter(gpu->adapter_class, &choice);
  std::string precision_note;
  const int precision = prefill_precision_on(*gpu, blob, route, &precision_note);
  layer->info_ = LayerInfo{blob.name, blob.in_features, blob.out_features, blob.group_size, blob.n_stride,
                           blob.m_min, blob.m_max, route, blob.bias != nullptr, precision};
  std::vector<std::pair<uint32_t, uint32_t>> ranges;
  *error = column_parts(blob, layer->limits_, &ranges);
  if (!error->empty()) return nullptr;
  const std::string why = std::string(" (") + route_source_name(route.source) + ") [" + choice + "]; " + route.reason;
  layer->reasons_[0] = "M == 1: decode route" + why;
  layer->reasons_[1] = "M > 1: prefill route" + why + precision_note;
  std::lock_guard<std::mutex> lock(gpu->mutex);
  for (auto [n0, n1] : ranges) {
    auto part = Q4LinearPart::create(gpu, layer->limits_, blob, n0, n1, error);
    if (!part) return nullptr;
    layer->parts_.push_back(std::move(part));
  }
  return layer;
}

std::string Q4Layer::run(const float* x, uint64_t m, float* y, CallRecord* call) {
  const auto start = Clock::now();
  std::lock_guard<std::mutex> lock(gpu_->mutex);
  const LayerInfo& L = info_;
  auto found = rows_.find(m);
  if (found == rows_.end()) {  // planned once per M: calls at a given M repeat (decode, fixed prompts)
    uint64_t rows = 0;
    std::string problem = chunk_rows(L.name, L.in_features, L.group_size, L.route, parts_[0]->out_features(),
                                     parts_[0]->n_stride(), limits_, m, &rows, L.precision);
    if (!problem.empty()) return problem;
    found = rows_.emplace(m, rows).first;
  }
  const uint64_t rows = found->second;
  const std::string& reason = reasons_[m == 1 ? 0 : 1];
  if (parts_.size() == 1 && rows >= m) {
    std::string problem = parts_[0]->run(x, m, y, L.out_features, call);
    call->reason = reason;
    call->wall_us = us_between(start, Clock::now());
    return problem;
  }
  std::set<std::string> kernels;
  CallRecord total;
  total.gpu_us = 0;
  bool timed = true;
  for (uint64_t r0 = 0; r0 < m; r0 += rows) {
    const uint64_t chunk = std::min(rows, m - r0);
    uint64_t col = 0;
    for (auto& part : parts_) {
      CallRecord c;
      std::string problem = part->run(x + r0 * L.in_features, chunk, y + r0 * L.out_features + col, L.out_features, &c);
      if (!problem.empty()) return problem;
      col += part->out_features();
      kernels.insert(c.kernel);
      timed = timed && c.gpu_us >= 0;
      total.gpu_us += c.gpu_us;
      total.upload_us += c.upload_us;
      total.submit_us += c.submit_us;
      total.wait_us += c.wait_us;
      total.readback_us += c.readback_us;
    }
  }
  std::string joined;
  for (const auto& k : kernels) joined += (joined.empty() ? "" : "+") + k;
  *call = total;
  call->name = L.name;
  call->m = m;
  call->k = L.in_features;
  call->n = L.out_features;
  call->kernel = joined;
  if (!timed) call->gpu_us = -1;
  call->reason = reason + "; split into " + std::to_string(parts_.size()) + " column part(s) x " +
                 std::to_string((m + rows - 1) / rows) + " row chunk(s) to fit the " +
                 std::to_string(limits_.max_binding_bytes) + "-byte binding / " +
                 std::to_string(limits_.max_workgroups_per_dim) + "-workgroup limits";
  call->wall_us = us_between(start, Clock::now());
  return "";
}

}  // namespace wgq4_native
