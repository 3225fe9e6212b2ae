// Shared by the attention kernels (sdpa, sdpa_split; registry.py: prelude "attention_prelude.wgsl").
// They read the kernel's module-scope `q_scaled` (q times the scale, staged in workgroup memory),
// `weights` (the chunk's exp(score - max)), and the bindings `k` and `v` ([B][C][Hkv][D] caches).

// q . k of the key row at `row`, 8 loads a round.
fn key_dot(row: u32, D: u32) -> f32 {
    var s0 = 0.0;
    var s1 = 0.0;
    var d = 0u;
    for (; d + 8u <= D; d += 8u) {
        let r = row + d;
        let k0 = k[r];
        let k1 = k[r + 1u];
        let k2 = k[r + 2u];
        let k3 = k[r + 3u];
        let k4 = k[r + 4u];
        let k5 = k[r + 5u];
        let k6 = k[r + 6u];
        let k7 = k[r + 7u];
        s0 += q_scaled[d] * k0 + q_scaled[d + 1u] * k1 + q_scaled[d + 2u] * k2 + q_scaled[d + 3u] * k3;
        s1 += q_scaled[d + 4u] * k4 + q_scaled[d + 5u] * k5 + q_scaled[d + 6u] * k6 + q_scaled[d + 7u] * k7;
    }
    for (; d < D; d++) {
        s0 += q_scaled[d] * k[row + d];
    }
    return s0 + s1;
}

fn w4(w: u32) -> vec4<f32> {
    return vec4<f32>(weights[w], weights[w + 1u], weights[w + 2u], weights[w + 3u]);
}

// v[key j .. j + 3][dim], keys past `last` clamped to it.
fn v4(j: u32, last: u32, kv_base: u32, key_stride: u32, dim: u32) -> vec4<f32> {
    return vec4<f32>(v[kv_base + min(j, last) * key_stride + dim],
                     v[kv_base + min(j + 1u, last) * key_stride + dim],
                     v[kv_base + min(j + 2u, last) * key_stride + dim],
                     v[kv_base + min(j + 3u, last) * key_stride + dim]);
}

// sum over c < 16 x rounds of weights[w0 + c] x v[key first + c][dim], 16 loads a round; keys
// past `last` are clamped to it (their weights are 0).
fn weighted_v(w0: u32, first: u32, last: u32, rounds: u32, kv_base: u32, key_stride: u32, dim: u32) -> f32 {
    var sum = 0.0;
    for (var r = 0u; r < rounds; r++) {
        let c = 16u * r;
        let j = first + c;
        let va = v4(j, last, kv_base, key_stride, dim);
        let vb = v4(j + 4u, last, kv_base, key_stride, dim);
        let vc = v4(j + 8u, last, kv_base, key_stride, dim);
        let vd = v4(j + 12u, last, kv_base, key_stride, dim);
        let w = w0 + c;
        sum += (dot(w4(w), va) + dot(w4(w + 4u), vb)) + (dot(w4(w + 8u), vc) + dot(w4(w + 12u), vd));
    }
    return sum;
}
