// Shared by the rotary position embedding kernels (registry.py: prelude "rope_prelude.wgsl"): rope and
// rope_qk_cache. Both bind cos_t and sin_t and name their strides Params c0..c3 and s0..s3.
//
// ExecuTorch's apply_rotary_emb rotates interleaved pairs (x[2i], x[2i + 1]) of a head's D values by
// the angle of pair i:
//   out[2i]     = x[2i] * cos[i] - x[2i + 1] * sin[i]
//   out[2i + 1] = x[2i] * sin[i] + x[2i + 1] * cos[i]

// The rotated pair of x = (x[2i], x[2i + 1]) by the angle whose cosine and sine are cs = (cos, sin).
fn rotate_pair(x: vec2<f32>, cs: vec2<f32>) -> vec2<f32> {
    return vec2<f32>(x.x * cs.x - x.y * cs.y, x.x * cs.y + x.y * cs.x);
}

// (cos, sin) of pair index (i0, i1, i2, i3) of a 4-D pair grid [d0, d1, d2, D / 2]: cos_t and sin_t are
// read through their own strides (a broadcast dim strides 0), Params c0..c3 and s0..s3.
fn rope_angle(i0: u32, i1: u32, i2: u32, i3: u32) -> vec2<f32> {
    let ic = i0 * params.c0 + i1 * params.c1 + i2 * params.c2 + i3 * params.c3;
    let is = i0 * params.s0 + i1 * params.s1 + i2 * params.s2 + i3 * params.s3;
    return vec2<f32>(cos_t[ic], sin_t[is]);
}
