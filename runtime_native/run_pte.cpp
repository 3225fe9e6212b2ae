// wgq4_run_pte: runs a .pte's "forward" in ExecuTorch's C++ runtime -- no
// Python in the process -- with this library's WebGPUBackend, and times it.
//
//   wgq4_run_pte model.pte --shape 1x2048 [--input x.f32] [--output y.f32]
//                [--warmup 30] [--iters 300]
//
// The program is loaded with full flatbuffer verification (InternalConsistency).
// One float32 input of the given shape (read from --input, raw little-endian
// floats, else a fixed pseudo-random fill); writes the first output to
// --output (raw floats). Prints one JSON line: the median / p10 / p90 wall
// time of Module::forward() after warm-up, the median delegate-internal
// times from the call log (call_log.h), the output shape, and the routes.
// This is the deployment path the Python loader (executorch_wgpu.native)
// mirrors, and what `python -m executorch_wgpu bench --overhead` reports as
// "native C++".
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor_ptr_maker.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "call_log.h"

using executorch::extension::from_blob;
using executorch::extension::Module;

namespace {

int usage(const char* why) {
  std::fprintf(stderr, "wgq4_run_pte: %s\nusage: wgq4_run_pte model.pte --shape AxB[xC] [--input x.f32] "
                       "[--output y.f32] [--warmup N] [--iters N]\n", why);
  return 2;
}

double percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[size_t(q * double(v.size() - 1) + 0.5)];
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return usage("no .pte given");
  std::string pte = argv[1], input_path, output_path;
  std::vector<executorch::aten::SizesType> shape;
  int warmup = 30, iters = 300;  // iters >= 1 (checked below)
  for (int i = 2; i + 1 < argc; i += 2) {
    std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--shape") {
      for (size_t pos = 0; pos <= value.size();) {
        size_t x = value.find('x', pos);
        if (x == std::string::npos) x = value.size();
        shape.push_back(std::atoi(value.substr(pos, x - pos).c_str()));
        pos = x + 1;
      }
    } else if (flag == "--input") {
      input_path = value;
    } else if (flag == "--output") {
      output_path = value;
    } else if (flag == "--warmup") {
      warmup = std::atoi(value.c_str());
    } else if (flag == "--iters") {
      iters = std::atoi(value.c_str());
    } else {
      return usage(("unknown flag " + flag).c_str());
    }
  }
  if (shape.empty()) return usage("--shape is required");
  if (iters < 1 || warmup < 0) return usage("--iters must be >= 1 and --warmup >= 0");
  size_t numel = 1;
  for (auto s : shape) {
    if (s <= 0) return usage("--shape has a non-positive dimension");
    numel *= size_t(s);
  }
  std::vector<float> x(numel);
  if (!input_path.empty()) {
    std::ifstream in(input_path, std::ios::binary);
    if (!in.read(reinterpret_cast<char*>(x.data()), std::streamsize(numel * 4)))
      return usage(("cannot read " + std::to_string(numel) + " floats from " + input_path).c_str());
  } else {
    uint32_t state = 12345;
    for (auto& v : x) {
      state = state * 1664525u + 1013904223u;
      v = float(int(state >> 9) % 2001 - 1000) / 1000.0f;
    }
  }

  Module module(pte);
  // Verify the whole program flatbuffer first (ExecuTorch's default, Minimal,
  // trusts the file: a corrupted .pte can crash its loader).
  if (module.load(executorch::runtime::Program::Verification::InternalConsistency) != executorch::runtime::Error::Ok ||
      module.load_forward() != executorch::runtime::Error::Ok) {
    std::fprintf(stderr, "wgq4_run_pte: cannot load forward() of %s\n", pte.c_str());
    return 1;
  }
  auto input = from_blob(x.data(), shape);
  const std::vector<executorch::runtime::EValue> inputs = {executorch::runtime::EValue(*input)};
  std::vector<double> wall_us;
  std::vector<float> y;
  std::vector<long> y_shape;
  for (int i = 0; i < warmup + iters; ++i) {
    if (i == warmup) wgq4_native::take_calls();  // the call log of the timed runs only
    const auto start = std::chrono::steady_clock::now();
    auto result = module.forward(inputs);
    const auto stop = std::chrono::steady_clock::now();
    if (!result.ok()) {
      std::fprintf(stderr, "wgq4_run_pte: forward() failed with error 0x%x\n", unsigned(result.error()));
      return 1;
    }
    if (i >= warmup) wall_us.push_back(std::chrono::duration<double, std::micro>(stop - start).count());
    if (i + 1 == warmup + iters) {
      const auto& out = result.get()[0].toTensor();
      y.assign(out.const_data_ptr<float>(), out.const_data_ptr<float>() + out.numel());
      for (ssize_t d = 0; d < out.dim(); ++d) y_shape.push_back(long(out.size(d)));
    }
  }
  std::vector<double> delegate_us, gpu_us, upload_us, submit_us, wait_us, readback_us;
  std::set<std::string> kernels;
  auto calls = wgq4_native::take_calls();
  for (const auto& c : calls) {
    delegate_us.push_back(c.wall_us);
    if (c.gpu_us >= 0) gpu_us.push_back(c.gpu_us);
    upload_us.push_back(c.upload_us);
    submit_us.push_back(c.submit_us);
    wait_us.push_back(c.wait_us);
    readback_us.push_back(c.readback_us);
    kernels.insert(c.kernel);
  }
  if (!output_path.empty()) {
    std::ofstream o(output_path, std::ios::binary);
    o.write(reinterpret_cast<const char*>(y.data()), std::streamsize(y.size() * 4));
  }
  std::string out_shape, kernel_list;
  for (size_t i = 0; i < y_shape.size(); ++i) out_shape += (i ? ", " : "") + std::to_string(y_shape[i]);
  for (const auto& k : kernels) kernel_list += (kernel_list.empty() ? "\"" : ", \"") + k + "\"";
  const double calls_per_forward = iters ? double(calls.size()) / iters : 0;
  std::printf("{\"execute_us\": %.3f, \"execute_p10_us\": %.3f, \"execute_p90_us\": %.3f, \"iters\": %d, "
              "\"delegate_calls_per_execute\": %.3f, \"delegate_us\": %.3f, \"gpu_us\": %.3f, "
              "\"upload_us\": %.3f, \"submit_us\": %.3f, \"wait_us\": %.3f, \"readback_us\": %.3f, "
              "\"output_shape\": [%s], \"kernels\": [%s]}\n",
              percentile(wall_us, 0.5), percentile(wall_us, 0.1), percentile(wall_us, 0.9), iters, calls_per_forward,
              percentile(delegate_us, 0.5), percentile(gpu_us, 0.5), percentile(upload_us, 0.5),
              percentile(submit_us, 0.5), percentile(wait_us, 0.5), percentile(readback_us, 0.5), out_shape.c_str(),
              kernel_list.c_str());
  return 0;
}
