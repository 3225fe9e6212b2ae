// The q4gsw prelude: what every q4gsw linear kernel shares. shaders/registry.py
// puts it after the generated header (constants, struct Params, bindings) and
// before the kernel's own file.
//
// Layout of the bindings (backend/serialization/schema.fbs):
//   x       [M][K] fp32
//   qweight [n_stride/16][K/8][16] u32: word (k8, n) holds k = 8*k8 + j of column n in
//           nibble j (lowest nibble = lowest k), stored as code + 8 (0..15); a vec4<u32>
//           read is 4 adjacent columns
//   scales  [n_stride/16][K/gs][16] fp32: scale of k in [g*gs, (g+1)*gs) of column n
//   bias    [n_stride] fp32 (zeros when the layer has none)
//   y       [M][N] fp32 -- or, for a fused layer, its output parts (store_y):
//   y, y1, y2  columns [0, part1), [part1, part2), [part2, N), each part its own contiguous
//           [M][width] tensor; an unfused layer has part1 = part2 = N (y1, y2 never written)
//   partial [k_splits][M][N] fp32 split-K partial sums (kernels that split K)
// Preconditions: gs % 32 == 0 (a word never straddles two groups), K % gs == 0,
// n_stride = N rounded up to 16. Padded columns hold code 0 (nibble 8) and scale 0.

// Nibble -> code as f32 without an int-to-float convert (quarter rate on
// NVIDIA): 0x4B000000 | q is the float 2^23 + q exactly, so subtracting
// 2^23 + 8 leaves q - 8 exactly.
fn nib(w: u32, shift: u32) -> f32 {
    return bitcast<f32>(((w >> shift) & 0xFu) | 0x4B000000u) - 8388616.0;
}

// The same for 4 columns at once.
fn nib4(w: vec4<u32>, shift: u32) -> vec4<f32> {
    let q = (w >> vec4<u32>(shift)) & vec4<u32>(0xFu);
    return bitcast<vec4<f32>>(q | vec4<u32>(0x4B000000u)) - vec4<f32>(8388616.0);
}

// One row's contribution of 8 k to 4 columns: the row's x slice (xa, xb) times
// the dequantized 8 x 4 block whose k rows are w0..w7.
fn dot8(xa: vec4<f32>, xb: vec4<f32>, w0: vec4<f32>, w1: vec4<f32>, w2: vec4<f32>, w3: vec4<f32>,
        w4: vec4<f32>, w5: vec4<f32>, w6: vec4<f32>, w7: vec4<f32>) -> vec4<f32> {
    return xa.x * w0 + xa.y * w1 + xa.z * w2 + xa.w * w3 + xb.x * w4 + xb.y * w5 + xb.z * w6 + xb.w * w7;
}

// Where rows m0 .. m0+3 start in an array of `stride` elements per row; rows
// past M start where row M - 1 does (a partial tile reads it again and never stores it).
fn row_starts(m0: u32, stride: u32) -> vec4<u32> {
    let last = params.M - 1u;
    return vec4<u32>(m0, min(m0 + 1u, last), min(m0 + 2u, last), min(m0 + 3u, last)) * stride;
}

// Output (m, n) of the layer (n < N): into the part holding column n, at row m of that part.
// A fused layer (preprocess concatenated sibling linears' columns) hands each consumer its
// own [M][N_i] tensor this way, whatever M is; an unfused one writes y[m * N + n].
fn store_y(m: u32, n: u32, v: f32) {
    if (n < params.part1) {
        y[m * params.part1 + n] = v;
    } else if (n < params.part2) {
        y1[m * (params.part2 - params.part1) + (n - params.part1)] = v;
    } else {
        y2[m * (params.N - params.part2) + (n - params.part2)] = v;
    }
}

// y[m, 4*n4 .. 4*n4+3] = v, skipping rows >= M and columns >= N (padding).
fn store_row(m: u32, n4: u32, v: vec4<f32>) {
    if (m >= params.M) {
        return;
    }
    for (var c = 0u; c < 4u; c++) {
        let n = 4u * n4 + c;
        if (n < params.N) {
            store_y(m, n, v[c]);
        }
    }
}
