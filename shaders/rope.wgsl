// Rotary position embedding on interleaved pairs, as ExecuTorch's apply_rotary_emb computes it:
//   out[..., 2i]     = x[..., 2i] * cos[..., i] - x[..., 2i + 1] * sin[..., i]
//   out[..., 2i + 1] = x[..., 2i] * sin[..., i] + x[..., 2i + 1] * cos[..., i]
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
    let ic = i0 * params.c0 + i1 * params.c1 + i2 * params.c2 + i3 * params.c3;
    let is = i0 * params.s0 + i1 * params.s1 + i2 * params.s2 + i3 * params.s3;
    let c = cos_t[ic];
    let s = sin_t[is];
    let xr = x[2u * p];
    let xi = x[2u * p + 1u];
    out[2u * p] = xr * c - xi * s;
    out[2u * p + 1u] = xr * s + xi * c;
}
