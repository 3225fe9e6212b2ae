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
// Partial row blocks: rows >= M read row M - 1 and are not stored.
// Dispatch: (n_stride / 16, ceil(M / 4), 1): one workgroup per 16-column block and 4 rows. Workgroup memory: 16 KiB.

const ROW_SUMS: u32 = SLICES * QUADS;   // partial sums of one row: [slice][quad]
var<workgroup> slice_sums: array<vec4<f32>, ROWS * ROW_SUMS>;   // [row][slice][quad]

// x[row, 8*k8 .. 8*k8+7] (row r = its first vec4) . the 8 x 4 dequantized block w0..w7
fn row_dot8(r: u32, k8: u32, w0: vec4<f32>, w1: vec4<f32>, w2: vec4<f32>, w3: vec4<f32>,
            w4: vec4<f32>, w5: vec4<f32>, w6: vec4<f32>, w7: vec4<f32>) -> vec4<f32> {
    return dot8(x[r + 2u * k8], x[r + 2u * k8 + 1u], w0, w1, w2, w3, w4, w5, w6, w7);
}

@compute @workgroup_size(WORKGROUP_X, WORKGROUP_Y, WORKGROUP_Z)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let quads = params.n_stride / 4u;
    let n4 = wg.x * QUADS + lid.x;
    let m0 = wg.y * ROWS;
    let groups = params.K / params.group_size;
    let words_per_group = params.group_size / 8u;
    let block = wg.x * (params.K / 8u) * 4u + lid.x;   // this workgroup's 16 columns, quad lid.x, k8 = 0
    let scale_block = wg.x * groups * 4u + lid.x;      // the same columns' scales, group 0
    let k4_count = params.K / 4u;
    let r = row_starts(m0, k4_count);

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
                let w0 = nib4(w, 0u);
                let w1 = nib4(w, 4u);
                let w2 = nib4(w, 8u);
                let w3 = nib4(w, 12u);
                let w4 = nib4(w, 16u);
                let w5 = nib4(w, 20u);
                let w6 = nib4(w, 24u);
                let w7 = nib4(w, 28u);
                d0 += row_dot8(r.x, k8, w0, w1, w2, w3, w4, w5, w6, w7);
                d1 += row_dot8(r.y, k8, w0, w1, w2, w3, w4, w5, w6, w7);
                d2 += row_dot8(r.z, k8, w0, w1, w2, w3, w4, w5, w6, w7);
                d3 += row_dot8(r.w, k8, w0, w1, w2, w3, w4, w5, w6, w7);
            }
            acc0 += d0 * s;
            acc1 += d1 * s;
            acc2 += d2 * s;
            acc3 += d3 * s;
        }
    }
    let slot = lid.y * QUADS + lid.x;
    slice_sums[slot] = acc0;
    slice_sums[ROW_SUMS + slot] = acc1;
    slice_sums[2u * ROW_SUMS + slot] = acc2;
    slice_sums[3u * ROW_SUMS + slot] = acc3;
    workgroupBarrier();
    for (var stride = SLICES / 2u; stride > 0u; stride = stride / 2u) {
        if (lid.y < stride) {
            let other = slot + stride * QUADS;
            slice_sums[slot] += slice_sums[other];
            slice_sums[ROW_SUMS + slot] += slice_sums[ROW_SUMS + other];
            slice_sums[2u * ROW_SUMS + slot] += slice_sums[2u * ROW_SUMS + other];
            slice_sums[3u * ROW_SUMS + slot] += slice_sums[3u * ROW_SUMS + other];
        }
        workgroupBarrier();
    }
    if (lid.y == 0u && n4 < quads) {
        let b = bias[n4];
        store_row(m0, n4, slice_sums[lid.x] + b);
        store_row(m0 + 1u, n4, slice_sums[ROW_SUMS + lid.x] + b);
        store_row(m0 + 2u, n4, slice_sums[2u * ROW_SUMS + lid.x] + b);
        store_row(m0 + 3u, n4, slice_sums[3u * ROW_SUMS + lid.x] + b);
    }
}
