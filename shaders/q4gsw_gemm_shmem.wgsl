// q4gsw shared-memory tiled GEMM: y[M, N] = x[M, K] @ dequant(W)^T + bias.
//
// Tiling: a 16 x 16 workgroup computes a 64 x 64 output tile; thread (tx, ty)
// keeps rows 4*ty..4*ty+3 of column quad tx in four vec4 accumulators. Per
// 32-deep K tile the workgroup
//   1. stages the x block [64 rows x 32 k] into xs, transposed to [k][row],
//   2. dequantizes the weight block [32 k x 64 columns] once into ws (each
//      thread unpacks one u32 = 8 k of one column),
// then every thread accumulates its 4 x 4 block from workgroup memory, so
// each weight is dequantized once per workgroup instead of once per row.
//
// Layout (see backend/serialization/schema.fbs):
//   x       [M][K] fp32, read as vec4
//   qweight [K/8][n_stride] u32: nibble j of word (k8, n) = code(8*k8 + j, n) + 8
//   scales  [K/gs][n_stride] fp32
//   bias    [n_stride] fp32 (zeros when the layer has none)
//   y       [M][N] fp32
// Preconditions: gs % 32 == 0 (so K % 32 == 0), K % gs == 0, n_stride = N rounded up to 4.
// Partial tiles: rows >= M stage zeros, columns >= n_stride stage zero weights; neither is stored.
// Dispatch: (ceil(n_stride / 64), ceil(M / 64), 1). Workgroup memory: 16 KiB.

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
@group(0) @binding(2) var<storage, read> qweight: array<u32>;
@group(0) @binding(3) var<storage, read> scales: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;

const TM: u32 = 64u;
const TN: u32 = 64u;
const TK: u32 = 32u;

var<workgroup> xs: array<vec4<f32>, 512>;   // [TK][TM / 4]: xs[k * 16 + r4][i] = x[row 4*r4 + i, k]
var<workgroup> ws: array<vec4<f32>, 512>;   // [TK][TN / 4]: ws[k * 16 + c4][i] = W[k, column 4*c4 + i]

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

@compute @workgroup_size(16, 16, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>,
        @builtin(local_invocation_index) t: u32) {
    let tile_m = wg.y * TM;
    let tile_n = wg.x * TN;
    let k4_count = params.K / 4u;
    let words_per_group = params.group_size / 8u;
    let last = params.M - 1u;

    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);

    for (var k0 = 0u; k0 < params.K; k0 += TK) {
        // 1. Stage x: 64 rows x 8 k-quads = 512 vec4, two per thread.
        for (var i = 0u; i < 2u; i++) {
            let idx = t + 256u * i;
            let row = idx / 8u;
            let kq = idx % 8u;
            let m = tile_m + row;
            var v = x[min(m, last) * k4_count + k0 / 4u + kq];
            if (m >= params.M) {
                v = vec4<f32>(0.0);
            }
            let base = 4u * kq * 16u + row / 4u;
            let lane = row % 4u;
            xs[base][lane] = v.x;
            xs[base + 16u][lane] = v.y;
            xs[base + 32u][lane] = v.z;
            xs[base + 48u][lane] = v.w;
        }
        // 2. Dequantize the weight block: 4 k8 rows x 64 columns = 256 words, one per thread.
        {
            let k8 = k0 / 8u + t / TN;
            let col = t % TN;
            let n = tile_n + col;
            var w = 0x88888888u;   // code 0 in every nibble
            var s = 0.0;
            if (n < params.n_stride) {
                w = qweight[k8 * params.n_stride + n];
                s = scales[(k8 / words_per_group) * params.n_stride + n];
            }
            let k_local = 8u * (t / TN);
            for (var j = 0u; j < 8u; j++) {
                ws[(k_local + j) * 16u + col / 4u][col % 4u] = (f32((w >> (4u * j)) & 0xFu) - 8.0) * s;
            }
        }
        workgroupBarrier();
        // 3. Accumulate the 4 x 4 block from workgroup memory.
        for (var k = 0u; k < TK; k++) {
            let a = xs[k * 16u + lid.y];
            let b = ws[k * 16u + lid.x];
            acc0 += a.x * b;
            acc1 += a.y * b;
            acc2 += a.z * b;
            acc3 += a.w * b;
        }
        workgroupBarrier();
    }
    let n4 = tile_n / 4u + lid.x;
    if (n4 < params.n_stride / 4u) {
        let b = bias[n4];
        let m0 = tile_m + 4u * lid.y;
        store_row(m0, n4, acc0 + b);
        store_row(m0 + 1u, n4, acc1 + b);
        store_row(m0 + 2u, n4, acc2 + b);
        store_row(m0 + 3u, n4, acc3 + b);
    }
}
