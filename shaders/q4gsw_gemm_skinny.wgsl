// q4gsw skinny GEMM: y[M, N] = x[M, K] @ dequant(W)^T + bias, for small M (prefill of short prompts).
//
// The GEMV's shape (q4gsw_gemv.wgsl) with a 4-row register tile: a 4 x 64
// workgroup covers 4 column quads (16 columns) of a block of 4 rows, and
// splits K 64 ways. Thread (tx, ty) owns column quad tx and walks
// quantization groups ty, ty + 64, ...; each packed word it loads (4 columns
// x 8 k) is dequantized once in registers and used for all 4 rows, so
// weights are read and dequantized once per 4 rows, from no workgroup memory.
// The 64 partial 4 x 4 blocks are tree-reduced in workgroup memory in a fixed
// order (bit-reproducible). Many small workgroups keep every multiprocessor
// busy at small M, where the 128 x 128 tiles of the shared-memory GEMM would
// mostly compute padding.
//
// Layout (see backend/serialization/schema.fbs):
//   x       [M][K] fp32, read as vec4
//   qweight [n_stride/16][K/8][16] u32, read as vec4<u32> (4 adjacent columns):
//           nibble j of word (k8, n) = code(8*k8 + j, n) + 8
//   scales  [n_stride/16][K/gs][16] fp32, read as vec4
//   bias    [n_stride] fp32 (zeros when the layer has none)
//   y       [M][N] fp32
// Preconditions: gs % 32 == 0, K % gs == 0, n_stride = N rounded up to 16, M >= 1.
// Partial row blocks: rows >= M read row M - 1 and are not stored.
// Dispatch: (n_stride / 16, ceil(M / 4), 1): one workgroup per 16-column block and 4 rows. Workgroup memory: 16 KiB.

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

const QUADS: u32 = 4u;     // column quads per workgroup (16 columns)
const SLICES: u32 = 64u;   // ways K is split inside a workgroup
const ROWS: u32 = 4u;      // rows per workgroup (the register tile's height)

var<workgroup> partial: array<vec4<f32>, 1024>;   // [row][slice][quad]

// Nibble -> code as f32 without an int-to-float convert (quarter rate on
// NVIDIA): 0x4B000000 | q is the float 2^23 + q exactly, so subtracting
// 2^23 + 8 leaves q - 8 exactly.
fn nib(w: vec4<u32>, shift: u32) -> vec4<f32> {
    let q = (w >> vec4<u32>(shift)) & vec4<u32>(0xFu);
    return bitcast<vec4<f32>>(q | vec4<u32>(0x4B000000u)) - vec4<f32>(8388616.0);
}

// x[row, 8*k8 .. 8*k8+7] . the 8 x 4 dequantized block (w0..w7 are its k rows)
fn dot8(r: u32, k8: u32, w0: vec4<f32>, w1: vec4<f32>, w2: vec4<f32>, w3: vec4<f32>,
        w4: vec4<f32>, w5: vec4<f32>, w6: vec4<f32>, w7: vec4<f32>) -> vec4<f32> {
    let xa = x[r + 2u * k8];
    let xb = x[r + 2u * k8 + 1u];
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

@compute @workgroup_size(4, 64, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let quads = params.n_stride / 4u;
    let n4 = wg.x * QUADS + lid.x;
    let m0 = wg.y * ROWS;
    let groups = params.K / params.group_size;
    let words_per_group = params.group_size / 8u;
    let block = wg.x * (params.K / 8u) * 4u + lid.x;   // this workgroup's 16 columns, quad lid.x, k8 = 0
    let scale_block = wg.x * groups * 4u + lid.x;      // the same columns' scales, group 0
    let k4_count = params.K / 4u;
    let last = params.M - 1u;
    let r0 = m0 * k4_count;
    let r1 = min(m0 + 1u, last) * k4_count;
    let r2 = min(m0 + 2u, last) * k4_count;
    let r3 = min(m0 + 3u, last) * k4_count;

    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    if (n4 < quads) {
        for (var g = lid.y; g < groups; g += SLICES) {
            let s = scales[scale_block + g * 4u];
            var d0 = vec4<f32>(0.0);
            var d1 = vec4<f32>(0.0);
            var d2 = vec4<f32>(0.0);
            var d3 = vec4<f32>(0.0);
            for (var j = 0u; j < words_per_group; j++) {
                let k8 = g * words_per_group + j;
                let w = qweight[block + k8 * 4u];
                let w0 = nib(w, 0u);
                let w1 = nib(w, 4u);
                let w2 = nib(w, 8u);
                let w3 = nib(w, 12u);
                let w4 = nib(w, 16u);
                let w5 = nib(w, 20u);
                let w6 = nib(w, 24u);
                let w7 = nib(w, 28u);
                d0 += dot8(r0, k8, w0, w1, w2, w3, w4, w5, w6, w7);
                d1 += dot8(r1, k8, w0, w1, w2, w3, w4, w5, w6, w7);
                d2 += dot8(r2, k8, w0, w1, w2, w3, w4, w5, w6, w7);
                d3 += dot8(r3, k8, w0, w1, w2, w3, w4, w5, w6, w7);
            }
            acc0 += d0 * s;
            acc1 += d1 * s;
            acc2 += d2 * s;
            acc3 += d3 * s;
        }
    }
    let slot = lid.y * QUADS + lid.x;
    partial[slot] = acc0;
    partial[256u + slot] = acc1;
    partial[512u + slot] = acc2;
    partial[768u + slot] = acc3;
    workgroupBarrier();
    for (var stride = SLICES / 2u; stride > 0u; stride = stride / 2u) {
        if (lid.y < stride) {
            let other = slot + stride * QUADS;
            partial[slot] += partial[other];
            partial[256u + slot] += partial[256u + other];
            partial[512u + slot] += partial[512u + other];
            partial[768u + slot] += partial[768u + other];
        }
        workgroupBarrier();
    }
    if (lid.y == 0u && n4 < quads) {
        let b = bias[n4];
        store_row(m0, n4, partial[lid.x] + b);
        store_row(m0 + 1u, n4, partial[256u + lid.x] + b);
        store_row(m0 + 2u, n4, partial[512u + lid.x] + b);
        store_row(m0 + 3u, n4, partial[768u + lid.x] + b);
    }
}
