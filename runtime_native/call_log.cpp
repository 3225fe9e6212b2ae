// See call_log.h.
#include "call_log.h"

#include <deque>
#include <mutex>

namespace wgq4_native {

namespace {
std::mutex log_mutex;
std::deque<CallRecord> records;
}  // namespace

void log_call(CallRecord record) {
  std::lock_guard<std::mutex> lock(log_mutex);
  if (records.size() == kMaxRecords) records.pop_front();
  records.push_back(std::move(record));
}

std::vector<CallRecord> take_calls() {
  std::lock_guard<std::mutex> lock(log_mutex);
  std::vector<CallRecord> out(records.begin(), records.end());
  records.clear();
  return out;
}

}  // namespace wgq4_native
