// What the shared-memory GEMMs (q4gsw_gemm_shmem.wgsl and its f16 variant) share after their math:
// storing a finished 4-column row of their 128 x 128 output tile. Needs q4gsw_prelude.wgsl (store_row)
// and the `partial` binding (split K).

// Row m of quad n4: finished (bias added, into y) without split K; into this split's partial sums with it.
fn store_tile_row(z: u32, m: u32, n4: u32, v: vec4<f32>) {
    if (n4 >= params.n_stride / 4u) {
        return;
    }
    if (params.k_splits == 1u) {
        store_row(m, n4, v + bias[n4]);
    } else if (m < params.M) {
        let base = (z * params.M + m) * params.N;
        for (var c = 0u; c < 4u; c++) {
            let n = 4u * n4 + c;
            if (n < params.N) {
                partial[base + n] = v[c];
            }
        }
    }
}
