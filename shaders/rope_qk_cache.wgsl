// One attention layer's RoPE and KV-cache writes in one dispatch (backend/graph/ops.py
// _lower_rope_qk_cache): with q [B, S, Hq, D], k and v [B, S, Hkv, D] contiguous, and the caches
// [B, C, Hkv, D] contiguous,
//   q_out[b, s, h]                 = rope(q[b, s, h])       h < Hq
//   k_cache[b, start_pos + s, h]   = rope(k[b, s, h])       h < Hkv
//   v_cache[b, start_pos + s, h]   = v[b, s, h]
// rope rotates interleaved pairs by the angle of (b, s, pair) (rope_prelude.wgsl; cos and sin are
// read through strides c0..c3 / s0..s3 over [B, S, head, D / 2], the head dim broadcast or shared by
// q and k). One invocation per pair of a row (b, s, head) of the B x S x (Hq + Hkv) rows: the first Hq
// heads of a position are q's, the next Hkv k's, and a k invocation moves v's pair along with it.
// Grid: ceil(n_pairs / WORKGROUP_X) workgroups, split over y beyond 65535 (graph_prelude.wgsl flat_index).

@compute @workgroup_size(WORKGROUP_X, WORKGROUP_Y, WORKGROUP_Z)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let p = flat_index(gid, groups);
    if (p >= params.n_pairs) {
        return;
    }
    let heads = params.Hq + params.Hkv;
    let i = p % params.half;           // pair within the head
    let row = p / params.half;
    let h = row % heads;               // q's heads, then k's
    let t = row / heads;               // position b * S + s
    let s = t % params.S;
    let b = t / params.S;
    if (h < params.Hq) {
        let src = 2u * ((t * params.Hq + h) * params.half + i);
        let rotated = rotate_pair(vec2<f32>(q[src], q[src + 1u]), rope_angle(b, s, h, i));
        q_out[src] = rotated.x;
        q_out[src + 1u] = rotated.y;
        return;
    }
    let hk = h - params.Hq;
    let src = 2u * ((t * params.Hkv + hk) * params.half + i);
    let dst = 2u * (((b * params.C + params.start_pos + s) * params.Hkv + hk) * params.half + i);
    let rotated = rotate_pair(vec2<f32>(k[src], k[src + 1u]), rope_angle(b, s, hk, i));
    k_cache[dst] = rotated.x;
    k_cache[dst + 1u] = rotated.y;
    v_cache[dst] = v[src];
    v_cache[dst + 1u] = v[src + 1u];
}
