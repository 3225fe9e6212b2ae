// The WGSL kernels of shaders/, embedded at build time (embed_shaders.cmake).
#pragma once

namespace wgq4_native {

struct EmbeddedShader {
  const char* file;    // file name in shaders/, e.g. "q4gsw_gemv.wgsl"
  const char* source;  // its text, byte for byte
};

extern const EmbeddedShader kEmbeddedShaders[];
extern const int kEmbeddedShaderCount;

// The source of shaders/<file>, or nullptr when the build embedded no such file.
inline const char* embedded_shader(const char* file) {
  for (int i = 0; i < kEmbeddedShaderCount; ++i) {
    const char* a = kEmbeddedShaders[i].file;
    const char* b = file;
    while (*a && *a == *b) ++a, ++b;
    if (*a == *b) return kEmbeddedShaders[i].source;
  }
  return nullptr;
}

}  // namespace wgq4_native
