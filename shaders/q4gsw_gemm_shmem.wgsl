// q4gsw shared-memory tiled GEMM: y[M, N] = x[M, K] @ dequant(W)^T + bias (prefill, large tiles).
//
// Tiling: a 16 x 16 workgroup computes a 128 x 128 output tile; thread (tx, ty)
// keeps an 8 x 8 block in sixteen named vec4 accumulators (named, not an
// array: a dynamically indexed private array spills on NVIDIA via naga) --
// rows 4*ty..4*ty+3 and 64+4*ty..64+4*ty+3, column quads tx and 16+tx.
// Per 16-deep K tile the workgroup
//   1. stages the x block [128 rows x 16 k] into xs, transposed to [k][row],
//   2. dequantizes the weight block [16 k x 128 columns] once into ws (each
//      thread unpacks one u32 = 8 k of one column),
// then every thread does 16 x 64 FMAs reading 4 vec4 per k from workgroup
// memory, so each weight is dequantized once per 128 rows. The next tile's
// global loads are issued before the current tile's math (register
// double-buffering) to hide their latency.
//
// Split K: workgroup z handles k in [z * k_chunk, min(K, (z + 1) * k_chunk)).
// With k_splits == 1 the tile is finished here (bias added, y written); with
// k_splits > 1 it writes its partial sums to partial[z][M][N] and
// q4gsw_splitk_reduce.wgsl adds them up in a fixed order (deterministic).
// Split K exists for occupancy: at M = 512 a 2048-wide layer has only 64
// tiles of 128 x 128, fewer than the GPU has multiprocessors.
//
// Preconditions: k_chunk % TK == 0, k_splits = ceil(K / k_chunk).
// Partial tiles: rows >= M stage zeros, columns >= n_stride stage zero weights; neither is stored.
// Dispatch: (ceil(n_stride / 128), ceil(M / 128), k_splits). Workgroup memory: 16 KiB.

var<workgroup> xs: array<vec4<f32>, TK * TM / 4u>;   // [TK][TM / 4]: xs[k * 32 + r4][i] = x[row 4*r4 + i, k]
var<workgroup> ws: array<vec4<f32>, TK * TN / 4u>;   // [TK][TN / 4]: ws[k * 32 + c4][i] = W[k, column 4*c4 + i]

// One thread's share of a K tile's global data, held in registers between
// the load and the store to workgroup memory.
struct Staged {
    x0: vec4<f32>,   // x[row t / 4, k quad t % 4]
    x1: vec4<f32>,   // x[row 64 + t / 4, k quad t % 4]
    w: u32,          // weight word (k8 t / 128, column t % 128)
    s: f32,          // its scale
}

fn load_tile(k0: u32, tile_m: u32, tile_n: u32, t: u32) -> Staged {
    var st: Staged;
    let k4_count = params.K / 4u;
    let kq = k0 / 4u + t % 4u;
    let m0 = tile_m + t / 4u;
    let m1 = m0 + 64u;
    let last = params.M - 1u;
    st.x0 = select(vec4<f32>(0.0), x[min(m0, last) * k4_count + kq], m0 < params.M);
    st.x1 = select(vec4<f32>(0.0), x[min(m1, last) * k4_count + kq], m1 < params.M);
    let k8 = k0 / 8u + t / TN;
    let n = tile_n + t % TN;
    st.w = 0x88888888u;   // code 0 in every nibble
    st.s = 0.0;
    if (n < params.n_stride) {
        st.w = qweight[(n / 16u) * (params.K / 8u) * 16u + k8 * 16u + n % 16u];
        st.s = scales[(n / 16u) * (params.K / params.group_size) * 16u + (k8 / (params.group_size / 8u)) * 16u + n % 16u];
    }
    return st;
}

fn store_tile(st: Staged, t: u32) {
    // x, transposed: k-quad kq of row r goes to xs[(4*kq + i) * 32 + r / 4][r % 4].
    let kq = t % 4u;
    let r = t / 4u;
    for (var i = 0u; i < 4u; i++) {
        xs[(4u * kq + i) * 32u + r / 4u][r % 4u] = st.x0[i];
        xs[(4u * kq + i) * 32u + 16u + r / 4u][r % 4u] = st.x1[i];
    }
    // Weights, dequantized: nibble j of the word is k = 8 * (t / 128) + j.
    let col = t % TN;
    let k_local = 8u * (t / TN);
    for (var j = 0u; j < 8u; j++) {
        ws[(k_local + j) * 32u + col / 4u][col % 4u] = nib(st.w, 4u * j) * st.s;
    }
}

// A split-K partial sum (q4gsw_shmem_prelude.wgsl store_tile_row).
fn store_partial(i: u32, v: f32) {
    partial[i] = v;
}

@compute @workgroup_size(WORKGROUP_X, WORKGROUP_Y, WORKGROUP_Z)
fn main(@builtin(workgroup_id) wg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>,
        @builtin(local_invocation_index) t: u32) {
    let tile_m = wg.y * TM;
    let tile_n = wg.x * TN;
    let k_begin = wg.z * params.k_chunk;
    let k_end = min(params.K, k_begin + params.k_chunk);
    let tx = lid.x;
    let ty = lid.y;

    var c00 = vec4<f32>(0.0); var c01 = vec4<f32>(0.0);
    var c10 = vec4<f32>(0.0); var c11 = vec4<f32>(0.0);
    var c20 = vec4<f32>(0.0); var c21 = vec4<f32>(0.0);
    var c30 = vec4<f32>(0.0); var c31 = vec4<f32>(0.0);
    var c40 = vec4<f32>(0.0); var c41 = vec4<f32>(0.0);
    var c50 = vec4<f32>(0.0); var c51 = vec4<f32>(0.0);
    var c60 = vec4<f32>(0.0); var c61 = vec4<f32>(0.0);
    var c70 = vec4<f32>(0.0); var c71 = vec4<f32>(0.0);

    var st = load_tile(k_begin, tile_m, tile_n, t);
    for (var k0 = k_begin; k0 < k_end; k0 += TK) {
        store_tile(st, t);
        workgroupBarrier();
        if (k0 + TK < k_end) {
            st = load_tile(k0 + TK, tile_m, tile_n, t);
        }
        for (var k = 0u; k < TK; k++) {
            let a0 = xs[k * 32u + ty];
            let a1 = xs[k * 32u + 16u + ty];
            let b0 = ws[k * 32u + tx];
            let b1 = ws[k * 32u + 16u + tx];
            c00 += a0.x * b0; c01 += a0.x * b1;
            c10 += a0.y * b0; c11 += a0.y * b1;
            c20 += a0.z * b0; c21 += a0.z * b1;
            c30 += a0.w * b0; c31 += a0.w * b1;
            c40 += a1.x * b0; c41 += a1.x * b1;
            c50 += a1.y * b0; c51 += a1.y * b1;
            c60 += a1.z * b0; c61 += a1.z * b1;
            c70 += a1.w * b0; c71 += a1.w * b1;
        }
        workgroupBarrier();
    }

    let z = wg.z;
    let m0 = tile_m + 4u * ty;
    let m1 = tile_m + 64u + 4u * ty;
    let n0 = tile_n / 4u + tx;
    let n1 = n0 + 16u;
    store_tile_row(z, m0, n0, c00); store_tile_row(z, m0, n1, c01);
    store_tile_row(z, m0 + 1u, n0, c10); store_tile_row(z, m0 + 1u, n1, c11);
    store_tile_row(z, m0 + 2u, n0, c20); store_tile_row(z, m0 + 2u, n1, c21);
    store_tile_row(z, m0 + 3u, n0, c30); store_tile_row(z, m0 + 3u, n1, c31);
    store_tile_row(z, m1, n0, c40); store_tile_row(z, m1, n1, c41);
    store_tile_row(z, m1 + 1u, n0, c50); store_tile_row(z, m1 + 1u, n1, c51);
    store_tile_row(z, m1 + 2u, n0, c60); store_tile_row(z, m1 + 2u, n1, c61);
    store_tile_row(z, m1 + 3u, n0, c70); store_tile_row(z, m1 + 3u, n1, c71);
}
