// The first step of an int8 prefill call: each row's activations quantized to int8 per block of INT8_BLOCK
// (32) k, once per call, for q4gsw_gemm_shmem_int8.wgsl (layout: q4gsw_int8_prelude.wgsl).
//
// For row m and block b (k in [32 b, 32 b + 32)): scale = max_k |x[m, k]| / 127 and code = round(x / scale)
// (to nearest, ties to even) in -127..127; a block of zeros has scale 0 and codes 0. A block holding a NaN or
// an inf gets a NaN scale, and so its row's outputs are NaN: a visible failure, as fp32's would be (WGSL's
// max and clamp drop a NaN operand, so without the check a NaN would quantize to a finite code).
// tools/reference.py int8_activations computes the same in fp64 (the tests' golden).
//
// One invocation per (row, block), reading its 128 contiguous bytes. Dispatch: (ceil(M * K / 32 / 256), 1, 1).

// round(v) as a byte of a two's-complement int8, for |v| <= 127.5: adding 1.5 * 2^23 rounds v to an integer
// (to nearest, ties to even, as GPUs round an f32 add) in the float's low mantissa bits, whose low byte is
// then v's code; no convert.
fn code_byte(v: f32) -> u32 {
    return bitcast<u32>(v + 12582912.0) & 0xFFu;
}

fn pack_codes(v: vec4<f32>) -> u32 {
    let c = clamp(v, vec4<f32>(-127.0), vec4<f32>(127.0));
    return code_byte(c.x) | (code_byte(c.y) << 8u) | (code_byte(c.z) << 16u) | (code_byte(c.w) << 24u);
}

fn max4(v: vec4<f32>) -> f32 {
    let a = abs(v);
    return max(max(a.x, a.y), max(a.z, a.w));
}

// Whether any element is a NaN or an inf, by its bits (an all-ones exponent): a compiler may assume floats
// are finite and fold a float comparison away, not an integer one.
fn non_finite(v: vec4<f32>) -> bool {
    return any((bitcast<vec4<u32>>(v) & vec4<u32>(0x7F800000u)) == vec4<u32>(0x7F800000u));
}

@compute @workgroup_size(WORKGROUP_X, WORKGROUP_Y, WORKGROUP_Z)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let blocks = params.K / INT8_BLOCK;
    let i = wg.x * WORKGROUP_X + t;   // row i / blocks, block i % blocks
    if (i >= params.M * blocks) {
        return;
    }
    let quads = INT8_BLOCK / 4u;
    let first = i * quads;   // the block's first k quad: rows are K / 4 quads long, blocks `quads`
    var v: array<vec4<f32>, INT8_BLOCK / 4u>;
    var amax = 0.0;
    var finite = true;
    for (var j = 0u; j < quads; j++) {
        v[j] = x[first + j];
        amax = max(amax, max4(v[j]));
        finite = finite && !non_finite(v[j]);
    }
    let inv = select(0.0, 127.0 / amax, amax > 0.0);
    let codes = int8_codes_offset() + first;
    for (var j = 0u; j < quads; j++) {
        partial[codes + j] = pack_codes(v[j] * inv);
    }
    partial[int8_scales_offset() + i] = select(0x7FC00000u, bitcast<u32>(amax / 127.0), finite);   // NaN or scale
}
