// See graph_delegate.h. Load and call follow runtime_py/graph_delegate.py step for step.
#include "graph_delegate.h"

#include <executorch/runtime/core/exec_aten/util/tensor_util.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <mutex>
#include <set>

#include "call_log.h"
#include "q4_linear.h"  // prefill_precision_on
#include "kernel_params.h"

namespace wgq4_native {

namespace {

using executorch::aten::ScalarType;
using executorch::aten::SizesType;
using executorch::aten::Tensor;
using executorch::runtime::ArrayRef;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::FreeableBuffer;
using executorch::runtime::NamedDataMap;
using executorch::runtime::Result;
using executorch::runtime::Span;
using Clock = std::chrono::steady_clock;

constexpr uint64_t kSlotBytes = 256;  // one step's Params: WebGPU's minUniformBufferOffsetAlignment
constexpr size_t kSlotWords = kSlotBytes / 4;
constexpr uint64_t kTimestampBytes = 16;
constexpr WGPUBufferUsage kUsage = WGPUBufferUsage_Storage | WGPUBufferUsage_CopyDst | WGPUBufferUsage_CopySrc;
const char* const kWho = "graph delegate: ";

Status fail(Error error, const std::string& message) { return Status{error, kWho + message}; }

double us_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::micro>(b - a).count();
}

uint64_t round_up(uint64_t v, uint64_t to) { return (v + to - 1) / to * to; }

WGPUBuffer make_buffer(WGPUDevice device, const std::string& label, uint64_t size, WGPUBufferUsage usage) {
  WGPUBufferDescriptor desc = WGPU_BUFFER_DESCRIPTOR_INIT;
  desc.label = WGPUStringView{label.c_str(), label.size()};
  desc.size = size;
  desc.usage = usage;
  return wgpuDeviceCreateBuffer(device, &desc);
}

// A shape as Python prints a tuple: (), (5,), (1, 5).
template <typename Sizes>
std::string tuple_repr(const Sizes& sizes, size_t n) {
  std::string s = "(";
  for (size_t i = 0; i < n; ++i) s += (i ? ", " : "") + std::to_string(int64_t(sizes[i]));
  return s + (n == 1 ? ",)" : ")");
}

std::string shape_repr(const Tensor& t) {
  std::vector<int64_t> sizes;
  for (ssize_t i = 0; i < t.dim(); ++i) sizes.push_back(t.size(i));
  return tuple_repr(sizes, sizes.size());
}

ScalarType scalar_type_of(GraphDType d) {
  switch (d) {
    case GraphDType::F32: return ScalarType::Float;
    case GraphDType::I32: return ScalarType::Int;
    case GraphDType::I64: return ScalarType::Long;
    default: return ScalarType::Bool;
  }
}

// Every live graph delegate, for reset_all_graph_state.
std::mutex live_mutex;
std::set<GraphDelegate*> live;

std::mutex last_call_mutex;
bool have_last_call = false;
GraphCallRecord last_call_record;

}  // namespace

std::unique_ptr<GraphDelegate> GraphDelegate::create(GpuDevice* gpu, GraphBlob blob, const NamedDataMap* named_data,
                                                     Status* status) {
  std::unique_ptr<GraphDelegate> g(new GraphDelegate());
  g->gpu_ = gpu;
  g->limits_ = gpu->plan_limits();
  g->blob_ = std::move(blob);
  {
    std::lock_guard<std::mutex> lock(gpu->mutex);
    *status = g->load(named_data);
  }
  if (!status->ok()) return nullptr;
  std::string problem = g->reset_state();
  if (!problem.empty()) {
    *status = fail(Error::Internal, "setting its state failed: " + problem);
    return nullptr;
  }
  std::lock_guard<std::mutex> lock(live_mutex);
  live.insert(g.get());
  return g;
}

GraphDelegate::~GraphDelegate() {
  {
    std::lock_guard<std::mutex> lock(live_mutex);
    live.erase(this);
  }
  for (WGPUBindGroup b : bind_groups_)
    if (b) wgpuBindGroupRelease(b);
  for (Linear& lin : linears_) {
    if (lin.bind_group) wgpuBindGroupRelease(lin.bind_group);
    for (WGPUBuffer b : {lin.qweight, lin.scales, lin.bias})
      if (b) wgpuBufferRelease(b);
  }
  for (WGPUBuffer b : buffers_)
    if (b) wgpuBufferRelease(b);
  for (WGPUBuffer b : {uniform_, scratch_, staging_, resolve_})
    if (b) wgpuBufferRelease(b);
  if (queries_) wgpuQuerySetRelease(queries_);
}

// The bytes of named data `key`, handed to `use` while the program's buffer is held.
static Status with_named_data(const NamedDataMap* named_data, const std::string& key, const std::string& what,
                              const std::function<Status(const uint8_t*, size_t)>& use) {
  if (!named_data)
    return fail(Error::InvalidProgram, what + " needs named data " + py_repr(key) + ", which the program lacks");
  Result<FreeableBuffer> found = named_data->get_data(key.c_str());
  if (!found.ok())
    return fail(Error::InvalidProgram, what + " needs named data " + py_repr(key) + ", which the program lacks");
  FreeableBuffer buffer = std::move(found.get());
  Status status = use(static_cast<const uint8_t*>(buffer.data()), buffer.size());
  buffer.Free();
  return status;
}

Status GraphDelegate::load(const NamedDataMap* named_data) {
  const GraphBlob& g = blob_;
  WGPUDevice dev = gpu_->device;
  // What this runtime runs: float32 outputs, float32 and integer inputs (as Python's runtime).
  for (size_t i = 0; i < g.inputs.size(); ++i)
    if (g.inputs[i].dtype == GraphDType::Bool)
      return fail(Error::NotSupported, "input " + std::to_string(i) + " (" + g.inputs[i].name +
                                           ") is bool; this runtime takes f32, i32 and i64 inputs");
  for (size_t i = 0; i < g.outputs.size(); ++i)
    if (g.outputs[i].dtype != GraphDType::F32)
      return fail(Error::NotSupported, "output " + std::to_string(i) + " (" + g.outputs[i].name + ") is " +
                                           dtype_name(g.outputs[i].dtype) + "; this runtime returns f32 outputs");
  for (const GraphStep& st : g.steps)
    if (st.linear < 0 && st.params.size() > kSlotWords)
      return fail(Error::NotSupported, "step " + py_repr(st.node) + ": kernel " + st.kernel + " has " +
                                           std::to_string(st.params.size()) + " params, more than a " +
                                           std::to_string(kSlotBytes) + "-byte uniform slot holds");

  // Buffers: constants and the initial state from named data, the rest zeros.
  for (size_t i = 0; i < g.buffers.size(); ++i) {
    const GraphBuffer& b = g.buffers[i];
    const uint64_t size = std::max<uint64_t>(16, round_up(b.bytes, 16));
    if (b.bytes > limits_.max_binding_bytes)
      return fail(Error::NotSupported, "buffer " + py_repr(b.name) + " of " + std::to_string(b.bytes) +
                                           " bytes exceeds this adapter's " +
                                           std::to_string(limits_.max_binding_bytes) + "-byte binding limit");
    WGPUBuffer buffer = nullptr;
    std::string problem = gpu_->checked([&] { buffer = make_buffer(dev, b.name, size, kUsage); });
    if (!problem.empty() || !buffer) {
      if (buffer) wgpuBufferRelease(buffer);
      return fail(Error::MemoryAllocationFailed,
                  "allocating buffer " + py_repr(b.name) + " (" + std::to_string(size) + " bytes) failed: " + problem);
    }
    buffers_.push_back(buffer);
    sizes_.push_back(size);
    const bool has_data = b.kind == BufferKind::Constant || (b.kind == BufferKind::State && !b.data_key.empty());
    std::vector<uint8_t> initial;
    if (has_data) {
      Status status = with_named_data(named_data, b.data_key, b.name, [&](const uint8_t* data, size_t n) -> Status {
        if (n != b.bytes)
          return fail(Error::InvalidProgram, "named data " + py_repr(b.data_key) + " of " + b.name + " holds " +
                                                 std::to_string(n) + " bytes, the blob expects " +
                                                 std::to_string(b.bytes));
        if (b.kind == BufferKind::State) {
          initial.assign(data, data + n);
          initial.resize(size, 0);
        } else {
          std::vector<uint8_t> padded;
          const uint8_t* src = data;
          uint64_t bytes = n / 4 * 4;
          if (n % 4) {  // writes are whole words; the buffer's tail is zeros already
            padded.assign(data, data + n);
            padded.resize(round_up(n, 4), 0);
            src = padded.data();
            bytes = padded.size();
          }
          if (bytes) wgpuQueueWriteBuffer(gpu_->queue, buffer, 0, src, bytes);
        }
        return Status{};
      });
      if (!status.ok()) return status;
    }
    if (b.kind == BufferKind::State) state_.emplace_back(i, std::move(initial));
  }

  // One uniform slot per step, in step order.
  const uint64_t uniform_size = std::max<size_t>(1, g.steps.size()) * kSlotBytes;
  std::string problem = gpu_->checked([&] {
    uniform_ = make_buffer(dev, "graph params", uniform_size, WGPUBufferUsage_Uniform | WGPUBufferUsage_CopyDst);
  });
  if (!problem.empty() || !uniform_) return fail(Error::MemoryAllocationFailed, "allocating its params failed: " + problem);
  params_.assign(std::max<size_t>(1, g.steps.size()) * kSlotWords, 0);

  // Kernel steps: a pipeline and a bind group each; linears: weights uploaded, bind groups built below.
  pipelines_.assign(g.steps.size(), nullptr);
  bind_groups_.assign(g.steps.size(), nullptr);
  for (size_t s = 0; s < g.steps.size(); ++s) {
    const GraphStep& st = g.steps[s];
    if (st.linear >= 0) {
      const GraphLinear& gl = g.linears[size_t(st.linear)];
      const std::string what = "linear " + st.node;
      Linear lin;
      lin.step = s;
      lin.x = gl.x, lin.m = gl.m;
      Status status = with_named_data(named_data, gl.blob_key, what, [&](const uint8_t* data, size_t n) -> Status {
        std::vector<uint64_t> aligned;  // the verifier reads the blob in place, 8-byte aligned
        const void* at = data;
        if (reinterpret_cast<uintptr_t>(data) % 8 != 0) {
          aligned.resize((n + 7) / 8);
          std::memcpy(aligned.data(), data, n);
          at = aligned.data();
        }
        LinearBlob lb;
        std::string why = read_blob(at, n, &lb);
        if (!why.empty())
          return fail(why.find("schema version") != std::string::npos ? Error::DelegateInvalidCompatibility
                                                                      : Error::InvalidProgram,
                      what + ": " + why);
        lin.name = lb.name;
        lin.k = lb.in_features, lin.n = lb.out_features, lin.n_stride = lb.n_stride, lin.group_size = lb.group_size;
        // Its outputs: a fused linear's parts, else y with all N columns, named as the layer.
        lin.parts = gl.parts.empty() ? std::vector<GraphLinearPart>{{gl.y, lb.out_features, lb.name}} : gl.parts;
        uint64_t columns = 0;
        std::string listed;
        for (const GraphLinearPart& p : lin.parts) {
          columns += p.columns;
          listed += (listed.empty() ? "" : ", ") + std::to_string(p.columns);
          if (!gl.parts.empty()) lin.part_columns.push_back(p.columns);
        }
        if (columns != lb.out_features)
          return fail(Error::InvalidProgram, "linear " + py_repr(lb.name) + " has parts of [" + listed +
                                                 "] columns, its blob " + std::to_string(lb.out_features));
        std::string choice;
        lin.route = lb.route_for_adapter(gpu_->adapter_class, &choice);
        std::string precision_note;
        lin.precision = prefill_precision_on(*gpu_, lb, lin.route, &precision_note);
        const std::string routed = std::string(" (") + route_source_name(lin.route.source) + ") [" + choice + "]; " +
                                   lin.route.reason;
        const std::string fused = gl.parts.empty() ? "" : "; fused: one layer " + lb.name;
        lin.reasons[0] = "M == 1: decode route" + routed + fused;
        lin.reasons[1] = "M > 1: prefill route" + routed + precision_note + fused;
        const uint64_t qweight_bytes = uint64_t(lb.qweight_words) * 4, scales_bytes = uint64_t(lb.scales_count) * 4;
        const uint64_t largest = std::max(qweight_bytes, scales_bytes);
        if (largest > limits_.max_binding_bytes)
          return fail(Error::NotSupported,
                      "layer " + py_repr(lb.name) + ": a " + std::to_string(largest) +
                          "-byte weight buffer exceeds this adapter's " + std::to_string(limits_.max_binding_bytes) +
                          "-byte binding limit; export with WebGPUPartitioner(linears_only=True), which splits such layers");
        std::vector<float> bias(lb.n_stride, 0.0f);
        if (lb.bias) std::copy(lb.bias, lb.bias + lb.bias_count, bias.begin());
        std::string problem = gpu_->checked([&] {
          lin.qweight = make_buffer(dev, lb.name + ".qweight", qweight_bytes, kUsage);
          lin.scales = make_buffer(dev, lb.name + ".scales", scales_bytes, kUsage);
          lin.bias = make_buffer(dev, lb.name + ".bias", bias.size() * 4, kUsage);
          if (lin.qweight && lin.scales && lin.bias) {
            wgpuQueueWriteBuffer(gpu_->queue, lin.qweight, 0, lb.qweight, qweight_bytes);
            wgpuQueueWriteBuffer(gpu_->queue, lin.scales, 0, lb.scales, scales_bytes);
            wgpuQueueWriteBuffer(gpu_->queue, lin.bias, 0, bias.data(), bias.size() * 4);
          }
        });
        if (!problem.empty() || !lin.qweight || !lin.scales || !lin.bias)
          return fail(Error::MemoryAllocationFailed, "layer " + py_repr(lb.name) + ": uploading its weights failed: " +
                                                         (problem.empty() ? "no buffer" : problem));
        return Status{};
      });
      linears_.push_back(std::move(lin));  // released by the destructor even when the upload failed
      if (!status.ok()) return status;
      continue;
    }
    const KernelInfo& k = *st.info;
    std::string why;
    WGPUComputePipeline pipeline = gpu_->pipeline(k, &why);
    WGPUBindGroupLayout layout = pipeline ? gpu_->bind_group_layout(k, &why) : nullptr;
    if (!pipeline || !layout) return fail(Error::NotSupported, "step " + py_repr(st.node) + ": " + why);
    std::vector<WGPUBindGroupEntry> entries(size_t(k.binding_count));
    for (size_t i = 0; i < entries.size(); ++i) {
      entries[i] = WGPU_BIND_GROUP_ENTRY_INIT;
      entries[i].binding = uint32_t(i);
      if (k.layout[i] == WGPUBufferBindingType_Uniform) {
        entries[i].buffer = uniform_;
        entries[i].offset = s * kSlotBytes;
        entries[i].size = kSlotBytes;
      } else {
        entries[i].buffer = buffers_[st.bindings[i]];
        entries[i].offset = 0;
        entries[i].size = sizes_[st.bindings[i]];
      }
    }
    WGPUBindGroup group = nullptr;
    problem = gpu_->checked([&] {
      WGPUBindGroupDescriptor desc = WGPU_BIND_GROUP_DESCRIPTOR_INIT;
      desc.label = WGPUStringView{st.node.c_str(), st.node.size()};
      desc.layout = layout;
      desc.entryCount = entries.size();
      desc.entries = entries.data();
      group = wgpuDeviceCreateBindGroup(dev, &desc);
    });
    bind_groups_[s] = group;
    if (!problem.empty() || !group)
      return fail(Error::InvalidProgram, "step " + py_repr(st.node) + ": its bind group is refused: " + problem);
    pipelines_[s] = pipeline;
  }
  problem = build_linear_bind_groups(16);
  if (!problem.empty()) return fail(Error::Internal, problem);

  // Staging: every output at a 256-byte offset, then the pass's timestamps.
  uint64_t total = 0;
  for (const GraphIO& o : g.outputs) {
    output_offsets_.push_back(total);
    total += round_up(g.buffers[o.buffer].bytes, 256);
  }
  ts_offset_ = std::max<uint64_t>(total, 256);
  problem = gpu_->checked([&] {
    staging_ = make_buffer(dev, "graph outputs", ts_offset_ + kTimestampBytes,
                           WGPUBufferUsage_MapRead | WGPUBufferUsage_CopyDst);
    if (gpu_->has_timestamps) {
      WGPUQuerySetDescriptor qd = WGPU_QUERY_SET_DESCRIPTOR_INIT;
      qd.type = WGPUQueryType_Timestamp;
      qd.count = 2;
      queries_ = wgpuDeviceCreateQuerySet(dev, &qd);
      resolve_ = make_buffer(dev, "graph timestamps", kTimestampBytes,
                             WGPUBufferUsage_QueryResolve | WGPUBufferUsage_CopySrc);
    }
  });
  if (!problem.empty() || !staging_)
    return fail(Error::MemoryAllocationFailed, "allocating its output staging failed: " + problem);
  grids_.assign(g.steps.size(), {0, 0, 0});
  converted_.resize(g.inputs.size());
  input_data_.resize(g.inputs.size());
  symbols_.resize(g.symbols.size());
  return Status{};
}

// (Re)builds the linears' bind groups around a scratch buffer (split-K sums, int8 activations) of at least
// scratch_bytes.
std::string GraphDelegate::build_linear_bind_groups(uint64_t scratch_bytes) {
  if (linears_.empty()) return "";
  WGPUDevice dev = gpu_->device;
  std::string why;
  // Every q4gsw linear kernel shares gemv's layout, so one bind group serves any route.
  WGPUBindGroupLayout layout = gpu_->bind_group_layout(kernel_info(Kernel::Gemv), &why);
  if (!layout) return why;
  WGPUBuffer unused[kQ4OutputPartCount] = {};
  for (size_t p = 1; p < kQ4OutputPartCount; ++p)
    if (!(unused[p] = gpu_->unused_part_buffer(p, &why))) return why;
  const uint64_t size = std::max<uint64_t>(16, scratch_bytes);
  WGPUBuffer scratch = nullptr;
  std::vector<WGPUBindGroup> groups(linears_.size(), nullptr);
  std::string problem = gpu_->checked([&] {
    scratch = make_buffer(dev, "linear scratch", size, WGPUBufferUsage_Storage);
    if (!scratch) return;
    for (size_t l = 0; l < linears_.size(); ++l) {
      const Linear& lin = linears_[l];
      WGPUBuffer buffers[kQ4BindingCount];
      uint64_t sizes[kQ4BindingCount];
      buffers[kBindParams] = uniform_, sizes[kBindParams] = kSlotBytes;
      buffers[kBindX] = buffers_[lin.x], sizes[kBindX] = sizes_[lin.x];
      buffers[kBindQweight] = lin.qweight, sizes[kBindQweight] = wgpuBufferGetSize(lin.qweight);
      buffers[kBindScales] = lin.scales, sizes[kBindScales] = wgpuBufferGetSize(lin.scales);
      buffers[kBindBias] = lin.bias, sizes[kBindBias] = wgpuBufferGetSize(lin.bias);
      buffers[kBindPartial] = scratch, sizes[kBindPartial] = size;
      for (size_t p = 0; p < kQ4OutputPartCount; ++p) {  // a part it lacks: a placeholder no kernel writes
        const uint32_t at = kQ4OutputParts[p];
        buffers[at] = p < lin.parts.size() ? buffers_[lin.parts[p].y] : unused[p];
        sizes[at] = p < lin.parts.size() ? sizes_[lin.parts[p].y] : GpuDevice::kUnusedPartBytes;
      }
      WGPUBindGroupEntry entries[kQ4BindingCount];
      for (uint32_t i = 0; i < kQ4BindingCount; ++i) {
        entries[i] = WGPU_BIND_GROUP_ENTRY_INIT;
        entries[i].binding = i;
        entries[i].buffer = buffers[i];
        entries[i].offset = i == kBindParams ? lin.step * kSlotBytes : 0;
        entries[i].size = sizes[i];
      }
      WGPUBindGroupDescriptor desc = WGPU_BIND_GROUP_DESCRIPTOR_INIT;
      desc.label = WGPUStringView{lin.name.c_str(), lin.name.size()};
      desc.layout = layout;
      desc.entryCount = kQ4BindingCount;
      desc.entries = entries;
      groups[l] = wgpuDeviceCreateBindGroup(dev, &desc);
    }
  });
  const bool made = problem.empty() && scratch && std::all_of(groups.begin(), groups.end(), [](auto g) { return g; });
  if (!made) {
    for (WGPUBindGroup g : groups)
      if (g) wgpuBindGroupRelease(g);
    if (scratch) wgpuBufferRelease(scratch);
    return "building the linears' bind groups (split-K scratch of " + std::to_string(size) + " bytes) failed: " +
           (problem.empty() ? "no buffer" : problem);
  }
  for (size_t l = 0; l < linears_.size(); ++l) {
    if (linears_[l].bind_group) wgpuBindGroupRelease(linears_[l].bind_group);
    linears_[l].bind_group = groups[l];
  }
  if (scratch_) wgpuBufferRelease(scratch_);
  scratch_ = scratch;
  scratch_size_ = size;
  return "";
}

std::string GraphDelegate::plan_linear(Linear& lin, uint64_t m, const PlannedCall** out) {
  auto found = lin.plans.find(m);
  if (found == lin.plans.end()) {
    PlannedCall call;
    std::string problem = plan_call(lin.route.kernel_for(m), m, lin.k, lin.n, lin.n_stride, lin.group_size,
                                    limits_.max_workgroups_per_dim, &call.plan, lin.precision);
    if (!problem.empty()) return "layer " + py_repr(lin.name) + ": " + problem;
    for (const wgq4_native::Dispatch& d : call.plan.dispatches) {
      WGPUComputePipeline pipeline = gpu_->pipeline(*d.kernel, &problem);
      if (!pipeline) return problem;
      call.pipelines.push_back(pipeline);
    }
    found = lin.plans.emplace(m, std::move(call)).first;
  }
  *out = &found->second;
  return "";
}

std::string GraphDelegate::reset_state() {
  std::lock_guard<std::mutex> lock(gpu_->mutex);
  return gpu_->checked([&] {
    WGPUCommandEncoder encoder = wgpuDeviceCreateCommandEncoder(gpu_->device, nullptr);
    for (const auto& [i, data] : state_)
      if (data.empty()) wgpuCommandEncoderClearBuffer(encoder, buffers_[i], 0, WGPU_WHOLE_SIZE);
    WGPUCommandBuffer commands = wgpuCommandEncoderFinish(encoder, nullptr);
    wgpuQueueSubmit(gpu_->queue, 1, &commands);
    wgpuCommandBufferRelease(commands);
    wgpuCommandEncoderRelease(encoder);
    for (const auto& [i, data] : state_)
      if (!data.empty()) wgpuQueueWriteBuffer(gpu_->queue, buffers_[i], 0, data.data(), data.size());
  });
}

// Symbols, expressions, checks, input shapes and values: what Python's execute checks
// before any GPU work, in its order. Fills values_ and input_data_.
Status GraphDelegate::read_inputs(Span<EValue*> args) {
  const GraphBlob& g = blob_;
  for (size_t i = 0; i < g.inputs.size(); ++i) {
    const GraphIO& io = g.inputs[i];
    const Tensor& x = args[i]->toTensor();
    if (x.scalar_type() != scalar_type_of(io.dtype))
      return fail(Error::InvalidArgument, "input " + std::to_string(i) + " (" + io.name + ") must be " +
                                              dtype_name(io.dtype) + ", the program passes scalar type " +
                                              std::to_string(int(x.scalar_type())));
    if (!executorch::runtime::tensor_is_contiguous(x))
      return fail(Error::InvalidArgument, "input " + std::to_string(i) + " (" + io.name + ") is not contiguous");
  }
  for (size_t s = 0; s < g.symbols.size(); ++s) {
    const GraphSymbol& sym = g.symbols[s];
    const Tensor& x = args[sym.input]->toTensor();
    const bool dim = sym.source == SymbolSource::InputDim;
    int64_t v = 0;
    bool have = false;
    if (dim && ssize_t(sym.index) < x.dim()) {
      v = x.size(ssize_t(sym.index)), have = true;
    } else if (!dim && ssize_t(sym.index) < x.numel()) {
      have = true;
      switch (x.scalar_type()) {
        case ScalarType::Long: v = x.const_data_ptr<int64_t>()[sym.index]; break;
        case ScalarType::Int: v = x.const_data_ptr<int32_t>()[sym.index]; break;
        default: {  // f32: Python's int() truncates
          const double f = x.const_data_ptr<float>()[sym.index];
          if (!(std::fabs(f) < 9.2e18))
            return fail(Error::InvalidArgument, "input " + std::to_string(sym.input) + " element " +
                                                    std::to_string(sym.index) + " is not a finite integer (" +
                                                    sym.name + ")");
          v = int64_t(f);
        }
      }
    }
    if (!have)
      return fail(Error::InvalidArgument, "input " + std::to_string(sym.input) + " has shape " + shape_repr(x) +
                                              ": it has no " + (dim ? "input-dim " : "input-element ") +
                                              std::to_string(sym.index) + " (" + sym.name + ")");
    if (v < sym.min || v > sym.max)
      return fail(Error::InvalidArgument, "input " + std::to_string(sym.input) + (dim ? " dim " : " element ") +
                                              std::to_string(sym.index) + " is " + std::to_string(v) +
                                              ", outside the exported range [" + std::to_string(sym.min) + ", " +
                                              std::to_string(sym.max) + "]");
    symbols_[s] = v;
  }
  std::string problem = evaluate_exprs(g, symbols_, &values_, &stack_);
  if (!problem.empty()) return fail(Error::InvalidArgument, problem);
  for (const GraphCheck& c : g.checks)
    if (!values_[c.expr])
      return fail(Error::InvalidArgument, "the inputs break a condition of the export: " + c.message);
  std::vector<int64_t> want;
  for (size_t i = 0; i < g.inputs.size(); ++i) {
    const GraphIO& io = g.inputs[i];
    const Tensor& x = args[i]->toTensor();
    want.clear();
    for (uint32_t d : io.shape) want.push_back(values_[d]);
    bool same = size_t(x.dim()) == want.size();
    for (size_t d = 0; same && d < want.size(); ++d) same = x.size(ssize_t(d)) == want[d];
    if (!same)
      return fail(Error::InvalidArgument, "input " + std::to_string(i) + " (" + io.name + ") has shape " +
                                              shape_repr(x) + ", expected " + tuple_repr(want, want.size()));
    const uint64_t n = uint64_t(x.numel());
    if (n * 4 > sizes_[io.buffer])
      return fail(Error::InvalidProgram, "input " + std::to_string(i) + " (" + io.name + ") of " +
                                             std::to_string(n * 4) + " bytes does not fit its " +
                                             std::to_string(sizes_[io.buffer]) + "-byte buffer");
    if (io.dtype == GraphDType::F32) {
      input_data_[i] = {x.const_data_ptr<float>(), n * 4};
      continue;
    }
    int64_t lo = 0, hi = 0;
    auto range = [&](auto* p) {
      if (n) lo = hi = int64_t(p[0]);
      for (uint64_t e = 1; e < n; ++e) lo = std::min<int64_t>(lo, p[e]), hi = std::max<int64_t>(hi, p[e]);
    };
    const bool wide = io.dtype == GraphDType::I64;
    if (wide) range(x.const_data_ptr<int64_t>());
    else range(x.const_data_ptr<int32_t>());
    if (n && io.max_value > 0 && (lo < 0 || hi >= io.max_value))
      return fail(Error::InvalidArgument, "input " + std::to_string(i) + " (" + io.name + ") holds " +
                                              std::to_string(lo < 0 ? lo : hi) + ", outside [0, " +
                                              std::to_string(io.max_value) + ") (token ids of a " +
                                              std::to_string(io.max_value) + "-row embedding)");
    if (n && (lo < std::numeric_limits<int32_t>::min() || hi > std::numeric_limits<int32_t>::max()))
      return fail(Error::InvalidArgument,
                  "input " + std::to_string(i) + " (" + io.name + ") holds values outside int32");
    if (wide) {
      std::vector<int32_t>& out = converted_[i];
      out.resize(n);
      const int64_t* p = x.const_data_ptr<int64_t>();
      for (uint64_t e = 0; e < n; ++e) out[e] = int32_t(p[e]);
      input_data_[i] = {out.data(), n * 4};
    } else {
      input_data_[i] = {x.const_data_ptr<int32_t>(), n * 4};
    }
  }
  return Status{};
}

Status GraphDelegate::execute(Span<EValue*> args) {
  const auto t0 = Clock::now();
  // One GPU call at a time in the process; held from the first check, as the per-call
  // scratch (values, converted inputs, params) is this delegate's.
  std::lock_guard<std::mutex> lock(gpu_->mutex);
  const GraphBlob& g = blob_;
  const size_t n_in = g.inputs.size(), n_out = g.outputs.size();
  if (args.size() != n_in + n_out)
    return fail(Error::InvalidProgram, "takes " + std::to_string(n_in) + " inputs and " + std::to_string(n_out) +
                                           " outputs, the program passes " + std::to_string(args.size()) + " values");
  for (size_t i = 0; i < args.size(); ++i)
    if (!args[i]->isTensor())
      return fail(Error::InvalidProgram, std::string(i < n_in ? "input " : "output ") +
                                             std::to_string(i < n_in ? i : i - n_in) + " is not a tensor");
  Status status = read_inputs(args);
  if (!status.ok()) return status;

  // Outputs: shapes from the expressions; resized before any GPU work.
  std::array<SizesType, executorch::runtime::kTensorDimensionLimit> sizes{};
  std::vector<uint64_t> out_bytes(n_out, 0);
  for (size_t o = 0; o < n_out; ++o) {
    const GraphIO& io = g.outputs[o];
    Tensor& y = args[n_in + o]->toTensor();
    if (y.scalar_type() != ScalarType::Float)
      return fail(Error::InvalidProgram, "output " + std::to_string(o) + " (" + io.name +
                                             ") must be float32, the program's is scalar type " +
                                             std::to_string(int(y.scalar_type())));
    if (io.shape.size() > sizes.size())
      return fail(Error::InvalidProgram, "output " + std::to_string(o) + " has " + std::to_string(io.shape.size()) +
                                             " dims, more than ExecuTorch's tensors have");
    uint64_t numel = 1;
    bool fits = true;
    for (size_t d = 0; d < io.shape.size(); ++d) {
      const int64_t v = values_[io.shape[d]];
      fits = fits && v >= 0 && v <= std::numeric_limits<SizesType>::max() &&
             !__builtin_mul_overflow(numel, uint64_t(v), &numel);
      sizes[d] = SizesType(v);
    }
    if (!fits || numel > (uint64_t(1) << 61) || numel * 4 > sizes_[io.buffer])
      return fail(Error::InvalidProgram, "output " + std::to_string(o) + " (" + io.name + ") of shape " +
                                             tuple_repr(sizes, io.shape.size()) + " does not fit its " +
                                             std::to_string(sizes_[io.buffer]) + "-byte buffer");
    Error resized = executorch::runtime::resize_tensor(y, ArrayRef<SizesType>(sizes.data(), io.shape.size()));
    if (resized != Error::Ok)
      return fail(resized, "cannot resize output " + std::to_string(o) + " (" + io.name + ") from " + shape_repr(y) +
                               " to " + tuple_repr(sizes, io.shape.size()));
    out_bytes[o] = numel * 4;
  }

  // Params of every step, each linear's plan for its M, each kernel step's grid.
  uint64_t need_scratch = 0;
  linear_calls_.clear();
  size_t next_linear = 0;
  for (size_t s = 0; s < g.steps.size(); ++s) {
    const GraphStep& st = g.steps[s];
    uint32_t* slot = params_.data() + s * kSlotWords;
    if (st.linear >= 0) {
      Linear& lin = linears_[next_linear++];
      const int64_t m = values_[lin.m];
      if (m < 1 || m > int64_t(std::numeric_limits<uint32_t>::max()))
        return fail(Error::InvalidArgument, "layer " + py_repr(lin.name) + ": M=" + std::to_string(m) +
                                                " for these inputs is outside [1, 2^32)");
      const PlannedCall* call = nullptr;
      std::string problem = plan_linear(lin, uint64_t(m), &call);
      if (!problem.empty()) return fail(Error::InvalidArgument, problem);
      bool fits = uint64_t(m) * lin.k * 4 <= sizes_[lin.x];
      for (const GraphLinearPart& part : lin.parts) fits = fits && uint64_t(m) * part.columns * 4 <= sizes_[part.y];
      if (!fits)
        return fail(Error::InvalidProgram, "layer " + py_repr(lin.name) + ": M=" + std::to_string(m) +
                                               " rows do not fit the graph's buffers of its input and output");
      const Plan& p = call->plan;
      const Q4Params q = q4_params(p, lin.k, lin.n, lin.n_stride, lin.group_size, lin.part_columns);
      std::memcpy(slot, &q, sizeof(q));
      need_scratch = std::max(need_scratch, p.partial_bytes);
      linear_calls_.emplace_back(&lin, call);
      continue;
    }
    for (size_t f = 0; f < st.params.size(); ++f) {
      const int64_t v = values_[st.params[f]];
      if (v < 0 || v > int64_t(std::numeric_limits<uint32_t>::max())) {
        const char* field = "?";
        for (const KernelParams& kp : kKernelParams)
          if (st.kernel == kp.kernel && f < size_t(kp.count)) field = kp.names[f];
        return fail(Error::InvalidArgument, "step " + py_repr(st.node) + ": parameter " + field + " of kernel " +
                                                st.kernel + " is " + std::to_string(v) +
                                                " for these inputs, which does not fit in 32 bits");
      }
      slot[f] = uint32_t(v);
    }
    for (int d = 0; d < 3; ++d) {
      const int64_t v = values_[st.groups[d]];
      if (v < 0 || v > int64_t(limits_.max_workgroups_per_dim))
        return fail(Error::InvalidArgument, "step " + py_repr(st.node) + ": a grid of " + std::to_string(v) +
                                                " workgroups for these inputs is outside [0, " +
                                                std::to_string(limits_.max_workgroups_per_dim) + "]");
      grids_[s][d] = uint32_t(v);
    }
  }
  if (need_scratch > scratch_size_) {
    if (need_scratch > limits_.max_binding_bytes)
      return fail(Error::InvalidArgument, "the linears' scratch (split-K sums, int8 activations) of " +
                                              std::to_string(need_scratch) + " bytes for these inputs exceeds this "
                                              "adapter's " + std::to_string(limits_.max_binding_bytes) +
                                              "-byte binding limit: call with fewer tokens");
    std::string problem = build_linear_bind_groups(need_scratch);
    if (!problem.empty()) return fail(Error::Internal, problem);
  }
  // The dispatch list, in step order; a kernel step with an empty grid is skipped.
  dispatches_.clear();
  next_linear = 0;
  for (size_t s = 0; s < g.steps.size(); ++s) {
    if (g.steps[s].linear >= 0) {
      const auto& [lin, call] = linear_calls_[next_linear++];
      const Plan& p = call->plan;
      for (size_t d = 0; d < p.dispatches.size(); ++d) {
        const uint32_t* grid = p.dispatches[d].grid;
        dispatches_.push_back({call->pipelines[d], lin->bind_group, {grid[0], grid[1], grid[2]}});
      }
      continue;
    }
    const auto& grid = grids_[s];
    if (grid[0] && grid[1] && grid[2]) dispatches_.push_back({pipelines_[s], bind_groups_[s], {grid[0], grid[1], grid[2]}});
  }
  const auto t1 = Clock::now();

  // Writes, one pass, copies, one submit.
  WGPUQueue queue = gpu_->queue;
  for (size_t i = 0; i < n_in; ++i)
    if (input_data_[i].second)
      wgpuQueueWriteBuffer(queue, buffers_[g.inputs[i].buffer], 0, input_data_[i].first, input_data_[i].second);
  if (uploaded_params_ != params_) {
    wgpuQueueWriteBuffer(queue, uniform_, 0, params_.data(), params_.size() * 4);
    uploaded_params_ = params_;
  }
  // The dispatches go in submits of kDispatchesPerSubmit (one pass each), so the GPU starts on
  // the first while the rest are encoded; with timestamps the call's first pass writes tick 0
  // at its start and its last pass tick 1 at its end.
  WGPUCommandEncoder encoder = nullptr;
  const size_t n_dispatches = dispatches_.size();
  for (size_t start = 0; start == 0 || start < n_dispatches; start += kDispatchesPerSubmit) {
    const size_t end = std::min(n_dispatches, start + kDispatchesPerSubmit);
    const bool last = end == n_dispatches;
    encoder = wgpuDeviceCreateCommandEncoder(gpu_->device, nullptr);
    WGPUPassTimestampWrites timestamps = WGPU_PASS_TIMESTAMP_WRITES_INIT;
    WGPUComputePassDescriptor pass_desc = WGPU_COMPUTE_PASS_DESCRIPTOR_INIT;
    if (queries_ && (start == 0 || last)) {
      timestamps.querySet = queries_;
      timestamps.beginningOfPassWriteIndex = start == 0 ? 0 : WGPU_QUERY_SET_INDEX_UNDEFINED;
      timestamps.endOfPassWriteIndex = last ? 1 : WGPU_QUERY_SET_INDEX_UNDEFINED;
      pass_desc.timestampWrites = &timestamps;
    }
    WGPUComputePassEncoder pass = wgpuCommandEncoderBeginComputePass(encoder, &pass_desc);
    for (size_t i = start; i < end; ++i) {
      const Dispatch& d = dispatches_[i];
      wgpuComputePassEncoderSetPipeline(pass, d.pipeline);
      wgpuComputePassEncoderSetBindGroup(pass, 0, d.bind_group, 0, nullptr);
      wgpuComputePassEncoderDispatchWorkgroups(pass, d.grid[0], d.grid[1], d.grid[2]);
    }
    wgpuComputePassEncoderEnd(pass);
    wgpuComputePassEncoderRelease(pass);
    if (last) break;   // the output copies and the timestamps' resolve join the last submit
    WGPUCommandBuffer commands = wgpuCommandEncoderFinish(encoder, nullptr);
    wgpuQueueSubmit(queue, 1, &commands);
    wgpuCommandBufferRelease(commands);
    wgpuCommandEncoderRelease(encoder);
  }
  uint64_t read_bytes = 0;
  for (size_t o = 0; o < n_out; ++o) {
    if (!out_bytes[o]) continue;
    wgpuCommandEncoderCopyBufferToBuffer(encoder, buffers_[g.outputs[o].buffer], 0, staging_, output_offsets_[o],
                                         out_bytes[o]);
    read_bytes = std::max(read_bytes, output_offsets_[o] + out_bytes[o]);
  }
  if (queries_) {
    wgpuCommandEncoderResolveQuerySet(encoder, queries_, 0, 2, resolve_, 0);
    wgpuCommandEncoderCopyBufferToBuffer(encoder, resolve_, 0, staging_, ts_offset_, kTimestampBytes);
    read_bytes = ts_offset_ + kTimestampBytes;
  }
  read_bytes = std::max<uint64_t>(round_up(read_bytes, 4), 4);
  WGPUCommandBuffer commands = wgpuCommandEncoderFinish(encoder, nullptr);
  wgpuQueueSubmit(queue, 1, &commands);
  wgpuCommandBufferRelease(commands);
  wgpuCommandEncoderRelease(encoder);
  const auto t2 = Clock::now();

  std::string problem = gpu_->map_for_reading(staging_, read_bytes, &map_state_);
  const auto t3 = Clock::now();
  if (!problem.empty()) return fail(Error::Internal, problem);
  const auto* bytes = static_cast<const uint8_t*>(wgpuBufferGetConstMappedRange(staging_, 0, read_bytes));
  if (!bytes) {
    wgpuBufferUnmap(staging_);
    return fail(Error::Internal, "the mapped outputs are not readable");
  }
  for (size_t o = 0; o < n_out; ++o)
    if (out_bytes[o])
      std::memcpy(args[n_in + o]->toTensor().mutable_data_ptr<float>(), bytes + output_offsets_[o], out_bytes[o]);
  double gpu_us = -1;
  if (queries_) {
    uint64_t ticks[2];
    std::memcpy(ticks, bytes + ts_offset_, sizeof(ticks));
    if (ticks[1] >= ticks[0]) gpu_us = double(ticks[1] - ticks[0]) * gpu_->timestamp_period_ns / 1000.0;
  }
  wgpuBufferUnmap(staging_);
  const auto t4 = Clock::now();

  last_call = GraphCallRecord{dispatches_.size(), gpu_us, us_between(t0, t1), us_between(t1, t2), us_between(t2, t3),
                              us_between(t3, t4), us_between(t0, t4)};
  {
    std::lock_guard<std::mutex> guard(last_call_mutex);
    last_call_record = last_call;
    have_last_call = true;
  }
  // The route report: one entry per q4 linear of the model (a fused one's parts), as the Python runtime gives.
  for (const auto& [lin, call] : linear_calls_) {
    for (const GraphLinearPart& part : lin->parts) {
      CallRecord record;
      record.name = part.name;
      record.m = call->plan.m;
      record.k = lin->k;
      record.n = part.columns;
      record.kernel = call->plan.runs->name;
      record.reason = lin->reasons[call->plan.m == 1 ? 0 : 1];
      log_call(std::move(record));
    }
  }
  return Status{};
}

long reset_all_graph_state(std::string* error) {
  std::lock_guard<std::mutex> lock(live_mutex);
  long count = 0;
  for (GraphDelegate* g : live) {
    std::string problem = g->reset_state();
    if (!problem.empty()) {
      *error = problem;
      return -1;
    }
    ++count;
  }
  return count;
}

bool last_graph_call(GraphCallRecord* out) {
  std::lock_guard<std::mutex> lock(last_call_mutex);
  if (have_last_call) *out = last_call_record;
  return have_last_call;
}

}  // namespace wgq4_native
