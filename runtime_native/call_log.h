// What each delegate call did -- the native runtime's route report.
//
// The C++ twin of runtime_py/q4_linear.py's LinearCall. The last
// kMaxRecords calls are kept (memory stays bounded in a long decode loop);
// Python reads and clears them through c_api.h (executorch_wgpu.native).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace wgq4_native {

struct CallRecord {
  std::string name;
  uint64_t m = 0;
  uint32_t k = 0, n = 0;
  std::string kernel;      // "gemv", ..., or "a+b" when a split layer ran several
  std::string reason;
  double gpu_us = -1;      // GPU timestamp delta of the compute passes; -1 without timestamps
  double wall_us = 0;      // the whole delegate call, input checks to output written
  double upload_us = 0, submit_us = 0, wait_us = 0, readback_us = 0;
};

constexpr size_t kMaxRecords = 4096;

void log_call(CallRecord record);
// Exported (the library hides everything else) for wgq4_run_pte and c_api.
__attribute__((visibility("default"))) std::vector<CallRecord> take_calls();

}  // namespace wgq4_native
