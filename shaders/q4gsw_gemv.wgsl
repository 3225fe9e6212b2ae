// q4gsw GEMV: y[0, n] = sum_k x[0, k] * (code[k, n] * scale[k / gs, n]) + bias[n], for M == 1 (decode).
//
// Tiling: a 16 x 16 workgroup covers 64 output columns. Thread (tx, ty) owns
// column quad tx (4 adjacent columns, one vec4<u32> of packed weights per
// 8 k) and walks every 16th 8-deep K slice starting at ty; the 16 partial
// sums of a quad are then tree-reduced in workgroup memory (fixed order, so
// results are bit-reproducible).
//
// Layout (see backend/serialization/schema.fbs):
//   x       [K] fp32, read as vec4
//   qweight [K/8][n_stride] u32: nibble j of word (k8, n) = code(8*k8 + j, n) + 8
//   scales  [K/gs][n_stride] fp32
//   bias    [n_stride] fp32 (zeros when the layer has none)
//   y       [N] fp32
// Preconditions: gs % 32 == 0, K % gs == 0, n_stride = N rounded up to 4.
// Dispatch: (ceil(n_stride / 64), 1, 1).

struct Params {
    M: u32,
    K: u32,
    N: u32,
    n_stride: u32,
    group_size: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> qweight: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> scales: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> bias: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;

const QUADS: u32 = 16u;    // column quads per workgroup (64 columns)
const SLICES: u32 = 16u;   // K slices per column quad

var<workgroup> partial: array<vec4<f32>, 256>;

fn nib(w: vec4<u32>, shift: u32) -> vec4<f32> {
    return vec4<f32>((w >> vec4<u32>(shift)) & vec4<u32>(0xFu)) - vec4<f32>(8.0);
}

@compute @workgroup_size(16, 16, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let quads = params.n_stride / 4u;
    let n4 = wg.x * QUADS + lid.x;
    let k8_count = params.K / 8u;
    let words_per_group = params.group_size / 8u;

    var acc = vec4<f32>(0.0);
    if (n4 < quads) {
        for (var k8 = lid.y; k8 < k8_count; k8 += SLICES) {
            let w = qweight[k8 * quads + n4];
            let s = scales[(k8 / words_per_group) * quads + n4];
            let xa = x[2u * k8];
            let xb = x[2u * k8 + 1u];
            var d = xa.x * nib(w, 0u);
            d += xa.y * nib(w, 4u);
            d += xa.z * nib(w, 8u);
            d += xa.w * nib(w, 12u);
            d += xb.x * nib(w, 16u);
            d += xb.y * nib(w, 20u);
            d += xb.z * nib(w, 24u);
            d += xb.w * nib(w, 28u);
            acc += d * s;
        }
    }
    partial[lid.y * QUADS + lid.x] = acc;
    workgroupBarrier();
    for (var stride = SLICES / 2u; stride > 0u; stride = stride / 2u) {
        if (lid.y < stride) {
            partial[lid.y * QUADS + lid.x] += partial[(lid.y + stride) * QUADS + lid.x];
        }
        workgroupBarrier();
    }
    if (lid.y == 0u && n4 < quads) {
        let r = partial[lid.x] + bias[n4];
        for (var c = 0u; c < 4u; c++) {
            let n = 4u * n4 + c;
            if (n < params.N) {
                y[n] = r[c];
            }
        }
    }
}
