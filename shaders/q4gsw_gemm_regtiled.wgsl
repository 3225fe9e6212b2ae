// q4gsw register-tiled GEMM: y[M, N] = x[M, K] @ dequant(W)^T + bias, straight from global memory.
//
// Tiling: a WORKGROUP_X x WORKGROUP_Y (8 x 8) workgroup computes a TILE_M x
// TILE_N (32 x 32) output tile; thread (tx, ty) keeps a 4 x 4 block (rows
// 4*ty.., one column quad tx) in four vec4 accumulators. Each thread
// dequantizes its own 4 columns x 8 k per step: no workgroup memory, so the
// same weights are dequantized again by every thread row of the grid (the
// cost the shared-memory GEMM removes).
//
// Partial tiles: rows >= M read row M-1 and are not stored; columns >= N are not stored.
// Dispatch: (ceil(n_stride / TILE_N), ceil(M / TILE_M), 1).

@compute @workgroup_size(WORKGROUP_X, WORKGROUP_Y, WORKGROUP_Z)
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
    let r = row_starts(m0, k4_count);

    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var k8 = 0u; k8 < k8_count; k8++) {
        let w = qweight[block + k8 * 4u];
        let s = scales[scale_block + (k8 / words_per_group) * 4u];
        let w0 = nib4(w, 0u) * s;
        let w1 = nib4(w, 4u) * s;
        let w2 = nib4(w, 8u) * s;
        let w3 = nib4(w, 12u) * s;
        let w4 = nib4(w, 16u) * s;
        let w5 = nib4(w, 20u) * s;
        let w6 = nib4(w, 24u) * s;
        let w7 = nib4(w, 28u) * s;
        let kx = 2u * k8;
        acc0 += dot8(x[r.x + kx], x[r.x + kx + 1u], w0, w1, w2, w3, w4, w5, w6, w7);
        acc1 += dot8(x[r.y + kx], x[r.y + kx + 1u], w0, w1, w2, w3, w4, w5, w6, w7);
        acc2 += dot8(x[r.z + kx], x[r.z + kx + 1u], w0, w1, w2, w3, w4, w5, w6, w7);
        acc3 += dot8(x[r.w + kx], x[r.w + kx + 1u], w0, w1, w2, w3, w4, w5, w6, w7);
    }
    let b = bias[n4];
    store_row(m0, n4, acc0 + b);
    store_row(m0 + 1u, n4, acc1 + b);
    store_row(m0 + 2u, n4, acc2 + b);
    store_row(m0 + 3u, n4, acc3 + b);
}
