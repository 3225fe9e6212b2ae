// Split-K epilogue: y[m, n] = sum_z partial[z][m][n] + bias[n], z = 0, 1, ... in order.
//
// Runs after a GEMM or GEMV dispatched with k_splits > 1 (q4gsw_gemm_shmem.wgsl, q4gsw_gemv.wgsl),
// in the same compute pass. The fixed summation order keeps results
// bit-reproducible from call to call.
//
// Layout: partial [k_splits][M][N] fp32, bias [n_stride] fp32, y [M][N] fp32 (a fused layer's parts:
// store_y, q4gsw_prelude.wgsl).
// Preconditions: k_splits >= 2. One thread per output element.
// Dispatch: (ceil(M * N / WORKGROUP_X), 1, 1). Split K is only chosen when the GEMM has
// fewer than 256 tiles of 128 x 128, so M * N < 2^22 and the grid stays below 65535.

@compute @workgroup_size(WORKGROUP_X, WORKGROUP_Y, WORKGROUP_Z)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let i = wg.x * WORKGROUP_X + t;
    let count = params.M * params.N;
    if (i >= count) {
        return;
    }
    var s = partial[i];
    for (var z = 1u; z < params.k_splits; z++) {
        s += partial[z * count + i];
    }
    store_y(i / params.N, i % params.N, s + bias[i % params.N]);
}
