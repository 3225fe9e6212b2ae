// wgq4_llama_run: an exported Llama .pte end to end in ExecuTorch's C++ runtime -- no
// Python in the process -- with this library's WebGPUBackend: prefill a prompt, then
// greedy decode, and time both.
//
//   wgq4_llama_run model.pte --prompt 1,57,300 [--new-tokens 16] [--warmup 1] [--repeats 1]
//
// The program is what tools/models.export_llama_pte writes, in either mode: graph mode
// (one delegate, the KV cache on the GPU) or linears-only (the KV cache a buffer of the
// program): forward(tokens int64 [1, T], input_pos int64 [1]) -> logits float [1, vocab].
// It is loaded with full flatbuffer verification (InternalConsistency).
//
//   * prefill: --warmup untimed calls of the prompt at position 0, then --repeats timed
//     ones (their median is the prefill time); before each, every graph delegate's state is
//     put back to its value at load (executorch_wgpu_reset_state). A program's own KV cache
//     (linears-only) needs no reset: a prefill at 0 writes positions 0..T-1 and the causal
//     mask hides the rest;
//   * decode: greedy, one call per token (tokens [1, 1], input_pos = T, T + 1, ...), the
//     argmax of the last row of the logits. --new-tokens counts every generated token, the
//     first coming from the prefill (as tools/models.greedy_generate counts them); the first
//     --warmup decode calls are not timed.
//
// Prints one JSON line on stdout: the generated tokens and the timings (load, prefill
// ms and tok/s, decode ms per token and tok/s). Errors are a line on stderr
// ("wgq4_llama_run: ...") and a non-zero exit: 2 for bad arguments (a token id outside
// the program's vocabulary among them), 1 when the program cannot be loaded or run.
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor_ptr_maker.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "c_api.h"

using executorch::aten::ScalarType;
using executorch::extension::from_blob;
using executorch::extension::Module;
using executorch::runtime::EValue;
using executorch::runtime::Error;

namespace {

constexpr const char* kUsage =
    "usage: wgq4_llama_run model.pte --prompt ID[,ID...] [--new-tokens N (16)] [--warmup N (1)] [--repeats N (1)]";

int usage(const std::string& why) {
  std::fprintf(stderr, "wgq4_llama_run: %s\n%s\n", why.c_str(), kUsage);
  return 2;
}

// A bad argument found once the program is loaded (it knows the vocabulary and the token bound).
int bad_input(const std::string& why) {
  std::fprintf(stderr, "wgq4_llama_run: %s\n", why.c_str());
  return 2;
}

int fail(const std::string& why) {
  std::fprintf(stderr, "wgq4_llama_run: %s\n", why.c_str());
  return 1;
}

// A whole decimal integer in [lo, hi], or false.
bool parse_int(const std::string& text, long long lo, long long hi, long long* out) {
  if (text.empty()) return false;
  errno = 0;
  char* end = nullptr;
  const long long v = std::strtoll(text.c_str(), &end, 10);
  if (errno != 0 || *end != '\0' || v < lo || v > hi) return false;
  *out = v;
  return true;
}

double ms_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n == 0 ? 0.0 : n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

// "0x22 AccessFailed": the code and ExecuTorch's name of an Error.
std::string hex(Error e) {
  std::string name = executorch::runtime::to_string(e);
  if (name.rfind("Error::", 0) == 0) name.erase(0, 7);
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%x ", unsigned(e));
  return buf + name;
}

std::string json_list(const std::vector<double>& v) {
  std::string s;
  char buf[32];
  for (double x : v) {
    std::snprintf(buf, sizeof buf, "%.3f", x);
    s += (s.empty() ? "" : ", ") + std::string(buf);
  }
  return "[" + s + "]";
}

// The program's forward, its inputs checked to be the Llama export's.
struct Llama {
  Module module;
  int64_t max_tokens = 0;  // the token dim's upper bound
  int64_t vocab = 0;       // the logits' last dim

  explicit Llama(const std::string& path) : module(path) {}

  // "" when loaded, else why not.
  std::string load() {
    // Verify the whole program flatbuffer first (ExecuTorch's default, Minimal, trusts the file).
    Error e = module.load(executorch::runtime::Program::Verification::InternalConsistency);
    if (e == Error::AccessFailed) return "cannot read the file (error " + hex(e) + ")";
    if (e != Error::Ok) return "cannot load the program (error " + hex(e) + "): not a valid .pte";
    auto meta = module.method_meta("forward");
    if (!meta.ok()) return "the program has no forward method (error " + hex(meta.error()) + ")";
    if (meta->num_inputs() != 2 || meta->num_outputs() < 1)
      return "forward takes " + std::to_string(meta->num_inputs()) + " inputs and returns " +
             std::to_string(meta->num_outputs()) +
             " outputs; a Llama export takes (tokens [1, T], input_pos [1]) and returns logits";
    for (size_t i = 0; i < 2; ++i) {
      auto info = meta->input_tensor_meta(i);
      if (!info.ok() || info->scalar_type() != ScalarType::Long)
        return std::string("forward's input ") + (i ? "input_pos" : "tokens") +
               " is not an int64 tensor: not a Llama export";
    }
    auto tokens = meta->input_tensor_meta(0);
    if (tokens->sizes().size() != 2 || tokens->sizes()[0] != 1)
      return "forward's tokens input is not [1, T]: not a Llama export";
    max_tokens = tokens->sizes()[1];
    auto logits = meta->output_tensor_meta(0);
    if (!logits.ok() || logits->scalar_type() != ScalarType::Float || logits->sizes().empty())
      return "forward's first output is not a float tensor of logits: not a Llama export";
    vocab = logits->sizes()[logits->sizes().size() - 1];
    e = module.load_forward();
    if (e != Error::Ok) return "cannot load forward() (error " + hex(e) + "; the log above says why)";
    return "";
  }

  // The argmax of the last row of forward(tokens, [pos])'s logits, or -1 with *why set.
  int64_t next_token(std::vector<int64_t>& tokens, int64_t pos, std::string* why) {
    auto tokens_t = from_blob(tokens.data(), {1, executorch::aten::SizesType(tokens.size())}, ScalarType::Long);
    auto pos_t = from_blob(&pos, {1}, ScalarType::Long);
    auto result = module.forward(std::vector<EValue>{EValue(*tokens_t), EValue(*pos_t)});
    if (!result.ok()) {
      *why = "forward() failed with error " + hex(result.error()) + " (the log above says why)";
      return -1;
    }
    if (result->empty() || !(*result)[0].isTensor()) {
      *why = "forward() returned no logits tensor";
      return -1;
    }
    const auto& out = (*result)[0].toTensor();
    if (out.scalar_type() != ScalarType::Float || out.dim() < 1 || out.size(out.dim() - 1) != vocab ||
        out.numel() < vocab) {
      *why = "forward() returned logits that are not float [..., " + std::to_string(vocab) + "]";
      return -1;
    }
    const float* row = out.const_data_ptr<float>() + (out.numel() - vocab);
    return int64_t(std::max_element(row, row + vocab) - row);
  }
};

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return usage("no .pte given");
  const std::string pte = argv[1];
  std::vector<int64_t> prompt;
  long long new_tokens = 16, warmup = 1, repeats = 1;
  bool have_prompt = false;
  for (int i = 2; i < argc; i += 2) {
    const std::string flag = argv[i];
    if (i + 1 >= argc) return usage(flag + " needs a value");
    const std::string value = argv[i + 1];
    if (flag == "--prompt") {
      have_prompt = true;
      for (size_t pos = 0; pos <= value.size();) {
        size_t comma = value.find(',', pos);
        if (comma == std::string::npos) comma = value.size();
        long long id = 0;
        const std::string item = value.substr(pos, comma - pos);
        if (!parse_int(item, 0, INT64_MAX, &id))
          return usage("--prompt: token id '" + item + "' is not a non-negative integer");
        prompt.push_back(id);
        pos = comma + 1;
      }
    } else if (flag == "--new-tokens") {
      if (!parse_int(value, 1, 1 << 20, &new_tokens)) return usage("--new-tokens must be an integer >= 1");
    } else if (flag == "--warmup") {
      if (!parse_int(value, 0, 1000, &warmup)) return usage("--warmup must be an integer in [0, 1000]");
    } else if (flag == "--repeats") {
      if (!parse_int(value, 1, 1000, &repeats)) return usage("--repeats must be an integer in [1, 1000]");
    } else {
      return usage("unknown flag " + flag);
    }
  }
  if (!have_prompt) return usage("--prompt is required");

  const auto load_start = std::chrono::steady_clock::now();
  Llama llama(pte);
  std::string why = llama.load();
  if (!why.empty()) return fail(pte + ": " + why);
  const double load_ms = ms_since(load_start);
  const int64_t t = int64_t(prompt.size());
  if (t > llama.max_tokens)
    return bad_input("the prompt has " + std::to_string(t) + " tokens; this program takes at most " +
                     std::to_string(llama.max_tokens) + " per call");
  for (size_t i = 0; i < prompt.size(); ++i)
    if (prompt[i] >= llama.vocab)
      return bad_input("--prompt: token id " + std::to_string(prompt[i]) + " (position " + std::to_string(i) +
                       ") is outside the program's vocabulary [0, " + std::to_string(llama.vocab) + ")");

  // Prefill: warm-up calls, then the timed ones; the last one's token starts the decode.
  std::vector<double> prefill_ms;
  int64_t token = -1;
  for (long long i = 0; i < warmup + repeats; ++i) {
    if (executorch_wgpu_reset_state() < 0) return fail("resetting the graph delegates' state failed");
    const auto start = std::chrono::steady_clock::now();
    token = llama.next_token(prompt, 0, &why);
    const double ms = ms_since(start);
    if (token < 0) return fail("prefill of " + std::to_string(t) + " tokens: " + why);
    if (i >= warmup) prefill_ms.push_back(ms);
  }
  std::vector<int64_t> generated = {token};
  std::vector<double> decode_ms;
  std::vector<int64_t> step(1);
  for (int64_t pos = t; int64_t(generated.size()) < new_tokens; ++pos) {
    step[0] = generated.back();
    const auto start = std::chrono::steady_clock::now();
    token = llama.next_token(step, pos, &why);
    const double ms = ms_since(start);
    if (token < 0) return fail("decode step " + std::to_string(generated.size()) + " (input_pos " +
                               std::to_string(pos) + "): " + why);
    if (int64_t(generated.size()) > warmup) decode_ms.push_back(ms);
    generated.push_back(token);
  }

  const double prefill = median(prefill_ms);
  double decode_total = 0;
  for (double ms : decode_ms) decode_total += ms;
  std::string tokens_json;
  for (int64_t id : generated) tokens_json += (tokens_json.empty() ? "" : ", ") + std::to_string(id);
  const size_t steps = decode_ms.size();
  std::printf("{\"prompt_tokens\": %lld, \"new_tokens\": %lld, \"tokens\": [%s], \"vocab\": %lld, "
              "\"max_tokens\": %lld, \"load_ms\": %.3f, \"prefill_ms\": %.3f, \"prefill_ms_runs\": %s, "
              "\"prefill_tokens_per_s\": %.3f, \"decode_steps_timed\": %zu, \"decode_ms_per_token\": %s, "
              "\"decode_ms_per_token_median\": %s, \"decode_tokens_per_s\": %s}\n",
              (long long)t, new_tokens, tokens_json.c_str(), (long long)llama.vocab, (long long)llama.max_tokens,
              load_ms, prefill, json_list(prefill_ms).c_str(), prefill > 0 ? t * 1e3 / prefill : 0.0, steps,
              steps ? std::to_string(decode_total / double(steps)).c_str() : "null",
              steps ? std::to_string(median(decode_ms)).c_str() : "null",
              steps && decode_total > 0 ? std::to_string(double(steps) * 1e3 / decode_total).c_str() : "null");
  return 0;
}
