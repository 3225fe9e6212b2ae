// See c_api.h.
#include "c_api.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "blob_reader.h"
#include "call_log.h"
#include <executorch/runtime/backend/interface.h>
#include <executorch/runtime/backend/options.h>
#include <executorch/runtime/platform/log.h>

#include "gpu_device.h"
#include "graph_delegate.h"
#include "graph_reader.h"
#include "plan.h"
#include "kernel_registry.h"

namespace wgq4_native {
bool backend_registered();  // webgpu_backend.cpp
}

using namespace wgq4_native;

namespace {

std::string quote(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          out += buf;
        } else {
          out += char(c);
        }
    }
  }
  return out + "\"";
}

char* give(const std::string& s) {
  char* out = static_cast<char*>(std::malloc(s.size() + 1));
  if (out) std::memcpy(out, s.c_str(), s.size() + 1);
  return out;
}

std::string error_json(const std::string& message) { return "{\"error\": " + quote(message) + "}"; }

std::string number(double v) {
  std::ostringstream o;
  o.precision(17);
  o << v;
  return o.str();
}

}  // namespace

extern "C" {

char* wgq4_native_info() {
  std::string kernels;
  for (int i = 0; i < kKernelCount; ++i) kernels += (i ? ", " : "") + quote(kKernels[i].name);
  return give("{\"backend_id\": " + quote(WGQ4_BACKEND_ID) + ", \"schema_version\": " +
              std::to_string(WGQ4_SCHEMA_VERSION) + ", \"registered\": " +
              (backend_registered() ? "true" : "false") + ", \"kernels\": [" + kernels + "]}");
}

char* wgq4_native_adapter() {
  std::string error;
  GpuDevice* gpu = shared_gpu_device(&error);
  if (!gpu) return give(error_json(error));
  return give("{\"adapter\": " + quote(gpu->adapter_name) + ", \"timestamps\": " +
              (gpu->has_timestamps ? "true" : "false") + ", \"adapter_class\": " +
              (gpu->adapter_class < 0 ? std::string("null") : quote(adapter_class_name(gpu->adapter_class))) +
              ", \"timestamp_period_ns\": " +
              number(gpu->timestamp_period_ns) + ", \"max_binding_bytes\": " +
              std::to_string(gpu->limits.max_binding_bytes) + ", \"max_workgroups_per_dim\": " +
              std::to_string(gpu->limits.max_workgroups_per_dim) + "}");
}

namespace {

std::string route_json(const Route& r) {
  std::string buckets;
  for (size_t i = 0; i < r.prefill_buckets.size(); ++i)
    buckets += std::string(i ? ", " : "") + "[" + std::to_string(r.prefill_buckets[i].m_max) + ", " +
               quote(kernel_name(r.prefill_buckets[i].kernel)) + "]";
  std::string s = "{\"decode_kernel\": " + quote(kernel_name(r.decode_kernel));
  s += ", \"prefill_kernel\": " + quote(kernel_name(r.prefill_kernel));
  s += ", \"source\": " + quote(route_source_name(r.source));
  s += ", \"skinny_max_m\": " + std::to_string(r.skinny_max_m);
  s += ", \"shmem_min_mn\": " + std::to_string(r.shmem_min_mn);
  s += ", \"reason\": " + quote(r.reason);
  s += ", \"table\": " + quote(r.table);
  return s + ", \"prefill_buckets\": [" + buckets + "]}";
}

}  // namespace

char* wgq4_native_describe_blob(const void* data, size_t size) {
  LinearBlob b;
  std::string problem = read_blob(data, size, &b);
  if (!problem.empty()) return give(error_json(problem));
  auto vec = [](const void* p, size_t count) {
    return "{\"length\": " + std::to_string(count) + ", \"crc32\": " + std::to_string(p ? crc32(p, count * 4) : 0) + "}";
  };
  std::string adapter_routes;
  for (size_t i = 0; i < b.adapter_routes.size(); ++i)
    adapter_routes += std::string(i ? ", " : "") + "[" + quote(adapter_class_name(b.adapter_routes[i].first)) + ", " +
                      route_json(b.adapter_routes[i].second) + "]";
  std::string s = "{";
  s += "\"schema_version\": " + std::to_string(b.schema_version);
  s += ", \"name\": " + quote(b.name);
  s += ", \"in_features\": " + std::to_string(b.in_features);
  s += ", \"out_features\": " + std::to_string(b.out_features);
  s += ", \"group_size\": " + std::to_string(b.group_size);
  s += ", \"n_stride\": " + std::to_string(b.n_stride);
  s += ", \"m_min\": " + std::to_string(b.m_min);
  s += ", \"m_max\": " + std::to_string(b.m_max);
  s += ", \"qweight\": " + vec(b.qweight, b.qweight_words);
  s += ", \"scales\": " + vec(b.scales, b.scales_count);
  s += ", \"bias\": " + (b.bias ? vec(b.bias, b.bias_count) : std::string("null"));
  s += ", \"route\": " + route_json(b.route);
  s += ", \"adapter_routes\": [" + adapter_routes + "]";
  s += ", \"prefill_precision\": " + quote(kPrecisionNames[b.prefill_precision]);
  s += ", \"checksum\": " + std::to_string(b.checksum);
  return give(s + "}");
}

char* wgq4_native_plan(int kernel, uint64_t m, uint32_t k, uint32_t n, uint32_t n_stride, uint32_t group_size,
                       uint32_t max_groups, int precision) {
  if (kernel < 0 || kernel >= kRoutableKernelCount) return give(error_json("unknown kernel " + std::to_string(kernel)));
  Plan p;
  if (precision < 0 || precision >= kPrecisionCount)
    return give(error_json("unknown precision " + std::to_string(precision)));
  std::string problem = plan_call(Kernel(kernel), m, k, n, n_stride, group_size, max_groups, &p, precision);
  if (!problem.empty()) return give(error_json(problem));
  std::string dispatches;
  for (size_t i = 0; i < p.dispatches.size(); ++i) {
    const Dispatch& d = p.dispatches[i];
    dispatches += std::string(i ? ", " : "") + "[" + quote(d.kernel->name) + ", " + std::to_string(d.grid[0]) + ", " +
                  std::to_string(d.grid[1]) + ", " + std::to_string(d.grid[2]) + "]";
  }
  return give("{\"kernel\": " + quote(p.runs->name) + ", \"m\": " + std::to_string(p.m) +
              ", \"k_splits\": " + std::to_string(p.k_splits) + ", \"k_chunk\": " + std::to_string(p.k_chunk) +
              ", \"partial_bytes\": " + std::to_string(p.partial_bytes) + ", \"dispatches\": [" + dispatches + "]}");
}

char* wgq4_native_take_calls() {
  std::string s = "[";
  bool first = true;
  for (const CallRecord& c : take_calls()) {
    s += first ? "" : ", ";
    first = false;
    s += "{\"name\": " + quote(c.name) + ", \"M\": " + std::to_string(c.m) + ", \"K\": " + std::to_string(c.k) +
         ", \"N\": " + std::to_string(c.n) + ", \"kernel\": " + quote(c.kernel) + ", \"reason\": " + quote(c.reason) +
         ", \"gpu_us\": " + (c.gpu_us < 0 ? std::string("null") : number(c.gpu_us)) +
         ", \"wall_us\": " + number(c.wall_us) + ", \"upload_us\": " + number(c.upload_us) +
         ", \"submit_us\": " + number(c.submit_us) + ", \"wait_us\": " + number(c.wait_us) +
         ", \"readback_us\": " + number(c.readback_us) + "}";
  }
  return give(s + "]");
}

char* wgq4_native_kernel_source(const char* name) {
  const KernelInfo* kernel = find_kernel(name);
  return kernel ? give(kernel->source) : nullptr;
}

char* wgq4_native_submit_roundtrip(int iters) {
  std::string error;
  GpuDevice* gpu = shared_gpu_device(&error);
  if (!gpu) return give(error_json(error));
  if (iters < 1) return give(error_json("iters must be >= 1"));
  std::lock_guard<std::mutex> lock(gpu->mutex);
  using Clock = std::chrono::steady_clock;
  WGPUBufferDescriptor desc = WGPU_BUFFER_DESCRIPTOR_INIT;
  desc.size = 256;
  desc.usage = WGPUBufferUsage_CopySrc | WGPUBufferUsage_CopyDst;
  WGPUBuffer src = wgpuDeviceCreateBuffer(gpu->device, &desc);
  desc.usage = WGPUBufferUsage_MapRead | WGPUBufferUsage_CopyDst;
  WGPUBuffer staging = wgpuDeviceCreateBuffer(gpu->device, &desc);
  const int warmup = std::min(iters, 20);
  static GpuDevice::MapState map_state;  // outlives a wait that gave up (map_for_reading)
  std::vector<double> us;
  for (int i = 0; i < warmup + iters; ++i) {
    const auto start = Clock::now();
    const uint32_t word = uint32_t(i);
    wgpuQueueWriteBuffer(gpu->queue, src, 0, &word, 4);
    WGPUCommandEncoder encoder = wgpuDeviceCreateCommandEncoder(gpu->device, nullptr);
    wgpuCommandEncoderCopyBufferToBuffer(encoder, src, 0, staging, 0, 256);
    WGPUCommandBuffer commands = wgpuCommandEncoderFinish(encoder, nullptr);
    wgpuQueueSubmit(gpu->queue, 1, &commands);
    wgpuCommandBufferRelease(commands);
    wgpuCommandEncoderRelease(encoder);
    std::string problem = gpu->map_for_reading(staging, 256, &map_state);
    if (!problem.empty()) {
      wgpuBufferRelease(src);
      wgpuBufferRelease(staging);
      return give(error_json(problem));
    }
    wgpuBufferUnmap(staging);
    if (i >= warmup) us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - start).count());
  }
  wgpuBufferRelease(src);
  wgpuBufferRelease(staging);
  std::sort(us.begin(), us.end());
  auto at = [&](double q) { return us[size_t(q * double(us.size() - 1) + 0.5)]; };
  return give("{\"median_us\": " + number(at(0.5)) + ", \"p10_us\": " + number(at(0.1)) + ", \"p90_us\": " +
              number(at(0.9)) + ", \"iters\": " + std::to_string(iters) + "}");
}

void wgq4_native_set_limit_caps(uint64_t max_binding_bytes, uint32_t max_workgroups_per_dim) {
  set_limit_caps(max_binding_bytes, max_workgroups_per_dim);
}

long executorch_wgpu_reset_state() {
  std::string problem;
  const long count = reset_all_graph_state(&problem);
  if (count < 0) ET_LOG(Error, "WebGPUBackend: reset_state failed: %s", problem.c_str());
  return count;
}

int wgq4_native_set_backend_option(const char* key, int value) {
  if (!key || std::strlen(key) >= executorch::runtime::kMaxOptionKeyLength)
    return int(executorch::runtime::Error::InvalidArgument);
  executorch::runtime::BackendOption one{};
  std::strncpy(one.key, key, executorch::runtime::kMaxOptionKeyLength - 1);
  one.value = value != 0;
  return int(executorch::runtime::set_option(WGQ4_BACKEND_ID, executorch::runtime::Span<executorch::runtime::BackendOption>(&one, 1)));
}

char* wgq4_native_describe_graph_blob(const void* data, size_t size) {
  GraphBlob g;
  bool version = false;
  std::string problem = read_graph_blob(data, size, &g, &version);
  if (!problem.empty())
    return give("{\"error\": " + quote(problem) + ", \"version\": " + (version ? "true" : "false") + "}");
  return give("{\"schema_version\": " + std::to_string(g.schema_version) + ", \"symbols\": " +
              std::to_string(g.symbols.size()) + ", \"exprs\": " + std::to_string(g.exprs.size()) +
              ", \"checks\": " + std::to_string(g.checks.size()) + ", \"buffers\": " +
              std::to_string(g.buffers.size()) + ", \"inputs\": " + std::to_string(g.inputs.size()) +
              ", \"outputs\": " + std::to_string(g.outputs.size()) + ", \"steps\": " +
              std::to_string(g.steps.size()) + ", \"linears\": " + std::to_string(g.linears.size()) + "}");
}

char* wgq4_native_last_graph_call() {
  GraphCallRecord c;
  if (!last_graph_call(&c)) return give("null");
  return give("{\"dispatches\": " + std::to_string(c.dispatches) + ", \"gpu_us\": " +
              (c.gpu_us < 0 ? std::string("null") : number(c.gpu_us)) + ", \"prepare_us\": " +
              number(c.prepare_us) + ", \"encode_us\": " + number(c.encode_us) + ", \"wait_us\": " +
              number(c.wait_us) + ", \"readback_us\": " + number(c.readback_us) + ", \"wall_us\": " +
              number(c.wall_us) + "}");
}

void wgq4_native_free(char* s) { std::free(s); }
}
