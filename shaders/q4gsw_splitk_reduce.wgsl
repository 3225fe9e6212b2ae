// Split-K epilogue: y[m, n] = sum_z partial[z][m][n] + bias[n], z = 0, 1, ... in order.
//
// Runs after a GEMM or GEMV dispatched with k_splits > 1 (q4gsw_gemm_shmem.wgsl, q4gsw_gemv.wgsl),
// in the same compute pass. The fixed summation order keeps results
// bit-reproducible from call to call.
//
// Layout: partial [k_splits][M][N] fp32, bias [n_stride] fp32, y [M][N] fp32.
// Preconditions: k_splits >= 2. One thread per output element.
// Dispatch: (ceil(M * N / 256), 1, 1). Split K is only chosen when the GEMM has
// fewer than 256 tiles of 128 x 128, so M * N < 2^22 and the grid stays below 65535.

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
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;
@group(0) @binding(6) var<storage, read_write> partial: array<f32>;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let i = wg.x * 256u + t;
    let count = params.M * params.N;
    if (i >= count) {
        return;
    }
    var s = partial[i];
    for (var z = 1u; z < params.k_splits; z++) {
        s += partial[z * count + i];
    }
    y[i] = s + bias[i % params.N];
}
