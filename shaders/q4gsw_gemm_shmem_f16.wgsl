// q4gsw shared-memory tiled GEMM in f16: y[M, N] = x[M, K] @ dequant(W)^T + bias, the products and
// short sums in f16, everything else in f32. The f16 stand-in for q4gsw_gemm_shmem.wgsl (the registry's
// `shmem_f16`, run where a blob asks for f16 prefill and the device has shader-f16: the header enables f16).
//
// Why: a long prefill spends most of its time in the fp32 GEMM; a vec4<f16> FMA is two packed half2 FMAs
// (twice the fp32 FMA rate on NVIDIA) and an f16 operand is half the bytes to stage in and read from
// workgroup memory.
//
// Tiling as the fp32 kernel's: a 16 x 16 workgroup computes a 128 x 128 output tile, thread (tx, ty) an
// 8 x 8 block (rows 4*ty.. and 64+4*ty.., column quads tx and 16+tx) in sixteen named accumulators, but
// TK = 32 k per tile (half-size operands: the same 16 KiB of workgroup memory holds twice the k, and half
// as many barriers). Per tile the workgroup
//   1. stages x [128 rows x 32 k], converted to f16, into xs transposed to [k][row]: each thread one
//      4 rows x 4 k block (four vec4 loads, eight threads per 128 bytes of a row), stored as 4 vec4<f16>;
//   2. dequantizes W [32 k x 128 columns] into ws in f32 and rounds it once to f16: each thread 4 k of
//      one column quad (a vec4<u32> of 4 adjacent columns' words, half its nibbles, and their scales);
// then every thread does 32 x 64 f16 FMAs (16 vec4<f16> fma per k) into f16 accumulators h.., which are
// added into the f32 accumulators c.. at the end of the tile. So no f16 sum runs over more than TK = 32
// products: its rounding error stays that of a 32-term sum (tested to tools/reference.py F16_TOLERANCE),
// and the K-long sum is f32, as is everything after it (bias, split-K partial sums, y).
// The next tile's global loads are issued before the current tile's math, as in the fp32 kernel.
//
// Range: x and the partial sums of 32 products must stay within f16's (|v| < 65504); beyond it they
// become inf and so does y -- a visible failure, not a silently wrong number. Values below 2^-14 lose
// relative precision (f16 subnormals), not magnitude.
//
// Split K as the fp32 kernel's: workgroup z sums k in [z * k_chunk, min(K, (z + 1) * k_chunk)) and, with
// k_splits > 1, writes f32 partial sums that q4gsw_splitk_reduce.wgsl adds in a fixed order.
// Preconditions: k_chunk % TK == 0 and K % TK == 0 (K is a multiple of the group size, itself of 32),
// k_splits = ceil(K / k_chunk). Partial tiles: rows >= M stage zeros, columns >= n_stride zero weights.
// Dispatch: (ceil(n_stride / 128), ceil(M / 128), k_splits). Workgroup memory: 16 KiB.

var<workgroup> xs: array<vec4<f16>, TK * TM / 4u>;   // [TK][TM / 4]: xs[k * 32 + r4][i] = x[row 4*r4 + i, k]
var<workgroup> ws: array<vec4<f16>, TK * TN / 4u>;   // [TK][TN / 4]: ws[k * 32 + c4][i] = W[k, column 4*c4 + i]

// One thread's share of a K tile's global data, in registers between the load and the store to
// workgroup memory (kept fp32 and packed: converting at load time would wait on the load).
struct Staged {
    x0: vec4<f32>,   // x[row 4 * (t / 8) + i, k quad t % 8], i = 0..3
    x1: vec4<f32>,
    x2: vec4<f32>,
    x3: vec4<f32>,
    w: vec4<u32>,    // the words (k8 = t / 64, columns 4 * (t % 32) ..+3): nibbles 4 * ((t / 32) % 2) ..+3 are ours
    s: vec4<f32>,    // their scales
}

fn x_quad(m: u32, kq: u32) -> vec4<f32> {
    let last = params.M - 1u;
    return select(vec4<f32>(0.0), x[min(m, last) * (params.K / 4u) + kq], m < params.M);
}

fn load_tile(k0: u32, tile_m: u32, tile_n: u32, t: u32) -> Staged {
    var st: Staged;
    let kq = k0 / 4u + t % 8u;
    let m = tile_m + 4u * (t / 8u);
    st.x0 = x_quad(m, kq);
    st.x1 = x_quad(m + 1u, kq);
    st.x2 = x_quad(m + 2u, kq);
    st.x3 = x_quad(m + 3u, kq);
    let n = tile_n + 4u * (t % 32u);   // 4 adjacent columns of one 16-column block
    let k8 = k0 / 8u + t / 64u;
    st.w = vec4<u32>(0x88888888u);     // code 0 in every nibble
    st.s = vec4<f32>(0.0);
    if (n < params.n_stride) {         // n_stride is a multiple of 16: the quad is wholly in or out
        st.w = qweight[((n / 16u) * (params.K / 8u) * 16u + k8 * 16u + n % 16u) / 4u];
        st.s = scales[((n / 16u) * (params.K / params.group_size) * 16u + (k8 / (params.group_size / 8u)) * 16u
                       + n % 16u) / 4u];
    }
    return st;
}

fn store_tile(st: Staged, t: u32) {
    // x, transposed: k (4 * kq + j) of rows 4 * r4 ..+3 is one vec4<f16>.
    let kq = t % 8u;
    let r4 = t / 8u;
    for (var j = 0u; j < 4u; j++) {
        xs[(4u * kq + j) * 32u + r4] = vec4<f16>(vec4<f32>(st.x0[j], st.x1[j], st.x2[j], st.x3[j]));
    }
    // Weights: k = 4 * (t / 32) + j of column quad t % 32, dequantized in f32, rounded once to f16.
    let c4 = t % 32u;
    let kh = t / 32u;
    let shift = 16u * (kh % 2u);
    for (var j = 0u; j < 4u; j++) {
        ws[(4u * kh + j) * 32u + c4] = vec4<f16>(nib4(st.w, shift + 4u * j) * st.s);
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
        var h00 = vec4<f16>(0.0h); var h01 = vec4<f16>(0.0h);
        var h10 = vec4<f16>(0.0h); var h11 = vec4<f16>(0.0h);
        var h20 = vec4<f16>(0.0h); var h21 = vec4<f16>(0.0h);
        var h30 = vec4<f16>(0.0h); var h31 = vec4<f16>(0.0h);
        var h40 = vec4<f16>(0.0h); var h41 = vec4<f16>(0.0h);
        var h50 = vec4<f16>(0.0h); var h51 = vec4<f16>(0.0h);
        var h60 = vec4<f16>(0.0h); var h61 = vec4<f16>(0.0h);
        var h70 = vec4<f16>(0.0h); var h71 = vec4<f16>(0.0h);
        for (var k = 0u; k < TK; k++) {
            let a0 = xs[k * 32u + ty];
            let a1 = xs[k * 32u + 16u + ty];
            let b0 = ws[k * 32u + tx];
            let b1 = ws[k * 32u + 16u + tx];
            h00 = fma(vec4<f16>(a0.x), b0, h00); h01 = fma(vec4<f16>(a0.x), b1, h01);
            h10 = fma(vec4<f16>(a0.y), b0, h10); h11 = fma(vec4<f16>(a0.y), b1, h11);
            h20 = fma(vec4<f16>(a0.z), b0, h20); h21 = fma(vec4<f16>(a0.z), b1, h21);
            h30 = fma(vec4<f16>(a0.w), b0, h30); h31 = fma(vec4<f16>(a0.w), b1, h31);
            h40 = fma(vec4<f16>(a1.x), b0, h40); h41 = fma(vec4<f16>(a1.x), b1, h41);
            h50 = fma(vec4<f16>(a1.y), b0, h50); h51 = fma(vec4<f16>(a1.y), b1, h51);
            h60 = fma(vec4<f16>(a1.z), b0, h60); h61 = fma(vec4<f16>(a1.z), b1, h61);
            h70 = fma(vec4<f16>(a1.w), b0, h70); h71 = fma(vec4<f16>(a1.w), b1, h71);
        }
        c00 += vec4<f32>(h00); c01 += vec4<f32>(h01);
        c10 += vec4<f32>(h10); c11 += vec4<f32>(h11);
        c20 += vec4<f32>(h20); c21 += vec4<f32>(h21);
        c30 += vec4<f32>(h30); c31 += vec4<f32>(h31);
        c40 += vec4<f32>(h40); c41 += vec4<f32>(h41);
        c50 += vec4<f32>(h50); c51 += vec4<f32>(h51);
        c60 += vec4<f32>(h60); c61 += vec4<f32>(h61);
        c70 += vec4<f32>(h70); c71 += vec4<f32>(h71);
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
