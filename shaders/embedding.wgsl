// out[t][:] = w[a[t]][:] for each of n_ids token ids in `a` (u32; the runtime checked each
// is below vocab when it wrote the input), rows of `dim` floats.

@compute @workgroup_size(WORKGROUP_X, WORKGROUP_Y, WORKGROUP_Z)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let flat = flat_index(gid, groups);
    if (flat >= params.n_ids * params.dim) {
        return;
    }
    let t = flat / params.dim;
    let id = min(a[t], params.vocab - 1u);   // in range already; the clamp keeps a bad id from reading past w
    out[flat] = w[id * params.dim + flat % params.dim];
}
