// What the shared-memory GEMMs (q4gsw_gemm_shmem.wgsl and its f16 and int8 variants) share after their math:
// storing a finished 4-column row of their output tile. Needs q4gsw_prelude.wgsl (store_row), the `partial`
// binding (split K) and the kernel's store_partial(i, v), which writes v to partial[i] as the binding's element
// type holds it (f32, or its bits where the int8 kernel binds partial as u32 words).

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
                store_partial(base + n, v[c]);
            }
        }
    }
}
