// See graph_reader.h. Check order and error words follow graph_blob.py.
#include "graph_reader.h"

#include <cstring>
#include <limits>

#include "blob_reader.h"       // read_schema_version, table_header_ok, valid_utf8, py_repr
#include "graph_generated.h"   // flatc --cpp backend/serialization/graph.fbs
#include "kernel_params.h"     // runtime_native/kernel_params.py, from shaders/registry.py

namespace wgq4_native {

namespace {

// graph_blob.EXPR_OPS: code -> (name, operands popped).
enum ExprOp : uint8_t {
  kConst = 0, kSymbol = 1, kAdd = 2, kMul = 3, kFloorDiv = 4, kMod = 5, kMin = 6, kMax = 7,
  kNeg = 8, kLt = 9, kLe = 10, kEq = 11, kNe = 12, kAnd = 13, kOr = 14, kNot = 15,
};
constexpr int kExprOpCount = 16;
constexpr int kArity[kExprOpCount] = {0, 0, 2, 2, 2, 2, 2, 2, 1, 2, 2, 2, 2, 2, 2, 1};
constexpr int kSymbolSourceCount = 2, kBufferKindCount = 3, kDTypeCount = 4;

const std::string kCorrupted = "graph blob is corrupted: ";
const std::string kTruncated = "graph blob is truncated or corrupted: ";

std::string fb_string(const flatbuffers::String* s) { return s ? s->str() : std::string(); }

template <typename T>
std::vector<T> fb_vector(const flatbuffers::Vector<T>* v) {
  return v ? std::vector<T>(v->begin(), v->end()) : std::vector<T>();
}

std::string unknown_enum(const char* what, int code) {
  return kCorrupted + "unknown " + what + " enum value " + std::to_string(code);
}

// Every table's header (fbverify's rules, as blob_reader's tables_problem checks the WGQ4 blob's).
template <typename T>
bool tables_ok(const uint8_t* bytes, size_t size, const flatbuffers::Vector<flatbuffers::Offset<T>>* tables) {
  if (!tables) return true;
  for (const T* t : *tables)
    if (!table_header_ok(bytes, size, t)) return false;
  return true;
}

bool parts_ok(const uint8_t* bytes, size_t size, const flatbuffers::Vector<flatbuffers::Offset<wggr::Linear>>* linears) {
  if (!linears) return true;
  for (const wggr::Linear* l : *linears)
    if (!tables_ok(bytes, size, l->parts())) return false;
  return true;
}

bool all_tables_ok(const uint8_t* bytes, size_t size, const wggr::Graph* root) {
  return table_header_ok(bytes, size, root) && tables_ok(bytes, size, root->symbols()) &&
         tables_ok(bytes, size, root->exprs()) && tables_ok(bytes, size, root->checks()) &&
         tables_ok(bytes, size, root->buffers()) && tables_ok(bytes, size, root->inputs()) &&
         tables_ok(bytes, size, root->outputs()) && tables_ok(bytes, size, root->steps()) &&
         tables_ok(bytes, size, root->linears()) && parts_ok(bytes, size, root->linears());
}

// The bytes the objects reached claim, as fbverify.py counts them: 8 for the header, 4 per table, 4 + length
// + 1 per string, 4 + count x element size per vector (4 per element of a vector of tables or strings). A
// writer never shares or overlaps objects, so a blob whose objects claim more than its size has offsets that
// point several places at one region: fbverify refuses it, and so does this reader.
uint64_t claimed(const flatbuffers::String* s) { return s ? 4 + uint64_t(s->size()) + 1 : 0; }
template <typename T>
uint64_t claimed(const flatbuffers::Vector<T>* v) { return v ? 4 + uint64_t(v->size()) * sizeof(T) : 0; }
template <typename T, typename F>
uint64_t claimed_tables(const flatbuffers::Vector<flatbuffers::Offset<T>>* v, F table_bytes) {
  if (!v) return 0;
  uint64_t n = 4 + 4 * uint64_t(v->size());
  for (const T* t : *v) n += 4 + table_bytes(t);
  return n;
}

uint64_t claimed_bytes(const wggr::Graph* g) {
  uint64_t n = 8 + 4;
  n += claimed_tables(g->symbols(), [](const wggr::Symbol* s) { return claimed(s->name()); });
  n += claimed_tables(g->exprs(), [](const wggr::Expr* e) { return claimed(e->ops()) + claimed(e->args()); });
  n += claimed_tables(g->checks(), [](const wggr::Check* c) { return claimed(c->message()); });
  n += claimed_tables(g->buffers(),
                      [](const wggr::Buffer* b) { return claimed(b->data_key()) + claimed(b->name()); });
  const auto io = [](const wggr::IO* t) { return claimed(t->shape()) + claimed(t->name()); };
  n += claimed_tables(g->inputs(), io) + claimed_tables(g->outputs(), io);
  n += claimed_tables(g->steps(), [](const wggr::Step* s) {
    return claimed(s->kernel()) + claimed(s->bindings()) + claimed(s->params()) + claimed(s->groups()) +
           claimed(s->node());
  });
  n += claimed_tables(g->linears(), [](const wggr::Linear* l) {
    return claimed(l->blob_key()) +
           claimed_tables(l->parts(), [](const wggr::LinearPart* p) { return claimed(p->name()); });
  });
  return n;
}

// graph_blob._read: every field, with the enum and length checks it makes on the way.
std::string read_fields(const wggr::Graph* root, GraphBlob* g) {
  if (const auto* symbols = root->symbols()) {
    for (const wggr::Symbol* s : *symbols) {
      const int source = static_cast<int>(s->source());
      if (source < 0 || source >= kSymbolSourceCount) return unknown_enum("SymbolSource", source);
      g->symbols.push_back({fb_string(s->name()), SymbolSource(source), s->input(), s->index(), s->min(), s->max()});
    }
  }
  if (const auto* exprs = root->exprs()) {
    for (flatbuffers::uoffset_t i = 0; i < exprs->size(); ++i) {
      const wggr::Expr* e = exprs->Get(i);
      GraphExpr expr{fb_vector(e->ops()), fb_vector(e->args())};
      if (expr.ops.size() != expr.args.size())
        return kCorrupted + "expression " + std::to_string(i) + " has " + std::to_string(expr.ops.size()) +
               " operators and " + std::to_string(expr.args.size()) + " arguments";
      g->exprs.push_back(std::move(expr));
    }
  }
  if (const auto* checks = root->checks())
    for (const wggr::Check* c : *checks) g->checks.push_back({c->expr(), fb_string(c->message())});
  if (const auto* buffers = root->buffers()) {
    for (const wggr::Buffer* b : *buffers) {
      const int kind = static_cast<int>(b->kind());
      if (kind < 0 || kind >= kBufferKindCount) return unknown_enum("BufferKind", kind);
      g->buffers.push_back({BufferKind(kind), b->bytes(), fb_string(b->data_key()), fb_string(b->name())});
    }
  }
  for (auto [tables, out] : {std::make_pair(root->inputs(), &g->inputs), std::make_pair(root->outputs(), &g->outputs)}) {
    if (!tables) continue;
    for (const wggr::IO* x : *tables) {
      const int dtype = static_cast<int>(x->dtype());
      if (dtype < 0 || dtype >= kDTypeCount) return unknown_enum("DType", dtype);
      out->push_back({x->buffer(), GraphDType(dtype), fb_vector(x->shape()), x->max_value(), fb_string(x->name())});
    }
  }
  if (const auto* steps = root->steps()) {
    for (const wggr::Step* st : *steps) {
      GraphStep step;
      step.kernel = fb_string(st->kernel());
      step.bindings = fb_vector(st->bindings());
      step.params = fb_vector(st->params());
      step.groups = fb_vector(st->groups());
      step.linear = st->linear();
      step.node = fb_string(st->node());
      g->steps.push_back(std::move(step));
    }
  }
  if (const auto* linears = root->linears()) {
    for (const wggr::Linear* l : *linears) {
      GraphLinear lin{fb_string(l->blob_key()), l->x(), l->y(), l->m(), {}};
      if (const auto* parts = l->parts())
        for (const wggr::LinearPart* p : *parts) lin.parts.push_back({p->y(), p->columns(), fb_string(p->name())});
      g->linears.push_back(std::move(lin));
    }
  }

  // Python decodes every string as it reads it: one that is not UTF-8 is refused.
  std::vector<const std::string*> texts;
  for (const auto& s : g->symbols) texts.push_back(&s.name);
  for (const auto& c : g->checks) texts.push_back(&c.message);
  for (const auto& b : g->buffers) texts.insert(texts.end(), {&b.data_key, &b.name});
  for (const auto* io : {&g->inputs, &g->outputs})
    for (const auto& x : *io) texts.push_back(&x.name);
  for (const auto& st : g->steps) texts.insert(texts.end(), {&st.kernel, &st.node});
  for (const auto& l : g->linears) {
    texts.push_back(&l.blob_key);
    for (const auto& p : l.parts) texts.push_back(&p.name);
  }
  for (const std::string* text : texts)
    if (!valid_utf8(*text)) return kTruncated + "a string is not valid UTF-8";
  return "";
}

std::string check_expr(const GraphExpr& e, size_t n_symbols, const std::string& where) {
  int64_t depth = 0;
  for (size_t i = 0; i < e.ops.size(); ++i) {
    const int code = e.ops[i];
    if (code >= kExprOpCount) return kCorrupted + where + " has unknown operator code " + std::to_string(code);
    if (code == kSymbol && !(0 <= e.args[i] && uint64_t(e.args[i]) < n_symbols))
      return kCorrupted + where + " refers to symbol " + std::to_string(e.args[i]) + " of " +
             std::to_string(n_symbols);
    if (depth < kArity[code]) return kCorrupted + where + " is not a well-formed expression";
    depth += 1 - kArity[code];
  }
  if (depth != 1) return kCorrupted + where + " is not a well-formed expression";
  return "";
}

// graph_blob.check_graph, plus what this runtime needs to trust every index it follows.
std::string check_graph(GraphBlob* g) {
  const size_t n_buf = g->buffers.size(), n_expr = g->exprs.size();
  for (size_t i = 0; i < g->exprs.size(); ++i) {
    std::string problem = check_expr(g->exprs[i], g->symbols.size(), "expression " + std::to_string(i));
    if (!problem.empty()) return problem;
  }
  auto expr_ok = [n_expr](uint32_t index, const std::string& where) {
    return index < n_expr ? std::string()
                          : kCorrupted + where + " refers to expression " + std::to_string(index) + " of " +
                                std::to_string(n_expr);
  };
  for (const GraphSymbol& s : g->symbols) {
    if (s.input >= g->inputs.size())
      return kCorrupted + "symbol " + py_repr(s.name) + " reads input " + std::to_string(s.input) + " of " +
             std::to_string(g->inputs.size());
    if (s.min > s.max)
      return kCorrupted + "symbol " + py_repr(s.name) + " has range [" + std::to_string(s.min) + ", " +
             std::to_string(s.max) + "]";
  }
  for (const GraphCheck& c : g->checks) {
    std::string problem = expr_ok(c.expr, "a check");
    if (!problem.empty()) return problem;
  }
  for (auto [what, items] : {std::make_pair("input", &g->inputs), std::make_pair("output", &g->outputs)}) {
    for (const GraphIO& x : *items) {
      if (x.buffer >= n_buf)
        return kCorrupted + what + " " + py_repr(x.name) + " refers to buffer " + std::to_string(x.buffer) + " of " +
               std::to_string(n_buf);
      for (uint32_t d : x.shape) {
        std::string problem = expr_ok(d, std::string(what) + " " + py_repr(x.name));
        if (!problem.empty()) return problem;
      }
    }
  }
  for (GraphStep& st : g->steps) {
    const std::string where = "step " + py_repr(st.node);
    if (st.linear >= 0) {
      if (size_t(st.linear) >= g->linears.size())
        return kCorrupted + where + " refers to linear " + std::to_string(st.linear) + " of " +
               std::to_string(g->linears.size());
      continue;
    }
    const KernelInfo* k = find_kernel(st.kernel.c_str());
    const int n_params = kernel_param_count(st.kernel.c_str());
    if (!k || n_params < 0)
      return kCorrupted + where + " names kernel " + py_repr(st.kernel) + ", which this executorch_wgpu does not have";
    if (st.bindings.size() != size_t(k->binding_count) || st.params.size() != size_t(n_params) ||
        st.groups.size() != 3)
      return kCorrupted + where + ": kernel " + k->name + " takes " + std::to_string(k->binding_count) +
             " bindings, " + std::to_string(n_params) + " params and a 3-D grid; the step has " +
             std::to_string(st.bindings.size()) + ", " + std::to_string(st.params.size()) + " and " +
             std::to_string(st.groups.size());
    // Python skips binding 0 (the params uniform); every binding that is not a uniform is a buffer here.
    for (size_t i = 0; i < st.bindings.size(); ++i)
      if (k->layout[i] != WGPUBufferBindingType_Uniform && st.bindings[i] >= n_buf)
        return kCorrupted + where + " binds buffer " + std::to_string(st.bindings[i]) + " of " + std::to_string(n_buf);
    for (uint32_t index : st.params) {
      std::string problem = expr_ok(index, where);
      if (!problem.empty()) return problem;
    }
    for (uint32_t index : st.groups) {
      std::string problem = expr_ok(index, where);
      if (!problem.empty()) return problem;
    }
    st.info = k;
  }
  for (const GraphLinear& lin : g->linears) {
    if (lin.x >= n_buf || lin.y >= n_buf)
      return kCorrupted + "linear " + py_repr(lin.blob_key) + " refers to buffers " + std::to_string(lin.x) + ", " +
             std::to_string(lin.y) + " of " + std::to_string(n_buf);
    std::string problem = expr_ok(lin.m, "linear " + py_repr(lin.blob_key));
    if (!problem.empty()) return problem;
    if (lin.parts.empty()) continue;
    const std::string where = "linear " + py_repr(lin.blob_key);
    if (lin.parts.size() < 2 || lin.parts.size() > kQ4OutputPartCount)
      return kCorrupted + where + " has " + std::to_string(lin.parts.size()) + " parts; a fused linear has 2 to " +
             std::to_string(kQ4OutputPartCount);
    if (lin.parts[0].y != lin.y)
      return kCorrupted + where + " writes its first part to buffer " + std::to_string(lin.parts[0].y) +
             ", not its y " + std::to_string(lin.y);
    for (const GraphLinearPart& p : lin.parts) {
      if (p.y >= n_buf)
        return kCorrupted + where + ": part " + py_repr(p.name) + " refers to buffer " + std::to_string(p.y) + " of " +
               std::to_string(n_buf);
      if (p.columns < 1) return kCorrupted + where + ": part " + py_repr(p.name) + " has no columns";
    }
    for (size_t a = 0; a < lin.parts.size(); ++a)
      for (size_t b = a + 1; b < lin.parts.size(); ++b)
        if (lin.parts[a].y == lin.parts[b].y) return kCorrupted + where + ": two of its parts share a buffer";
  }
  return "";
}

}  // namespace

const char* dtype_name(GraphDType d) {
  static const char* names[kDTypeCount] = {"f32", "i32", "i64", "bool"};
  return uint8_t(d) < kDTypeCount ? names[uint8_t(d)] : "?";
}

bool is_graph_blob(const void* data, size_t size) {
  return size >= 8 && std::memcmp(static_cast<const uint8_t*>(data) + 4, wggr::GraphIdentifier(), 4) == 0;
}

int kernel_param_count(const char* kernel) {
  for (const KernelParams& k : kKernelParams)
    if (std::strcmp(k.kernel, kernel) == 0) return k.count;
  return -1;
}

std::string read_graph_blob(const void* data, size_t size, GraphBlob* out, bool* version_problem) {
  const auto* bytes = static_cast<const uint8_t*>(data);
  *version_problem = false;
  if (!is_graph_blob(data, size)) return "not an executorch_wgpu graph blob: no magic 'WGGR' at offset 4";
  // The version first, as graph_blob.py does: a blob of another version is named as such
  // even when this reader could not verify the rest of it.
  uint32_t version = 0;
  if (!read_schema_version(bytes, size, &version)) return kTruncated + "cannot read its header";
  if (version < WGGR_OLDEST_READABLE_VERSION || version > WGGR_SCHEMA_VERSION) {
    *version_problem = true;
    return "graph blob has schema version " + std::to_string(version) + "; this executorch_wgpu reads versions " +
           std::to_string(WGGR_OLDEST_READABLE_VERSION) + " to " + std::to_string(WGGR_SCHEMA_VERSION) + ": " +
           (version > WGGR_SCHEMA_VERSION ? "upgrade executorch_wgpu, or re-export the model with this one"
                                          : "re-export the model with this version of executorch_wgpu");
  }
  // Every offset, count and length against the blob's size before any accessor follows one.
  if (size >= FLATBUFFERS_MAX_BUFFER_SIZE) return "graph blob is too large: " + std::to_string(size) + " bytes";
  flatbuffers::Verifier verifier(bytes, size);
  if (!wggr::VerifyGraphBuffer(verifier)) return kTruncated + "the flatbuffer verifier rejects it";
  const wggr::Graph* root = wggr::GetGraph(bytes);
  if (!all_tables_ok(bytes, size, root)) return kTruncated + "a table's vtable or size is invalid";
  if (claimed_bytes(root) > size)
    return kTruncated + "the objects reached claim more than the blob's " + std::to_string(size) +
           " bytes (offsets share or overlap regions)";
  GraphBlob g;
  g.schema_version = version;
  std::string problem = read_fields(root, &g);
  if (problem.empty()) problem = check_graph(&g);
  if (!problem.empty()) return problem;
  *out = std::move(g);
  return "";
}

std::string evaluate_exprs(const GraphBlob& g, const std::vector<int64_t>& symbols, std::vector<int64_t>* values,
                           std::vector<int64_t>* stack) {
  values->resize(g.exprs.size());
  for (size_t e = 0; e < g.exprs.size(); ++e) {
    const GraphExpr& expr = g.exprs[e];
    stack->clear();
    const char* problem = nullptr;
    for (size_t t = 0; t < expr.ops.size() && !problem; ++t) {
      const uint8_t op = expr.ops[t];  // checked at load: known, with its operands on the stack
      if (op == kConst) {
        stack->push_back(expr.args[t]);
        continue;
      }
      if (op == kSymbol) {
        stack->push_back(symbols[size_t(expr.args[t])]);
        continue;
      }
      const int64_t b = stack->back();
      if (kArity[op] == 1) {
        int64_t& a = stack->back();
        if (op == kNeg) {
          if (a == std::numeric_limits<int64_t>::min()) problem = "does not fit 64-bit integers";
          else a = -a;
        } else {  // kNot
          a = a == 0;
        }
        continue;
      }
      stack->pop_back();
      int64_t& a = stack->back();
      int64_t r = 0;
      switch (op) {
        case kAdd:
          if (__builtin_add_overflow(a, b, &r)) problem = "does not fit 64-bit integers";
          break;
        case kMul:
          if (__builtin_mul_overflow(a, b, &r)) problem = "does not fit 64-bit integers";
          break;
        case kFloorDiv:  // Python's //: rounds toward minus infinity
          if (b == 0) problem = "divides by zero";
          else if (b == -1) {
            if (a == std::numeric_limits<int64_t>::min()) problem = "does not fit 64-bit integers";
            else r = -a;
          } else {
            r = a / b;
            if (a % b != 0 && ((a < 0) != (b < 0))) r -= 1;
          }
          break;
        case kMod:  // Python's %: the divisor's sign
          if (b == 0) problem = "divides by zero";
          else if (b == -1) r = 0;
          else {
            r = a % b;
            if (r != 0 && ((r < 0) != (b < 0))) r += b;
          }
          break;
        case kMin: r = a < b ? a : b; break;
        case kMax: r = a > b ? a : b; break;
        case kLt: r = a < b; break;
        case kLe: r = a <= b; break;
        case kEq: r = a == b; break;
        case kNe: r = a != b; break;
        case kAnd: r = (a != 0) && (b != 0); break;
        case kOr: r = (a != 0) || (b != 0); break;
        default: problem = "has an unknown operator"; break;
      }
      a = r;
    }
    if (problem) return "expression " + std::to_string(e) + " " + problem + " for these inputs";
    (*values)[e] = stack->back();
  }
  return "";
}

}  // namespace wgq4_native
