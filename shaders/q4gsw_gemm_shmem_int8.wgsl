// q4gsw shared-memory tiled GEMM with int8 dot products: y[M, N] = x[M, K] @ dequant(W)^T + bias, from the
// row's activations quantized to int8 per block of INT8_BLOCK = 32 k (q4gsw_quantize_int8.wgsl, dispatched
// before it in the same call), each block's product sum an integer sum of dot4I8Packed (4 int8 multiply-adds
// per instruction). The registry's `shmem_int8`, run for prefill calls where a blob asks for int8 prefill
// (Precision INT8): it stands in for q4gsw_gemm_shmem.wgsl.
//
// Why: a long prefill spends most of its time in the fp32 GEMM's FMAs and workgroup-memory reads. Here a
// 32-k block of one row against one column is 8 dot4I8Packed (one instruction each where the device has
// integer dot products), and an operand is one byte: a quarter of the workgroup-memory traffic per
// multiply-add. The approach of llama.cpp's Vulkan backend without tensor cores (Q8_1 x Q4_0).
//
// Math: for row m, block b (k in [32 b, 32 b + 32)) and column n,
//   y[m, n] = bias[n] + sum_b  sw[n, group of b] * sx[m, b] * sum_k qx[m, k] * code[n, k]
// with qx, sx the activation codes and block scales, code the int4 weight code (-8..7) and sw its group's
// scale (the group size is a multiple of 32, so a block never straddles two groups). The integer sum is
// exact (|sum| <= 32 * 127 * 8 = 32512): the error is the activation rounding's alone (tools/reference.py
// int8_activations emulates it in fp64; INT8_TOLERANCE bounds its distance from the fp32 result).
//
// Tiling: a 16 x 16 workgroup computes a 128 x 64 output tile (TM x TN), thread (tx, ty) the rows 4*ty..+3
// and 64+4*ty..+3 of column quad tx: 8 vec4<i32> block sums and 8 vec4<f32> accumulators (a 128 x 128 tile
// would need twice as many registers and halve the workgroups that fit). A K tile is TK = 64 k, two blocks
// (one block a tile measured 5 % slower: twice the barriers per product). Per K tile the workgroup
//   1. stages the codes of 128 rows x 64 k into xq[slot][row quad] (slot = k quad: 4 k in one u32), each
//      thread slot t % 8 of row quad t / 8 in both blocks, and block t / 128's scale of row t % 128 into xsc;
//   2. converts W [64 k x 64 columns]: threads 128..255 one (column quad, word) each: the 8 nibbles of a
//      column's word become two u32 of 4 signed bytes (slots 2 * word and 2 * word + 1), into wq; the
//      quad's scales of each block into wsc;
// then per block every thread does 8 slots x 32 dot4I8Packed and scales its 32 block sums into its
// accumulators. The next tile's global loads are issued before the current tile's math, as in the fp32 kernel.
//
// Split K as the fp32 kernel's: workgroup z sums k in [z * k_chunk, min(K, (z + 1) * k_chunk)) and, with
// k_splits > 1, writes f32 partial sums that q4gsw_splitk_reduce.wgsl adds in a fixed order.
// Preconditions: k_chunk % TK == 0, K % INT8_BLOCK == 0 (K is a multiple of the group size, itself of 32),
// k_splits = ceil(K / k_chunk). A tile past k_end (K = 32 mod 64) stages zero codes, scales and weights for
// its second block, as it does for rows >= M and columns >= n_stride; none is stored.
// Dispatch: (ceil(n_stride / 64), ceil(M / 128), k_splits). Workgroup memory: 13.5 KiB.

// xq[s * 32 + r4][i]: the codes of k 4s..4s+3 of row 4 r4 + i; wq[s * 16 + c4][i]: those of column 4 c4 + i.
var<workgroup> xq: array<vec4<u32>, (TK / 4u) * TM / 4u>;   // [slot][row quad]
var<workgroup> wq: array<vec4<u32>, (TK / 4u) * TN / 4u>;   // [slot][column quad]
var<workgroup> xsc: array<vec4<f32>, BLOCKS * TM / 4u>;      // [block][row quad]: sx of rows 4 r4 ..+3
var<workgroup> wsc: array<vec4<f32>, BLOCKS * TN / 4u>;      // [block][column quad]: sw of columns 4 c4 ..+3

const BLOCKS: u32 = TK / INT8_BLOCK;               // activation blocks per K tile
const W_THREADS: u32 = (TN / 4u) * (TK / 8u);      // one (column quad, word) each: threads TM ..

// One thread's share of a K tile's global data, in registers between the load and the store to workgroup memory.
struct Staged {
    x0: vec4<u32>,   // slot t % 8 of rows 4 (t / 8) ..+3, block 0
    x1: vec4<u32>,   // the same in block 1
    xs: f32,         // the scale of row t % 128, block t / 128
    w: vec4<u32>,    // threads 128..255: the words (k8 = (t - 128) / 16) of column quad (t - 128) % 16
    s: vec4<f32>,    // and their scales
}

// Word `word` of row m's codes (0 past the last row or past k_end; the load, which select makes either way,
// stays within the codes).
fn x_codes(m: u32, word: u32, k_end: u32) -> u32 {
    let row = min(m, params.M - 1u) * (params.K / 4u);
    return select(0u, partial[int8_codes_offset() + row + min(word, params.K / 4u - 1u)],
                  m < params.M && 4u * word < k_end);
}

fn load_tile(k0: u32, k_end: u32, tile_m: u32, tile_n: u32, t: u32) -> Staged {
    var st: Staged;
    let word = k0 / 4u + t % 8u;
    let m = tile_m + 4u * (t / 8u);
    st.x0 = vec4<u32>(x_codes(m, word, k_end), x_codes(m + 1u, word, k_end), x_codes(m + 2u, word, k_end),
                      x_codes(m + 3u, word, k_end));
    st.x1 = vec4<u32>(x_codes(m, word + 8u, k_end), x_codes(m + 1u, word + 8u, k_end),
                      x_codes(m + 2u, word + 8u, k_end), x_codes(m + 3u, word + 8u, k_end));
    let row = tile_m + t % TM;
    let kb = k0 + INT8_BLOCK * (t / TM);
    let scale = int8_scales_offset() + min(row, params.M - 1u) * (params.K / INT8_BLOCK)
                + min(kb, params.K - 1u) / INT8_BLOCK;
    st.xs = select(0.0, bitcast<f32>(partial[scale]), row < params.M && kb < k_end);
    st.w = vec4<u32>(0x88888888u);     // code 0 in every nibble
    st.s = vec4<f32>(0.0);
    if (t >= TM) {
        let u = t - TM;
        let n = tile_n + 4u * (u % 16u);   // 4 adjacent columns of one 16-column block
        let k8 = k0 / 8u + u / 16u;
        if (n < params.n_stride && 8u * k8 < k_end) {   // n_stride is a multiple of 16: the quad is wholly in or out
            st.w = qweight[((n / 16u) * (params.K / 8u) * 16u + k8 * 16u + n % 16u) / 4u];
            st.s = scales[((n / 16u) * (params.K / params.group_size) * 16u + (k8 / (params.group_size / 8u)) * 16u
                           + n % 16u) / 4u];
        }
    }
    return st;
}

// Nibbles 4 h .. 4 h + 3 of each word (codes + 8, 0..15) as 4 signed bytes each (lowest nibble, lowest byte):
// spread each nibble to its byte, then bias: (q | 0x80) - 8 is 0x78 + q with no borrow, and flipping bit 7
// gives q - 8 as a two's-complement byte.
fn signed_bytes(w: vec4<u32>, h: u32) -> vec4<u32> {
    let q = (w >> vec4<u32>(16u * h)) & vec4<u32>(0xFFFFu);
    let spread = (q & vec4<u32>(0xFu)) | ((q & vec4<u32>(0xF0u)) << vec4<u32>(4u))
               | ((q & vec4<u32>(0xF00u)) << vec4<u32>(8u)) | ((q & vec4<u32>(0xF000u)) << vec4<u32>(12u));
    return ((spread | vec4<u32>(0x80808080u)) - vec4<u32>(0x08080808u)) ^ vec4<u32>(0x80808080u);
}

fn store_tile(st: Staged, t: u32) {
    xq[(t % 8u) * 32u + t / 8u] = st.x0;
    xq[(8u + t % 8u) * 32u + t / 8u] = st.x1;
    xsc[(t / TM) * 32u + (t % TM) / 4u][t % 4u] = st.xs;
    if (t >= TM) {
        let u = t - TM;
        let c4 = u % 16u;
        let k8 = u / 16u;
        wq[(2u * k8) * 16u + c4] = signed_bytes(st.w, 0u);
        wq[(2u * k8 + 1u) * 16u + c4] = signed_bytes(st.w, 1u);
        if (k8 % 4u == 0u) {
            wsc[(k8 / 4u) * 16u + c4] = st.s;
        }
    }
}

// A split-K partial sum (q4gsw_shmem_prelude.wgsl store_tile_row): the f32's bits, as this kernel binds the
// scratch buffer as u32 words (its codes must not pass through an f32 load).
fn store_partial(i: u32, v: f32) {
    partial[i] = bitcast<u32>(v);
}

// The 4 block sums of one row's codes (a) against the 4 columns' codes (b), one slot.
fn dot_row(a: u32, b: vec4<u32>) -> vec4<i32> {
    return vec4<i32>(dot4I8Packed(a, b.x), dot4I8Packed(a, b.y), dot4I8Packed(a, b.z), dot4I8Packed(a, b.w));
}

// An integer block sum as f32 without a convert (|d| < 2^22): 1.5 * 2^23 + d is exact in the mantissa.
fn block_f32(d: vec4<i32>) -> vec4<f32> {
    return bitcast<vec4<f32>>(d + vec4<i32>(0x4B400000)) - vec4<f32>(12582912.0);
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

    var c0 = vec4<f32>(0.0); var c1 = vec4<f32>(0.0); var c2 = vec4<f32>(0.0); var c3 = vec4<f32>(0.0);
    var c4 = vec4<f32>(0.0); var c5 = vec4<f32>(0.0); var c6 = vec4<f32>(0.0); var c7 = vec4<f32>(0.0);

    var st = load_tile(k_begin, k_end, tile_m, tile_n, t);
    for (var k0 = k_begin; k0 < k_end; k0 += TK) {
        store_tile(st, t);
        workgroupBarrier();
        if (k0 + TK < k_end) {
            st = load_tile(k0 + TK, k_end, tile_m, tile_n, t);
        }
        for (var blk = 0u; blk < BLOCKS; blk++) {
            var d0 = vec4<i32>(0); var d1 = vec4<i32>(0); var d2 = vec4<i32>(0); var d3 = vec4<i32>(0);
            var d4 = vec4<i32>(0); var d5 = vec4<i32>(0); var d6 = vec4<i32>(0); var d7 = vec4<i32>(0);
            for (var s = 8u * blk; s < 8u * blk + 8u; s++) {
                let a0 = xq[s * 32u + ty];
                let a1 = xq[s * 32u + 16u + ty];
                let b = wq[s * 16u + tx];
                d0 += dot_row(a0.x, b); d1 += dot_row(a0.y, b); d2 += dot_row(a0.z, b); d3 += dot_row(a0.w, b);
                d4 += dot_row(a1.x, b); d5 += dot_row(a1.y, b); d6 += dot_row(a1.z, b); d7 += dot_row(a1.w, b);
            }
            let sw = wsc[blk * 16u + tx];
            let sx0 = xsc[blk * 32u + ty];
            let sx1 = xsc[blk * 32u + 16u + ty];
            c0 = fma(block_f32(d0), sx0.x * sw, c0); c1 = fma(block_f32(d1), sx0.y * sw, c1);
            c2 = fma(block_f32(d2), sx0.z * sw, c2); c3 = fma(block_f32(d3), sx0.w * sw, c3);
            c4 = fma(block_f32(d4), sx1.x * sw, c4); c5 = fma(block_f32(d5), sx1.y * sw, c5);
            c6 = fma(block_f32(d6), sx1.z * sw, c6); c7 = fma(block_f32(d7), sx1.w * sw, c7);
        }
        workgroupBarrier();
    }

    let z = wg.z;
    let m0 = tile_m + 4u * ty;
    let m1 = tile_m + 64u + 4u * ty;
    let n4 = tile_n / 4u + tx;
    store_tile_row(z, m0, n4, c0); store_tile_row(z, m0 + 1u, n4, c1);
    store_tile_row(z, m0 + 2u, n4, c2); store_tile_row(z, m0 + 3u, n4, c3);
    store_tile_row(z, m1, n4, c4); store_tile_row(z, m1 + 1u, n4, c5);
    store_tile_row(z, m1 + 2u, n4, c6); store_tile_row(z, m1 + 3u, n4, c7);
}
