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
// Split K: with k_splits > 1, workgroup z sums only k in [z * k_chunk, (z + 1) * k_chunk)
// and writes partial[z][N]; q4gsw_splitk_reduce.wgsl then adds the splits and
// the bias. Long-K layers (down: K = 8192) get 4x the workgroups that way.
// Preconditions (split K): k_chunk % group_size == 0, k_splits = ceil(K / k_chunk).
// Dispatch: (n_stride / 16, 1, k_splits): one workgroup per 16-column block and split.
// Workgroup memory: 4 KiB.

var<workgroup> slice_sums: array<vec4<f32>, SLICES * QUADS>;   // [slice][quad]

// sum over the 8 k of one packed word: x[8*k8 .. 8*k8+7] (xa, xb) . codes (4 columns at once)
fn dot8_codes(w: vec4<u32>, xa: vec4<f32>, xb: vec4<f32>) -> vec4<f32> {
    var d = xa.x * nib4(w, 0u);
    d += xa.y * nib4(w, 4u);
    d += xa.z * nib4(w, 8u);
    d += xa.w * nib4(w, 12u);
    d += xb.x * nib4(w, 16u);
    d += xb.y * nib4(w, 20u);
    d += xb.z * nib4(w, 24u);
    d += xb.w * nib4(w, 28u);
    return d;
}

@compute @workgroup_size(WORKGROUP_X, WORKGROUP_Y, WORKGROUP_Z)
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
                d += dot8_codes(w0, x0, x1);
                d += dot8_codes(w1, x2, x3);
                d += dot8_codes(w2, x4, x5);
                d += dot8_codes(w3, x6, x7);
            }
            acc += d * s;
        }
    }
    let slot = lid.y * QUADS + lid.x;
    slice_sums[slot] = acc;
    workgroupBarrier();
    for (var stride = SLICES / 2u; stride > 0u; stride = stride / 2u) {
        if (lid.y < stride) {
            slice_sums[slot] += slice_sums[slot + stride * QUADS];
        }
        workgroupBarrier();
    }
    if (lid.y == 0u && n4 < quads) {
        let r = slice_sums[lid.x];
        for (var c = 0u; c < 4u; c++) {
            let n = 4u * n4 + c;
            if (n < params.N) {
                if (params.k_splits == 1u) {
                    store_y(0u, n, r[c] + bias[n4][c]);
                } else {
                    partial[wg.z * params.N + n] = r[c];
                }
            }
        }
    }
}
