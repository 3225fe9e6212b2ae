// A quantized embedding (backend/graph/ops_quantized.py), read without ever dequantizing the table:
//   out[t][d] = code(id, d) * scales[id * n_groups + d / group_size]
// for each of n_ids ids in `a`, rows of `dim` values. `w` holds the int4 / int8 codes of the
// [vocab][dim] table row-major, packed 32 / bits per u32 from the low bits up (int4: 8 nibbles,
// int8: 4 bytes), two's complement; `scales` one f32 per (row, group of group_size values), a
// row's groups contiguous (n_groups = 1: one scale per row). An id is the i32 of an input (the
// runtime checked it is below vocab when it wrote the input), or an f32 holding an integer when
// ids_f32 = 1 (ids the graph computed); either way it is clamped into [0, vocab), so a bad id
// never reads outside the table.

@compute @workgroup_size(WORKGROUP_X, WORKGROUP_Y, WORKGROUP_Z)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let flat = flat_index(gid, groups);
    if (flat >= params.n_ids * params.dim) {
        return;
    }
    let t = flat / params.dim;
    let d = flat % params.dim;
    var id = bitcast<i32>(a[t]);
    if (params.ids_f32 != 0u) {
        id = i32(bitcast<f32>(a[t]));
    }
    let row = u32(clamp(id, 0, i32(params.vocab) - 1));
    let e = row * params.dim + d;                  // the code's index in the row-major table
    let per_word = 32u / params.bits;
    let shift = (e % per_word) * params.bits;
    // the code's bits to the top of the word, then an arithmetic shift down: its sign extended
    let code = bitcast<i32>(w[e / per_word] << (32u - params.bits - shift)) >> (32u - params.bits);
    out[flat] = f32(code) * scales[row * params.n_groups + d / params.group_size];
}
