// Streaming-read probe (benchmark ceiling, not a model kernel): reads every
// vec4<u32> of `data` once and folds them into one word per thread, so the
// reads cannot be optimized away. Its time for a buffer the size of a layer's
// packed weights is the bandwidth any GEMV of that layer could reach here.
//
// Layout: data [count] vec4<u32>; sink [threads] u32.
// Thread i reads elements i, i + threads, i + 2 * threads, ... (coalesced).
// Dispatch: (groups, 1, 1) with WORKGROUP_X threads per workgroup; threads = groups * WORKGROUP_X.

@compute @workgroup_size(WORKGROUP_X, WORKGROUP_Y, WORKGROUP_Z)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let threads = groups.x * WORKGROUP_X;
    let count = arrayLength(&data);
    var acc = vec4<u32>(0u);
    for (var i = gid.x; i < count; i += threads) {
        acc ^= data[i];
    }
    sink[gid.x] = acc.x ^ acc.y ^ acc.z ^ acc.w;
}
