// q4gsw register-tiled GEMM: y[M, N] = x[M, K] @ dequant(W)^T + bias, straight from global memory.
//
// Tiling: an 8 x 8 workgroup computes a 32 x 32 output tile; thread (tx, ty)
// keeps a 4 x 4 block (rows 4*ty.., one column quad tx) in four vec4
// accumulators. Each thread dequantizes its own 4 columns x 8 k per step: no
// workgroup memory, so the same weights are dequantized again by every
// thread row of the grid (the cost the shared-memory GEMM removes).
//
// Layout (see backend/serialization/schema.fbs):
//   x       [M][K] fp32, read as vec4
//   qweight [n_stride/16][K/8][16] u32, read as vec4<u32> (4 adjacent columns):
//           nibble j of word (k8, n) = code(8*k8 + j, n) + 8
//   scales  [n_stride/16][K/gs][16] fp32
//   bias    [n_stride] fp32 (zeros when the layer has none)
//   y       [M][N] fp32
// Preconditions: gs % 32 == 0, K % gs == 0, n_stride = N rounded up to 16, M >= 1.
// Partial tiles: rows >= M read row M-1 and are not stored; columns >= N are not stored.
// Dispatch: (ceil(n_stride / 32), ceil(M / 32), 1).

struct Params {
    M: u32,
    K: u32,
    N: u32,
    n_stride: u32,
    group_size: u32,
    k_splits: u32,   // unused here (always 1)
    k_chunk: u32,    // unused here
    _pad: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> qweight: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> scales: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> bias: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;

// Nibble -> code as f32 without an int-to-float convert (quarter rate on
// NVIDIA): 0x4B000000 | q is the float 2^23 + q exactly, so subtracting
// 2^23 + 8 leaves q - 8 exactly.
fn nib(w: vec4<u32>, shift: u32) -> vec4<f32> {
    let q = (w >> vec4<u32>(shift)) & vec4<u32>(0xFu);
    return bitcast<vec4<f32>>(q | vec4<u32>(0x4B000000u)) - vec4<f32>(8388616.0);
}

// One row's contribution of 8 k: x row slice (xa, xb) times the dequantized 8 x 4 block.
fn dot8(xa: vec4<f32>, xb: vec4<f32>, w0: vec4<f32>, w1: vec4<f32>, w2: vec4<f32>, w3: vec4<f32>,
        w4: vec4<f32>, w5: vec4<f32>, w6: vec4<f32>, w7: vec4<f32>) -> vec4<f32> {
    return xa.x * w0 + xa.y * w1 + xa.z * w2 + xa.w * w3 + xb.x * w4 + xb.y * w5 + xb.z * w6 + xb.w * w7;
}

fn store_row(m: u32, n4: u32, v: vec4<f32>) {
    if (m >= params.M) {
        return;
    }
    for (var c = 0u; c < 4u; c++) {
        let n = 4u * n4 + c;
        if (n < params.N) {
            y[m * params.N + n] = v[c];
        }
    }
}

@compute @workgroup_size(8, 8, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let quads = params.n_stride / 4u;
    let n4 = gid.x;
    let m0 = gid.y * 4u;
    if (n4 >= quads || m0 >= params.M) {
        return;
    }
    let k4_count = params.K / 4u;
    let k8_count = params.K / 8u;
    let words_per_group = params.group_size / 8u;
    let block = (n4 / 4u) * k8_count * 4u + n4 % 4u;   // quad n4 of its 16-column block, k8 = 0
    let scale_block = (n4 / 4u) * (params.K / params.group_size) * 4u + n4 % 4u;
    let last = params.M - 1u;
    let r0 = m0 * k4_count;
    let r1 = min(m0 + 1u, last) * k4_count;
    let r2 = min(m0 + 2u, last) * k4_count;
    let r3 = min(m0 + 3u, last) * k4_count;

    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var k8 = 0u; k8 < k8_count; k8++) {
        let w = qweight[block + k8 * 4u];
        let s = scales[scale_block + (k8 / words_per_group) * 4u];
        let w0 = nib(w, 0u) * s;
        let w1 = nib(w, 4u) * s;
        let w2 = nib(w, 8u) * s;
        let w3 = nib(w, 12u) * s;
        let w4 = nib(w, 16u) * s;
        let w5 = nib(w, 20u) * s;
        let w6 = nib(w, 24u) * s;
        let w7 = nib(w, 28u) * s;
        let kx = 2u * k8;
        acc0 += dot8(x[r0 + kx], x[r0 + kx + 1u], w0, w1, w2, w3, w4, w5, w6, w7);
        acc1 += dot8(x[r1 + kx], x[r1 + kx + 1u], w0, w1, w2, w3, w4, w5, w6, w7);
        acc2 += dot8(x[r2 + kx], x[r2 + kx + 1u], w0, w1, w2, w3, w4, w5, w6, w7);
        acc3 += dot8(x[r3 + kx], x[r3 + kx + 1u], w0, w1, w2, w3, w4, w5, w6, w7);
    }
    let b = bias[n4];
    store_row(m0, n4, acc0 + b);
    store_row(m0 + 1u, n4, acc1 + b);
    store_row(m0 + 2u, n4, acc2 + b);
    store_row(m0 + 3u, n4, acc3 + b);
}
