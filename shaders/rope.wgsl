// Rotary position embedding on interleaved pairs (rope_prelude.wgsl: rotate_pair, rope_angle).
// One invocation per pair p over the shape d0 x d1 x d2 x d3 (d3 = D / 2 pairs per row); x and
// out are contiguous, cos and sin are read through their own strides (broadcast dims stride 0).

@compute @workgroup_size(WORKGROUP_X, WORKGROUP_Y, WORKGROUP_Z)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let p = flat_index(gid, groups);
    if (p >= params.n_pairs) {
        return;
    }
    let i3 = p % params.d3;
    let r2 = p / params.d3;
    let i2 = r2 % params.d2;
    let r1 = r2 / params.d2;
    let i1 = r1 % params.d1;
    let i0 = r1 / params.d1;
    let rotated = rotate_pair(vec2<f32>(x[2u * p], x[2u * p + 1u]), rope_angle(i0, i1, i2, i3));
    out[2u * p] = rotated.x;
    out[2u * p + 1u] = rotated.y;
}
