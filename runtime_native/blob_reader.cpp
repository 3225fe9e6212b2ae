// See blob_reader.h. Check order and error words follow blob.py.
#include "blob_reader.h"

#include <cstdio>
#include <cstring>
#include <vector>

#include "schema_generated.h"  // flatc --cpp backend/serialization/schema.fbs

namespace wgq4_native {

namespace {

// Shape rules of the packed layout (blob.py: N_ALIGN, GROUP_ALIGN).
constexpr uint32_t kNAlign = 16;
constexpr uint32_t kGroupAlign = 32;
constexpr int kRouteSourceCount = 3;


std::string fb_string(const flatbuffers::String* s) { return s ? s->str() : std::string(); }

// Python's repr of the bucket bounds / buckets, so messages read as blob.py's.
std::string bounds_repr(const std::vector<RouteBucket>& buckets) {
  std::string s = "[";
  for (size_t i = 0; i < buckets.size(); ++i) s += (i ? ", " : "") + std::to_string(buckets[i].m_max);
  return s + "]";
}

std::string buckets_repr(const std::vector<RouteBucket>& buckets) {
  std::string s = "(";
  for (size_t i = 0; i < buckets.size(); ++i)
    s += (i ? ", " : "") + std::string("(") + std::to_string(buckets[i].m_max) + ", '" + kernel_name(buckets[i].kernel) + "')";
  return s + (buckets.size() == 1 ? ",)" : ")");
}

// check_record() of blob.py: every length and shape rule, before any use.
std::string check_record(const LinearBlob& b) {
  const uint64_t k = b.in_features, n = b.out_features, gs = b.group_size;
  const std::string head = "delegate blob of layer " + py_repr(b.name) + " is invalid: ";
  if (k == 0 || n == 0)
    return head + "in_features=" + std::to_string(k) + ", out_features=" + std::to_string(n) + " must be positive";
  if (gs == 0 || gs % kGroupAlign || k % gs)
    return head + "group_size=" + std::to_string(gs) + " must be a positive multiple of " +
           std::to_string(kGroupAlign) + " dividing in_features=" + std::to_string(k);
  const uint64_t n_stride = (n + kNAlign - 1) / kNAlign * kNAlign;
  if (b.n_stride != n_stride)
    return head + "n_stride=" + std::to_string(b.n_stride) + ", expected " + std::to_string(n_stride) +
           " for out_features=" + std::to_string(n);
  if (!(1 <= b.m_min && b.m_min <= b.m_max))
    return head + "M range [" + std::to_string(b.m_min) + ", " + std::to_string(b.m_max) +
           "] is empty or starts below 1";
  if (b.qweight_words != k / 8 * n_stride)
    return head + "qweight has " + std::to_string(b.qweight_words) + " words, expected " +
           std::to_string(k / 8 * n_stride);
  if (b.scales_count != k / gs * n_stride)
    return head + "scales has " + std::to_string(b.scales_count) + " values, expected " +
           std::to_string(k / gs * n_stride);
  if (b.bias && b.bias_count != n)
    return head + "bias has " + std::to_string(b.bias_count) + " values, expected " + std::to_string(n);
  std::vector<int> classes;
  for (const auto& entry : b.adapter_routes) classes.push_back(entry.first);
  for (size_t i = 0; i < classes.size(); ++i)
    for (size_t j = 0; j < i; ++j)
      if (classes[i] == classes[j]) {
        std::string listed;
        for (size_t c = 0; c < classes.size(); ++c)
          listed += std::string(c ? ", " : "") + "'" + adapter_class_name(classes[c]) + "'";
        return head + "adapter routes for [" + listed + "] must name each of ('discrete-gpu', 'integrated-gpu', " +
               "'cpu') at most once";
      }
  std::vector<const Route*> routes = {&b.route};
  for (const auto& entry : b.adapter_routes) routes.push_back(&entry.second);
  for (const Route* route : routes) {
    if (!kernel_info(route->decode_kernel).decode || !kernel_info(route->prefill_kernel).prefill)
      return head + "route " + kernel_name(route->decode_kernel) + "/" + kernel_name(route->prefill_kernel) +
             " is not a known kernel pair";
    const auto& buckets = route->prefill_buckets;
    for (size_t i = 0; i < buckets.size(); ++i)
      if (buckets[i].m_max < 2 || (i > 0 && buckets[i].m_max <= buckets[i - 1].m_max))
        return head + "prefill bucket bounds " + bounds_repr(buckets) + " must be >= 2 and strictly increasing";
    for (const auto& bucket : buckets)
      if (!kernel_info(bucket.kernel).prefill)
        return head + "prefill buckets " + buckets_repr(buckets) + " name a kernel that cannot run M > 1";
  }
  return "";
}

template <typename T>
bool load(const uint8_t* bytes, size_t size, uint64_t at, T* out) {
  if (at + sizeof(T) > size) return false;
  std::memcpy(out, bytes + at, sizeof(T));
  return true;
}

}  // namespace

// Field 0 of the root table (Q4Linear's and Graph's schema_version), read with
// every offset bounds-checked but nothing else verified yet. False: the header is unreadable.
bool read_schema_version(const uint8_t* bytes, size_t size, uint32_t* version) {
  uint32_t root = 0;
  int32_t to_vtable = 0;
  uint16_t vtable_size = 0, field = 0;
  if (!load(bytes, size, 0, &root) || !load(bytes, size, root, &to_vtable)) return false;
  const int64_t vtable = int64_t(root) - to_vtable;
  if (vtable < 0 || !load(bytes, size, uint64_t(vtable), &vtable_size)) return false;
  *version = 0;  // an absent field holds its default
  if (vtable_size < 6) return true;
  if (!load(bytes, size, uint64_t(vtable) + 4, &field)) return false;
  return field == 0 || load(bytes, size, uint64_t(root) + field, version);
}

// What fbverify.py checks of a table beyond what flatbuffers' Verifier does:
// its vtable size is even and >= 4, its inline size >= 4 and within the buffer.
// Holding the C++ reader to the same rules keeps the two readers' verdicts equal.
bool table_header_ok(const uint8_t* bytes, size_t size, const void* table) {
  const uint64_t pos = static_cast<const uint8_t*>(table) - bytes;
  int32_t to_vtable = 0;
  uint16_t vtable_size = 0, table_size = 0;
  if (!load(bytes, size, pos, &to_vtable)) return false;
  const int64_t vtable = int64_t(pos) - to_vtable;
  if (vtable < 0 || !load(bytes, size, uint64_t(vtable), &vtable_size) ||
      !load(bytes, size, uint64_t(vtable) + 2, &table_size))
    return false;
  return vtable_size >= 4 && vtable_size % 2 == 0 && table_size >= 4 && pos + table_size <= size;
}

// Strict UTF-8 as Python decodes it: no overlong forms, no surrogates, nothing above U+10FFFF.
bool valid_utf8(const std::string& s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const auto* end = p + s.size();
  while (p < end) {
    const unsigned char c = *p;
    int extra;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c < 0x80) { ++p; continue; }
    if (c >= 0xC2 && c <= 0xDF) extra = 1;
    else if (c == 0xE0) extra = 2, lo = 0xA0;
    else if (c == 0xED) extra = 2, hi = 0x9F;
    else if (c >= 0xE1 && c <= 0xEF) extra = 2;
    else if (c == 0xF0) extra = 3, lo = 0x90;
    else if (c >= 0xF1 && c <= 0xF3) extra = 3;
    else if (c == 0xF4) extra = 3, hi = 0x8F;
    else return false;
    if (end - p <= extra) return false;
    if (p[1] < lo || p[1] > hi) return false;
    for (int i = 2; i <= extra; ++i)
      if (p[i] < 0x80 || p[i] > 0xBF) return false;
    p += extra + 1;
  }
  return true;
}

std::string py_repr(const std::string& s) {
  const char quote = (s.find('\'') != std::string::npos && s.find('"') == std::string::npos) ? '"' : '\'';
  std::string out(1, quote);
  for (unsigned char c : s) {
    if (c == '\\') out += "\\\\";
    else if (c == quote) out += std::string("\\") + char(c);
    else if (c == '\n') out += "\\n";
    else if (c == '\r') out += "\\r";
    else if (c == '\t') out += "\\t";
    else if (c < 0x20 || c == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\x%02x", c);
      out += buf;
    } else {
      out += char(c);  // printable ASCII, or a byte of a (validated) UTF-8 character
    }
  }
  return out + quote;
}

const char* adapter_class_name(int adapter_class) {
  static const char* names[kAdapterClassCount] = {"discrete-gpu", "integrated-gpu", "cpu"};
  return 0 <= adapter_class && adapter_class < kAdapterClassCount ? names[adapter_class] : "?";
}

const Route& LinearBlob::route_for_adapter(int adapter_class, std::string* why) const {
  for (const auto& [cls, route] : adapter_routes)
    if (cls == adapter_class) {
      *why = std::string("routes for ") + adapter_class_name(cls) + " adapters";
      return route;
    }
  if (adapter_routes.empty()) {
    *why = "the blob's routes for every adapter";
    return this->route;
  }
  std::string named;
  for (size_t i = 0; i < adapter_routes.size(); ++i)
    named += std::string(i ? ", " : "") + adapter_class_name(adapter_routes[i].first);
  *why = "default routes: the blob has routes for " + named + " adapters, not for " +
         (adapter_class < 0 ? std::string("an adapter of unknown type") : adapter_class_name(adapter_class));
  return this->route;
}

const char* route_source_name(uint8_t source) {
  static const char* names[kRouteSourceCount] = {"default-rule", "forced", "route-table"};
  return source < kRouteSourceCount ? names[source] : "?";
}

Kernel Route::kernel_for(uint64_t m) const {
  if (m == 1) return decode_kernel;
  for (const auto& bucket : prefill_buckets)
    if (m <= bucket.m_max) return bucket.kernel;
  return prefill_buckets.empty() ? prefill_kernel : prefill_buckets.back().kernel;
}

uint32_t crc32(const void* data, size_t size, uint32_t crc) {
  static uint32_t table[256];
  static const bool filled = [] {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int j = 0; j < 8; ++j) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      table[i] = c;
    }
    return true;
  }();
  (void)filled;
  const auto* p = static_cast<const uint8_t*>(data);
  crc = ~crc;
  for (size_t i = 0; i < size; ++i) crc = table[(crc ^ p[i]) & 0xFF] ^ (crc >> 8);
  return ~crc;
}

namespace {

// The table headers of a Route and its buckets (fbverify's table rules); "" when sound.
std::string route_tables_problem(const uint8_t* bytes, size_t size, const wgq4::Route* r) {
  if (!r) return "";
  if (!table_header_ok(bytes, size, r))
    return "delegate blob is truncated or corrupted: a table's vtable or size is invalid";
  if (r->prefill_buckets())
    for (const wgq4::RouteBucket* bucket : *r->prefill_buckets())
      if (!table_header_ok(bytes, size, bucket))
        return "delegate blob is truncated or corrupted: a prefill bucket's vtable or size is invalid";
  return "";
}

// Every table header of the blob, before anything is read from it, as blob.py's fbverify
// checks the whole buffer first.
std::string tables_problem(const uint8_t* bytes, size_t size, const wgq4::Q4Linear* root) {
  if (!table_header_ok(bytes, size, root))
    return "delegate blob is truncated or corrupted: a table's vtable or size is invalid";
  std::string problem = route_tables_problem(bytes, size, root->route());
  if (!problem.empty() || !root->adapter_routes()) return problem;
  for (const wgq4::AdapterRoute* entry : *root->adapter_routes()) {
    if (!table_header_ok(bytes, size, entry))
      return "delegate blob is truncated or corrupted: a table's vtable or size is invalid";
    problem = route_tables_problem(bytes, size, entry->route());
    if (!problem.empty()) return problem;
  }
  return "";
}

// One Route table (the layer's, or an adapter route's), checked as blob.py's _read_route checks it.
std::string read_route(const wgq4::Route* r, Route* out) {
  const int decode = static_cast<int>(r->decode_kernel()), prefill = static_cast<int>(r->prefill_kernel());
  const int source = static_cast<int>(r->source());
  if (source < 0 || source >= kRouteSourceCount)
    return "delegate blob is corrupted: unknown route source enum value " + std::to_string(source);
  if (decode < 0 || decode >= kRoutableKernelCount)
    return "delegate blob is corrupted: unknown decode kernel route id " + std::to_string(decode);
  if (prefill < 0 || prefill >= kRoutableKernelCount)
    return "delegate blob is corrupted: unknown prefill kernel route id " + std::to_string(prefill);
  out->decode_kernel = static_cast<Kernel>(decode);
  out->prefill_kernel = static_cast<Kernel>(prefill);
  out->source = static_cast<uint8_t>(source);
  out->skinny_max_m = r->skinny_max_m();
  out->shmem_min_mn = r->shmem_min_mn();
  out->reason = fb_string(r->reason());
  out->table = fb_string(r->table());
  if (const auto* buckets = r->prefill_buckets()) {
    for (const wgq4::RouteBucket* bucket : *buckets) {
      const int kernel = static_cast<int>(bucket->kernel());
      if (kernel < 0 || kernel >= kRoutableKernelCount)
        return "delegate blob is corrupted: unknown prefill bucket kernel route id " + std::to_string(kernel);
      out->prefill_buckets.push_back({bucket->m_max(), static_cast<Kernel>(kernel)});
    }
  }
  return "";
}

}  // namespace

std::string read_blob(const void* data, size_t size, LinearBlob* out) {
  const auto* bytes = static_cast<const uint8_t*>(data);
  if (size < 8)
    return "delegate blob is truncated: " + std::to_string(size) + " bytes, a blob has at least 8";
  if (std::memcmp(bytes + 4, wgq4::Q4LinearIdentifier(), 4) != 0)
    return "not an executorch_wgpu blob: no magic 'WGQ4' at offset 4";
  // The version first, as blob.py does, so a blob of another version is named
  // as such even when this reader could not verify the rest of it.
  uint32_t version = 0;
  if (!read_schema_version(bytes, size, &version))
    return "delegate blob is truncated or corrupted: cannot read its header";
  if (version < WGQ4_OLDEST_READABLE_VERSION || version > WGQ4_SCHEMA_VERSION)
    return "delegate blob has schema version " + std::to_string(version) + "; this executorch_wgpu reads versions " +
           std::to_string(WGQ4_OLDEST_READABLE_VERSION) + " to " + std::to_string(WGQ4_SCHEMA_VERSION) +
           " only: " +
           (version > WGQ4_SCHEMA_VERSION
                ? "a newer executorch_wgpu wrote it: upgrade executorch_wgpu, or re-export the model with this one"
                : "re-export the model with this version of executorch_wgpu");
  // Every offset, count and length against the blob's size before any accessor follows one.
  if (size >= FLATBUFFERS_MAX_BUFFER_SIZE)
    return "delegate blob is too large: " + std::to_string(size) + " bytes";
  flatbuffers::Verifier verifier(bytes, size);
  if (!wgq4::VerifyQ4LinearBuffer(verifier))
    return "delegate blob is truncated or corrupted: the flatbuffer verifier rejects it";
  const wgq4::Q4Linear* root = wgq4::GetQ4Linear(bytes);
  std::string problem = tables_problem(bytes, size, root);
  if (!problem.empty()) return problem;

  const wgq4::Route* r = root->route();
  if (!r) return "delegate blob is corrupted: it has no route record";
  LinearBlob b;
  b.schema_version = version;
  problem = read_route(r, &b.route);
  if (!problem.empty()) return problem;
  if (const auto* entries = root->adapter_routes()) {
    for (const wgq4::AdapterRoute* entry : *entries) {
      const int cls = static_cast<int>(entry->adapter_class());
      if (cls < 0 || cls >= kAdapterClassCount)
        return "delegate blob is corrupted: unknown adapter class enum value " + std::to_string(cls);
      if (!entry->route()) return "delegate blob is corrupted: an adapter route has no route record";
      Route route;
      problem = read_route(entry->route(), &route);
      if (!problem.empty()) return problem;
      b.adapter_routes.emplace_back(cls, std::move(route));
    }
  }
  b.prefill_precision = static_cast<int>(root->prefill_precision());
  if (b.prefill_precision < 0 || b.prefill_precision >= kPrecisionCount)
    return "delegate blob is corrupted: unknown prefill precision enum value " + std::to_string(b.prefill_precision);
  b.name = fb_string(root->name());
  std::vector<const std::string*> texts = {&b.name, &b.route.reason, &b.route.table};
  for (const auto& [cls, route] : b.adapter_routes) texts.insert(texts.end(), {&route.reason, &route.table});
  for (const std::string* text : texts)
    if (!valid_utf8(*text)) return "delegate blob is truncated or corrupted: a string is not valid UTF-8";
  b.in_features = root->in_features();
  b.out_features = root->out_features();
  b.group_size = root->group_size();
  b.n_stride = root->n_stride();
  b.m_min = root->m_min();
  b.m_max = root->m_max();
  if (!root->qweight() || !root->scales())
    return "delegate blob is corrupted: weight or scale vector is missing";
  b.qweight = root->qweight()->data();
  b.qweight_words = root->qweight()->size();
  b.scales = root->scales()->data();
  b.scales_count = root->scales()->size();
  if (root->bias() && root->bias()->size() > 0) {
    b.bias = root->bias()->data();
    b.bias_count = root->bias()->size();
  }
  b.checksum = root->checksum();

  problem = check_record(b);
  if (!problem.empty()) return problem;
  uint32_t crc = crc32(b.qweight, b.qweight_words * 4);
  crc = crc32(b.scales, b.scales_count * 4, crc);
  if (b.bias) crc = crc32(b.bias, b.bias_count * 4, crc);
  if (crc != b.checksum)
    return "delegate blob of layer " + py_repr(b.name) + " is corrupted: payload checksum mismatch";
  *out = std::move(b);
  return "";
}

}  // namespace wgq4_native
