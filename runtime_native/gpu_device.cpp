// See gpu_device.h.
#include "gpu_device.h"

#include <wgpu.h>  // wgpuDevicePoll

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include <executorch/runtime/platform/log.h>

namespace wgq4_native {

namespace {

const char* kNoAdapterHelp =
    "wgpu found no GPU adapter. On a machine without a GPU install Mesa's software Vulkan driver (lavapipe): "
    "`apt-get install mesa-vulkan-drivers`; on a GPU machine check the Vulkan driver (`vulkaninfo --summary`).";

WGPUStringView view(const char* s) { return WGPUStringView{s, WGPU_STRLEN}; }

void on_uncaptured_error(WGPUDevice const*, WGPUErrorType type, WGPUStringView message, void* self, void*) {
  std::string text = to_string(message);
  ET_LOG(Error, "WebGPUBackend: wgpu error (type %d): %s", int(type), text.c_str());
  static_cast<GpuDevice*>(self)->record_uncaptured_error(text);
}

void on_device_lost(WGPUDevice const*, WGPUDeviceLostReason reason, WGPUStringView message, void*, void*) {
  if (reason != WGPUDeviceLostReason_Destroyed && reason != WGPUDeviceLostReason_CallbackCancelled)
    ET_LOG(Error, "WebGPUBackend: GPU device lost (reason %d): %s", int(reason), to_string(message).c_str());
}

// An adapter or device request in flight; its callback fills it.
template <typename Handle>
struct Pending {
  bool done = false;
  Handle handle = nullptr;
  std::string message;
};

template <typename Handle, typename Status, Status kSuccess>
void on_request_done(Status status, Handle handle, WGPUStringView message, void* pending, void*) {
  auto* p = static_cast<Pending<Handle>*>(pending);
  if (status == kSuccess) p->handle = handle;
  p->message = to_string(message);
  p->done = true;
}

std::string create_device(GpuDevice* g) {
  g->instance = wgpuCreateInstance(nullptr);
  if (!g->instance) return std::string(kNoAdapterHelp) + " (wgpuCreateInstance failed)";

  WGPURequestAdapterOptions options = WGPU_REQUEST_ADAPTER_OPTIONS_INIT;
  options.powerPreference = WGPUPowerPreference_HighPerformance;
  Pending<WGPUAdapter> adapter_request;
  WGPURequestAdapterCallbackInfo adapter_cb = WGPU_REQUEST_ADAPTER_CALLBACK_INFO_INIT;
  adapter_cb.mode = WGPUCallbackMode_AllowProcessEvents;
  adapter_cb.userdata1 = &adapter_request;
  adapter_cb.callback = on_request_done<WGPUAdapter, WGPURequestAdapterStatus, WGPURequestAdapterStatus_Success>;
  wgpuInstanceRequestAdapter(g->instance, &options, adapter_cb);
  g->wait_for(&adapter_request.done);
  if (!adapter_request.handle)
    return std::string(kNoAdapterHelp) + (adapter_request.message.empty() ? "" : " (" + adapter_request.message + ")");
  g->adapter = adapter_request.handle;

  WGPUAdapterInfo info = WGPU_ADAPTER_INFO_INIT;
  if (wgpuAdapterGetInfo(g->adapter, &info) == WGPUStatus_Success) {
    g->adapter_name = to_string(info.device) + " (" + to_string(info.description) + ")";
    // Schema enum order (blob.ADAPTER_CLASSES): discrete GPU, integrated GPU, CPU.
    g->adapter_class = info.adapterType == WGPUAdapterType_DiscreteGPU     ? 0
                       : info.adapterType == WGPUAdapterType_IntegratedGPU ? 1
                       : info.adapterType == WGPUAdapterType_CPU           ? 2
                                                                           : -1;
    wgpuAdapterInfoFreeMembers(info);
  }
  WGPULimits adapter_limits = WGPU_LIMITS_INIT;
  if (wgpuAdapterGetLimits(g->adapter, &adapter_limits) != WGPUStatus_Success)
    return "wgpu could not read the adapter's limits";
  g->has_timestamps = wgpuAdapterHasFeature(g->adapter, WGPUFeatureName_TimestampQuery);
  const char* f16_env = std::getenv(kShaderF16Env);  // "0": do not request it (runtime_py/gpu.py does the same)
  g->has_shader_f16 = wgpuAdapterHasFeature(g->adapter, WGPUFeatureName_ShaderF16) &&
                      !(f16_env && std::strcmp(f16_env, "0") == 0);

  WGPULimits required = WGPU_LIMITS_INIT;  // defaults, but the largest bindings the adapter allows
  required.maxStorageBufferBindingSize = adapter_limits.maxStorageBufferBindingSize;
  required.maxBufferSize = adapter_limits.maxBufferSize;
  std::vector<WGPUFeatureName> features;
  if (g->has_timestamps) features.push_back(WGPUFeatureName_TimestampQuery);
  if (g->has_shader_f16) features.push_back(WGPUFeatureName_ShaderF16);
  WGPUDeviceDescriptor desc = WGPU_DEVICE_DESCRIPTOR_INIT;
  desc.label = view("executorch_wgpu native");
  desc.requiredFeatureCount = features.size();
  desc.requiredFeatures = features.data();
  desc.requiredLimits = &required;
  desc.deviceLostCallbackInfo.mode = WGPUCallbackMode_AllowProcessEvents;
  desc.deviceLostCallbackInfo.callback = on_device_lost;
  desc.uncapturedErrorCallbackInfo.callback = on_uncaptured_error;
  desc.uncapturedErrorCallbackInfo.userdata1 = g;
  Pending<WGPUDevice> device_request;
  WGPURequestDeviceCallbackInfo device_cb = WGPU_REQUEST_DEVICE_CALLBACK_INFO_INIT;
  device_cb.mode = WGPUCallbackMode_AllowProcessEvents;
  device_cb.userdata1 = &device_request;
  device_cb.callback = on_request_done<WGPUDevice, WGPURequestDeviceStatus, WGPURequestDeviceStatus_Success>;
  wgpuAdapterRequestDevice(g->adapter, &desc, device_cb);
  g->wait_for(&device_request.done);
  if (!device_request.handle) return "wgpu could not create a device on " + g->adapter_name + ": " + device_request.message;
  g->device = device_request.handle;
  g->queue = wgpuDeviceGetQueue(g->device);
  if (g->has_timestamps) g->timestamp_period_ns = wgpuQueueGetTimestampPeriod(g->queue);

  WGPULimits limits = WGPU_LIMITS_INIT;
  if (wgpuDeviceGetLimits(g->device, &limits) != WGPUStatus_Success) return "wgpu could not read the device's limits";
  g->limits.max_binding_bytes = std::min<uint64_t>(limits.maxStorageBufferBindingSize, limits.maxBufferSize);
  g->limits.max_workgroups_per_dim = limits.maxComputeWorkgroupsPerDimension;
  return "";
}

std::mutex caps_mutex;
Limits caps{0, 0};

}  // namespace

void set_limit_caps(uint64_t max_binding_bytes, uint32_t max_workgroups_per_dim) {
  std::lock_guard<std::mutex> lock(caps_mutex);
  caps = Limits{max_binding_bytes, max_workgroups_per_dim};
}

Limits GpuDevice::plan_limits() const {
  std::lock_guard<std::mutex> lock(caps_mutex);
  Limits out = limits;
  if (caps.max_binding_bytes) out.max_binding_bytes = std::min(out.max_binding_bytes, caps.max_binding_bytes);
  if (caps.max_workgroups_per_dim)
    out.max_workgroups_per_dim = std::min(out.max_workgroups_per_dim, caps.max_workgroups_per_dim);
  return out;
}

std::string to_string(WGPUStringView s) {
  if (!s.data) return "";
  return s.length == WGPU_STRLEN ? std::string(s.data) : std::string(s.data, s.length);
}

void GpuDevice::wait_for(const bool* done) {
  // wgpu-native usually completes these requests inside the call; the loop
  // covers a backend that does not (and gives up rather than hang).
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (!*done && std::chrono::steady_clock::now() < deadline) {
    wgpuInstanceProcessEvents(instance);
    if (!*done) std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
}

std::string GpuDevice::map_for_reading(WGPUBuffer buffer, uint64_t bytes, MapState* state) {
  using Clock = std::chrono::steady_clock;
  *state = MapState();
  WGPUBufferMapCallbackInfo cb = WGPU_BUFFER_MAP_CALLBACK_INFO_INIT;
  cb.mode = WGPUCallbackMode_AllowProcessEvents;
  cb.userdata1 = state;
  cb.callback = [](WGPUMapAsyncStatus status, WGPUStringView message, void* u, void*) {
    static_cast<MapState*>(u)->status = status;
    static_cast<MapState*>(u)->message = to_string(message);
  };
  wgpuBufferMapAsync(buffer, WGPUMapMode_Read, 0, bytes, cb);
  const auto spin_until = Clock::now() + std::chrono::milliseconds(2);
  const auto give_up = Clock::now() + std::chrono::seconds(120);
  while (state->status == 0) {
    const auto now = Clock::now();
    if (now > give_up) return "the GPU did not finish the call within 120 s";
    wgpuDevicePoll(device, now > spin_until, nullptr);
  }
  std::string gpu_error = take_uncaptured_error();
  if (state->status != WGPUMapAsyncStatus_Success || !gpu_error.empty()) {
    if (state->status == WGPUMapAsyncStatus_Success) wgpuBufferUnmap(buffer);
    return "the GPU call failed: " + (gpu_error.empty() ? state->message : gpu_error);
  }
  return "";
}

void GpuDevice::record_uncaptured_error(const std::string& message) {
  std::lock_guard<std::mutex> lock(uncaptured_mutex_);
  if (uncaptured_.empty()) uncaptured_ = message;
}

std::string GpuDevice::take_uncaptured_error() {
  std::lock_guard<std::mutex> lock(uncaptured_mutex_);
  std::string message;
  message.swap(uncaptured_);
  return message;
}

void GpuDevice::push_error_scopes() {
  wgpuDevicePushErrorScope(device, WGPUErrorFilter_OutOfMemory);
  wgpuDevicePushErrorScope(device, WGPUErrorFilter_Validation);
}

std::string GpuDevice::pop_error_scopes() {
  struct Popped {
    bool done = false;
    std::string message;
  };
  std::string first;
  for (int i = 0; i < 2; ++i) {
    Popped popped;
    WGPUPopErrorScopeCallbackInfo cb = WGPU_POP_ERROR_SCOPE_CALLBACK_INFO_INIT;
    cb.mode = WGPUCallbackMode_AllowProcessEvents;
    cb.userdata1 = &popped;
    cb.callback = [](WGPUPopErrorScopeStatus status, WGPUErrorType type, WGPUStringView message, void* u, void*) {
      auto* p = static_cast<Popped*>(u);
      if (status == WGPUPopErrorScopeStatus_Success && type != WGPUErrorType_NoError)
        p->message = "wgpu error: " + to_string(message);
      p->done = true;
    };
    wgpuDevicePopErrorScope(device, cb);
    wait_for(&popped.done);
    if (first.empty()) first = popped.message;
  }
  return first;
}

const GpuDevice::Layouts* GpuDevice::layouts(const KernelInfo& kernel, std::string* error) {
  auto found = layouts_.find(kernel.layout);
  if (found != layouts_.end()) return &found->second;
  std::vector<WGPUBindGroupLayoutEntry> entries(kernel.binding_count);
  for (int i = 0; i < kernel.binding_count; ++i) {
    entries[i] = WGPU_BIND_GROUP_LAYOUT_ENTRY_INIT;
    entries[i].binding = uint32_t(i);
    entries[i].visibility = WGPUShaderStage_Compute;
    entries[i].buffer.type = kernel.layout[i];
  }
  Layouts made;
  std::string problem = checked([&] {
    WGPUBindGroupLayoutDescriptor bgl = WGPU_BIND_GROUP_LAYOUT_DESCRIPTOR_INIT;
    bgl.label = view(kernel.name);
    bgl.entryCount = entries.size();
    bgl.entries = entries.data();
    made.group = wgpuDeviceCreateBindGroupLayout(device, &bgl);
    WGPUPipelineLayoutDescriptor pl = WGPU_PIPELINE_LAYOUT_DESCRIPTOR_INIT;
    pl.label = view(kernel.name);
    pl.bindGroupLayoutCount = 1;
    pl.bindGroupLayouts = &made.group;
    made.pipeline = wgpuDeviceCreatePipelineLayout(device, &pl);
  });
  if (!problem.empty() || !made.group || !made.pipeline) {
    *error = std::string("the bind group layout of ") + kernel.name + " is refused on " + adapter_name + ": " + problem;
    return nullptr;
  }
  return &(layouts_[kernel.layout] = made);
}

WGPUBindGroupLayout GpuDevice::bind_group_layout(const KernelInfo& kernel, std::string* error) {
  const Layouts* l = layouts(kernel, error);
  return l ? l->group : nullptr;
}

WGPUComputePipeline GpuDevice::pipeline(const KernelInfo& kernel, std::string* error) {
  auto found = pipelines_.find(&kernel);
  if (found != pipelines_.end()) return found->second;
  const Layouts* layout = layouts(kernel, error);
  if (!layout) return nullptr;
  const char* file = kernel.wgsl_file;
  WGPUComputePipeline pipeline = nullptr;
  std::string problem = checked([&] {
    WGPUShaderSourceWGSL wgsl = WGPU_SHADER_SOURCE_WGSL_INIT;
    wgsl.code = view(kernel.source);
    WGPUShaderModuleDescriptor module_desc = WGPU_SHADER_MODULE_DESCRIPTOR_INIT;
    module_desc.nextInChain = &wgsl.chain;
    module_desc.label = view(file);
    WGPUShaderModule module = wgpuDeviceCreateShaderModule(device, &module_desc);
    WGPUComputePipelineDescriptor desc = WGPU_COMPUTE_PIPELINE_DESCRIPTOR_INIT;
    desc.label = view(kernel.name);
    desc.layout = layout->pipeline;
    desc.compute.module = module;
    desc.compute.entryPoint = view("main");
    pipeline = wgpuDeviceCreateComputePipeline(device, &desc);
    wgpuShaderModuleRelease(module);
  });
  if (!problem.empty() || !pipeline) {
    *error = std::string("shaders/") + file + " does not compile on " + adapter_name + ": " + problem;
    if (pipeline) wgpuComputePipelineRelease(pipeline);
    return nullptr;
  }
  pipelines_[&kernel] = pipeline;
  return pipeline;
}

WGPUBuffer GpuDevice::unused_part_buffer(size_t part, std::string* error) {
  if (!unused_parts_[part]) {
    std::string problem = checked([&] {
      WGPUBufferDescriptor desc = WGPU_BUFFER_DESCRIPTOR_INIT;
      desc.label = view("unused output part");
      desc.size = kUnusedPartBytes;
      desc.usage = WGPUBufferUsage_Storage;
      unused_parts_[part] = wgpuDeviceCreateBuffer(device, &desc);
    });
    if (!problem.empty() || !unused_parts_[part]) {
      *error = "allocating a placeholder output buffer failed: " + problem;
      if (unused_parts_[part]) wgpuBufferRelease(unused_parts_[part]);
      unused_parts_[part] = nullptr;
      return nullptr;
    }
  }
  return unused_parts_[part];
}

GpuDevice* shared_gpu_device(std::string* error) {
  static std::mutex creation;
  static GpuDevice* device = nullptr;
  static std::string failure;
  std::lock_guard<std::mutex> lock(creation);
  if (!device && failure.empty()) {
    auto* g = new GpuDevice();
    failure = create_device(g);
    if (failure.empty()) {
      device = g;
      ET_LOG(Info, "WebGPUBackend: using adapter %s (timestamps: %s, %g ns per tick, shader-f16: %s)",
             g->adapter_name.c_str(), g->has_timestamps ? "yes" : "no", double(g->timestamp_period_ns),
             g->has_shader_f16 ? "yes" : "no");
    }
    // On failure g is leaked on purpose: wgpu objects it may hold are not safe to release half-made.
  }
  if (!device) *error = failure;
  return device;
}

}  // namespace wgq4_native
