// Gathers by index tensors of the graph: embedding with computed ids, index.Tensor, gather.
//   out[p] = a[a_off + sum_d p_d * sa_d + idx_b(p) * b_step + idx_c(p) * c_step]
// over out's shape d0..d5 (out contiguous), where idx_b(p) = b[b_off + sum_d p_d * sb_d] when
// n_idx >= 1 and idx_c(p) likewise from c when n_idx == 2 (strides 0 on the dims an index does
// not vary over). An index is an f32 holding an integer (the graph's integers,
// ops_transformer.py), or an i32 when b_i32 / c_i32 (an integer input of the delegate). A
// negative index counts from the end (+ wrap: the source dim's size), as torch's indexing does;
// it is then clamped into [0, wrap), so a bad index never reads outside the source. Every
// binding is declared u32: the gathered words are moved, never touched as floats.

fn index_value(raw: u32, is_i32: u32, wrap: u32) -> u32 {
    var v = i32(bitcast<f32>(raw));
    if (is_i32 != 0u) {
        v = bitcast<i32>(raw);
    }
    if (v < 0) {
        v = v + i32(wrap);
    }
    return u32(clamp(v, 0, i32(wrap) - 1));
}

@compute @workgroup_size(WORKGROUP_X, WORKGROUP_Y, WORKGROUP_Z)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let flat = flat_index(gid, groups);
    if (flat >= params.n) {
        return;
    }
    var rest = flat;
    var ia = params.a_off;
    var ib = params.b_off;
    var ic = params.c_off;
    for (var k = 0u; k < RANK; k++) {
        let dim = RANK - 1u - k;      // innermost first
        let size = d_at(dim);
        let idx = rest % size;
        rest = rest / size;
        ia += idx * sa_at(dim);
        ib += idx * sb_at(dim);
        ic += idx * sc_at(dim);
    }
    if (params.n_idx >= 1u) {
        ia += index_value(b[ib], params.b_i32, params.b_wrap) * params.b_step;
    }
    if (params.n_idx >= 2u) {
        ia += index_value(c[ic], params.c_i32, params.c_wrap) * params.c_step;
    }
    out[flat] = a[ia];
}
