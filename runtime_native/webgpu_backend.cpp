// The ExecuTorch backend "WebGPUBackend": what a DelegateCall of a .pte runs
// when the program is loaded by ExecuTorch's own runtime.
//
// A delegate blob is one of two kinds, told apart by its file identifier:
//   * WGQ4, one q4gsw linear: init() reads and validates the blob
//     (blob_reader.h) and uploads the layer (q4_linear.h); execute() checks the
//     input against the layer, resizes the output to the call's M and runs it;
//   * WGGR, a graph (graph mode, linears_only=False): init() reads and checks
//     the blob (graph_reader.h) and loads it with its weights from the
//     program's named data (graph_delegate.h); execute() runs it with one
//     submit. Its state (the KV cache) persists across calls; the backend
//     option "reset_state" (or executorch_wgpu_reset_state(), c_api.h) puts
//     every graph's state back to its value at load.
// Every problem is an error status plus one ET_LOG line that names it -- never an abort.
//
// The backend registers itself when this library is loaded (a static
// initializer), into the registry of libexecutorch.so: the same one the
// executorch Python extension uses.
#include <executorch/runtime/backend/interface.h>
#include <executorch/runtime/backend/options.h>
#include <executorch/runtime/core/error.h>
#include <executorch/runtime/core/evalue.h>
#include <executorch/runtime/core/exec_aten/util/tensor_util.h>
#include <executorch/runtime/platform/log.h>

#include <array>
#include <cstring>
#include <memory>
#include <variant>
#include <vector>

#include "blob_reader.h"
#include "call_log.h"
#include "gpu_device.h"
#include "graph_delegate.h"
#include "graph_reader.h"
#include "q4_linear.h"

namespace wgq4_native {

namespace {

using executorch::runtime::ArrayRef;
using executorch::runtime::Backend;
using executorch::runtime::BackendExecutionContext;
using executorch::runtime::BackendInitContext;
using executorch::runtime::BackendInterface;
using executorch::runtime::BackendOption;
using executorch::runtime::BackendOptionContext;
using executorch::runtime::CompileSpec;
using executorch::runtime::DelegateHandle;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::FreeableBuffer;
using executorch::runtime::Result;
using executorch::runtime::Span;
using executorch::aten::ScalarType;
using executorch::aten::SizesType;
using executorch::aten::Tensor;

Error fail(Error error, const std::string& message) {
  ET_LOG(Error, "WebGPUBackend: %s", message.c_str());
  return error;
}

std::string shape_of(const Tensor& t) {
  std::string s = "(";
  for (ssize_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + (t.dim() == 1 ? ",)" : ")");
}

// What init() returns: one of the two kinds of delegate.
struct Handle {
  std::unique_ptr<Q4Layer> layer;
  std::unique_ptr<GraphDelegate> graph;
};

Result<DelegateHandle*> init_graph(BackendInitContext& context, const void* data, size_t size,
                                   FreeableBuffer* processed) {
  GraphBlob blob;
  bool version = false;
  std::string problem = read_graph_blob(data, size, &blob, &version);
  if (!problem.empty()) return fail(version ? Error::DelegateInvalidCompatibility : Error::InvalidProgram, problem);
  GpuDevice* gpu = shared_gpu_device(&problem);
  if (!gpu) return fail(Error::NotSupported, problem);
  Status status;
  std::unique_ptr<GraphDelegate> graph = GraphDelegate::create(gpu, std::move(blob), context.get_named_data_map(), &status);
  if (!graph) return fail(status.error, status.message);
  processed->Free();  // the graph keeps what it read; its weights live on the GPU now
  auto* handle = new Handle();
  handle->graph = std::move(graph);
  return handle;
}

class WebGPUBackend final : public BackendInterface {
 public:
  bool is_available() const override {
    std::string error;
    if (shared_gpu_device(&error)) return true;
    ET_LOG(Error, "WebGPUBackend: %s", error.c_str());
    return false;
  }

  Result<DelegateHandle*> init(BackendInitContext& context, FreeableBuffer* processed,
                               ArrayRef<CompileSpec> compile_specs) const override {
    // The verifier reads the blob in place; copy it when the program did not align it.
    const void* data = processed->data();
    std::vector<uint64_t> aligned;
    if (reinterpret_cast<uintptr_t>(data) % 8 != 0) {
      aligned.resize((processed->size() + 7) / 8);
      std::memcpy(aligned.data(), data, processed->size());
      data = aligned.data();
    }
    if (is_graph_blob(data, processed->size())) return init_graph(context, data, processed->size(), processed);
    LinearBlob blob;
    std::string problem = read_blob(data, processed->size(), &blob);
    if (!problem.empty()) {
      const bool version = problem.find("schema version") != std::string::npos;
      return fail(version ? Error::DelegateInvalidCompatibility : Error::InvalidProgram, problem);
    }
    GpuDevice* gpu = shared_gpu_device(&problem);
    if (!gpu) return fail(Error::NotSupported, problem);
    std::unique_ptr<Q4Layer> layer = Q4Layer::create(gpu, blob, &problem);
    if (!layer) return fail(Error::Internal, problem);
    processed->Free();  // the weights live on the GPU now
    auto* handle = new Handle();
    handle->layer = std::move(layer);
    return handle;
  }

  Error execute(BackendExecutionContext& context, DelegateHandle* opaque, Span<EValue*> args) const override {
    auto* handle = static_cast<Handle*>(opaque);
    if (handle->graph) {
      Status status = handle->graph->execute(args);
      return status.ok() ? Error::Ok : fail(status.error, status.message);
    }
    Q4Layer* layer = handle->layer.get();
    const LayerInfo& L = layer->info();
    auto who = [&L] { return "layer " + py_repr(L.name) + ": "; };  // built only for an error message
    if (args.size() != 2 || !args[0]->isTensor() || !args[1]->isTensor())
      return fail(Error::InvalidArgument, who() + "takes 1 input tensor and 1 output tensor, the program passes " +
                                              std::to_string(args.size()) + " values");
    const Tensor& x = args[0]->toTensor();
    Tensor& y = args[1]->toTensor();
    if (x.scalar_type() != ScalarType::Float || y.scalar_type() != ScalarType::Float)
      return fail(Error::InvalidArgument, who() + "input and output must be float32");
    if (x.dim() < 1 || x.size(x.dim() - 1) != ssize_t(L.in_features))
      return fail(Error::InvalidArgument,
                  who() + "input shape " + shape_of(x) + " does not end in K=" + std::to_string(L.in_features));
    // The blob's N against the program's output: without a bias the payload's CRC
    // ties N only to its 16-column block, so a corrupted N can pass the reader.
    if (y.dim() != x.dim() || y.size(y.dim() - 1) != ssize_t(L.out_features))
      return fail(Error::InvalidProgram, who() + "the blob has N=" + std::to_string(L.out_features) +
                                             " output columns, the program's output tensor is " + shape_of(y));
    if (!executorch::runtime::tensor_is_contiguous(x))
      return fail(Error::InvalidArgument, who() + "input is not contiguous");
    const uint64_t m = uint64_t(x.numel()) / L.in_features;
    if (m < L.m_min || m > L.m_max)
      return fail(Error::InvalidArgument, who() + "M=" + std::to_string(m) + " (product of leading dims of " +
                                              shape_of(x) + ") is outside the exported range [" +
                                              std::to_string(L.m_min) + ", " + std::to_string(L.m_max) + "]");
    std::array<SizesType, executorch::runtime::kTensorDimensionLimit> sizes{};
    for (ssize_t i = 0; i + 1 < x.dim(); ++i) sizes[i] = SizesType(x.size(i));
    sizes[x.dim() - 1] = SizesType(L.out_features);
    Error resized = executorch::runtime::resize_tensor(y, ArrayRef<SizesType>(sizes.data(), size_t(x.dim())));
    if (resized != Error::Ok)
      return fail(resized, who() + "cannot resize the output to M=" + std::to_string(m) + " rows of N=" +
                               std::to_string(L.out_features));
    CallRecord call;
    std::string problem = layer->run(x.const_data_ptr<float>(), m, y.mutable_data_ptr<float>(), &call);
    if (!problem.empty()) return fail(Error::Internal, problem);
    log_call(std::move(call));
    return Error::Ok;
  }

  // "reset_state" (true, or a non-zero int): every graph delegate's state (the KV cache)
  // back to its value at load, as executorch_wgpu_reset_state() does.
  Error set_option(BackendOptionContext& context, const Span<BackendOption>& options) override {
    for (const BackendOption& option : options) {
      if (std::strcmp(option.key, "reset_state") != 0) {
        return fail(Error::InvalidArgument, std::string("unknown backend option ") + py_repr(option.key) +
                                                "; WebGPUBackend takes \"reset_state\"");
      }
      const bool* flag = std::get_if<bool>(&option.value);
      const int* number = std::get_if<int>(&option.value);
      if (!flag && !number)
        return fail(Error::InvalidArgument, "backend option \"reset_state\" takes a bool (or an int)");
      if (flag ? !*flag : *number == 0) continue;
      std::string problem;
      if (reset_all_graph_state(&problem) < 0) return fail(Error::Internal, "reset_state failed: " + problem);
    }
    return Error::Ok;
  }

  void destroy(DelegateHandle* handle) const override { delete static_cast<Handle*>(handle); }
};

WebGPUBackend backend;
const Error registered = executorch::runtime::register_backend(Backend{WGQ4_BACKEND_ID, &backend});

}  // namespace

// Whether this library's backend is the one registered under WGQ4_BACKEND_ID (c_api.cpp).
bool backend_registered() {
  return registered == Error::Ok || executorch::runtime::get_backend_class(WGQ4_BACKEND_ID) == &backend;
}

}  // namespace wgq4_native
