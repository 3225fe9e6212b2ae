// q4gsw GEMV: y[0, n] = sum_k x[0, k] * (code[k, n] * scale[k / gs, n]) + bias[n], for M == 1 (decode).
//
// Decode is a stream over the packed weights, so the kernel is shaped for
// bytes in flight, not for arithmetic: a 4 x 64 workgroup covers 4 column
// quads (16 columns) and splits K 64 ways, so even a 2048 x 2048 layer
// launches 128 workgroups of 256 threads. Thread (tx, ty) owns column quad
// tx and walks quantization groups ty, ty + 64, ...; per group it issues
// four vec4<u32> weight loads (4 columns x 32 k) before using any, sums
// x * code in fp32 and applies the group's scale once. The 64 partial sums
// of a quad are tree-reduced in workgroup memory in a fixed order, so results
// are bit-reproducible.
//
// Layout (see backend/serialization/schema.fbs):
//   x       [K] fp32, read as vec4
//   qweight [n_stride/16][K/8][16] u32, read as vec4<u32> (4 adjacent columns):
//           nibble j of word (k8, n) = code(8*k8 + j, n) + 8
//   scales  [n_stride/16][K/gs][16] fp32, read as vec4
//   bias    [n_stride] fp32 (zeros when the layer has none)
//   y       [N] fp32
// Preconditions: gs % 32 == 0 (so words per group is a multiple of 4), K % gs == 0,
// n_stride = N rounded up to 16.
// Split K: with k_splits > 1, workgroup z sums only k in [z * k_chunk, (z + 1) * k_chunk)
// and writes partial_out[z][N]; q4gsw_splitk_reduce.wgsl then adds the splits and
// the bias. Long-K layers (down: K = 8192) get 4x the workgroups that way.
// Preconditions (split K): k_chunk % group_size == 0, k_splits = ceil(K / k_chunk).
// Dispatch: (n_stride / 16, 1, k_splits): one workgroup per 16-column block and split.
// Workgroup memory: 4 KiB.

struct Params {
    M: u32,
    K: u32,
    N: u32,
    n_stride: u32,
    group_size: u32,
    k_splits: u32,
    k_chunk: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> qweight: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> scales: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> bias: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;
@group(0) @binding(6) var<storage, read_write> partial_out: array<f32>;

const QUADS: u32 = 4u;     // column quads per workgroup (16 columns)
const SLICES: u32 = 64u;   // ways K is split inside a workgroup

var<workgroup> partial: array<vec4<f32>, 256>;

// Nibble -> code as f32 without an int-to-float convert (quarter rate on
// NVIDIA): 0x4B000000 | q is the float 2^23 + q exactly, so subtracting
// 2^23 + 8 leaves q - 8 exactly.
fn nib(w: vec4<u32>, shift: u32) -> vec4<f32> {
    let q = (w >> vec4<u32>(shift)) & vec4<u32>(0xFu);
    return bitcast<vec4<f32>>(q | vec4<u32>(0x4B000000u)) - vec4<f32>(8388616.0);
}

// sum over the 8 k of one packed word: x[8*k8 .. 8*k8+7] (xa, xb) . codes (4 columns at once)
fn dot8(w: vec4<u32>, xa: vec4<f32>, xb: vec4<f32>) -> vec4<f32> {
    var d = xa.x * nib(w, 0u);
    d += xa.y * nib(w, 4u);
    d += xa.z * nib(w, 8u);
    d += xa.w * nib(w, 12u);
    d += xb.x * nib(w, 16u);
    d += xb.y * nib(w, 20u);
    d += xb.z * nib(w, 24u);
    d += xb.w * nib(w, 28u);
    return d;
}

@compute @workgroup_size(4, 64, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let quads = params.n_stride / 4u;
    let n4 = wg.x * QUADS + lid.x;
    let groups = params.K / params.group_size;
    let words_per_group = params.group_size / 8u;
    let block = wg.x * (params.K / 8u) * 4u + lid.x;   // this workgroup's 16 columns, quad lid.x, k8 = 0
    let scale_block = wg.x * groups * 4u + lid.x;      // the same columns' scales, group 0

    // Split K over workgroups (z): this one sums groups [g_begin, g_end).
    let groups_per_split = params.k_chunk / params.group_size;
    let g_begin = wg.z * groups_per_split;
    let g_end = min(groups, g_begin + groups_per_split);

    var acc = vec4<f32>(0.0);
    if (n4 < quads) {
        for (var g = g_begin + lid.y; g < g_end; g += SLICES) {
            let s = scales[scale_block + g * 4u];
            var d = vec4<f32>(0.0);
            for (var j = 0u; j < words_per_group; j += 4u) {
                // All twelve loads (4 weight words, 32 k of x) issued before any is used.
                let k8 = g * words_per_group + j;
                let w0 = qweight[block + k8 * 4u];
                let w1 = qweight[block + (k8 + 1u) * 4u];
                let w2 = qweight[block + (k8 + 2u) * 4u];
                let w3 = qweight[block + (k8 + 3u) * 4u];
                let x0 = x[2u * k8];
                let x1 = x[2u * k8 + 1u];
                let x2 = x[2u * k8 + 2u];
                let x3 = x[2u * k8 + 3u];
                let x4 = x[2u * k8 + 4u];
                let x5 = x[2u * k8 + 5u];
                let x6 = x[2u * k8 + 6u];
                let x7 = x[2u * k8 + 7u];
                d += dot8(w0, x0, x1);
                d += dot8(w1, x2, x3);
                d += dot8(w2, x4, x5);
                d += dot8(w3, x6, x7);
            }
            acc += d * s;
        }
    }
    let slot = lid.y * QUADS + lid.x;
    partial[slot] = acc;
    workgroupBarrier();
    for (var stride = SLICES / 2u; stride > 0u; stride = stride / 2u) {
        if (lid.y < stride) {
            partial[slot] += partial[slot + stride * QUADS];
        }
        workgroupBarrier();
    }
    if (lid.y == 0u && n4 < quads) {
        let r = partial[lid.x];
        for (var c = 0u; c < 4u; c++) {
            let n = 4u * n4 + c;
            if (n < params.N) {
                if (params.k_splits == 1u) {
                    y[n] = r[c] + bias[n4][c];
                } else {
                    partial_out[wg.z * params.N + n] = r[c];
                }
            }
        }
    }
}
