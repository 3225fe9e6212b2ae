// Where an int8 prefill call keeps its quantized activations (q4gsw_quantize_int8.wgsl writes them,
// q4gsw_gemm_shmem_int8.wgsl reads them): in the layer's `partial` scratch buffer, after the split-K partial
// sums ([k_splits][M][N] fp32, none without split K), as
//   codes  [M][K / 4] u32: 4 int8 codes of k 4j..4j+3 (the lowest k in the lowest byte), then
//   scales [M][K / INT8_BLOCK] fp32 bits: block b of row m is codes * scales[m][b].
// The planners size the buffer for both (Plan.partial_bytes).

fn int8_codes_offset() -> u32 {
    return select(0u, params.k_splits * params.M * params.N, params.k_splits > 1u);
}

fn int8_scales_offset() -> u32 {
    return int8_codes_offset() + params.M * (params.K / 4u);
}
