// Shared by the graph kernels (registry.py: prelude "graph_prelude.wgsl").
//
// 1-D kernels run on a grid of up to 65535 x Y workgroups (the lowering splits a
// long grid over y): an invocation's flat index counts x fastest.
fn flat_index(gid: vec3<u32>, groups: vec3<u32>) -> u32 {
    return gid.x + gid.y * groups.x * WORKGROUP_X;
}

// An f32 carried in a u32 Params field (the lowering writes the float's bits).
fn param_f32(bits: u32) -> f32 {
    return bitcast<f32>(bits);
}
