// Attention over a KV cache, as ExecuTorch's llama::custom_sdpa computes it:
//   out[b][s][h][:] = softmax_j(scale * q[b][s][h][:] . k[b][j][h / (Hq / Hkv)][:]) @ v[b][j][h / (Hq / Hkv)][:]
// over keys j < start_pos + s + 1 when causal, else j < start_pos + S (and j < C). q and out are
// [B][S][Hq][D], k and v the whole caches [B][C][Hkv][D]; GQA maps query heads onto cache
// heads without repeating K or V. No cache row past the visible keys is read. D <= MAX_D = 256
// (the lowering checks D).
//
// One workgroup per (h, s, b), flash-decoding within the workgroup: its invocations form
// KEY_GROUPS = WORKGROUP_X / 64 groups of 64 (WORKGROUP_X: a multiple of 64, at most 512), and
// each group runs its own online softmax over its share of the keys; the groups' (max, sum,
// accumulators) are combined at the end. q, times scale, is staged in workgroup memory. The keys
// go by chunks of WORKGROUP_X, 64 per group, with two barriers per chunk:
//   1. invocation l of group g computes the full dot product q . k of key l of its group's
//      sub-chunk (8 loads in flight per round) and stores the score;
//   2. it takes its group's max over the sub-chunk, the new running max and the factor that
//      rescales its sum and accumulators, and stores its key's weight exp(score - max);
//   3. it adds the group's weights to its running sum and weight x v to its output dims l,
//      l + 64, l + 128, l + 192 (16 keys per round; loads of v coalesced over the group).
// Keys past the visible ones (in the last chunk) weigh 0, and loads in a round past them are
// clamped to the last visible key. No per-invocation state is an array: indexed in loops, arrays
// went to local memory on a GPU and made the kernel several times slower. Workgroup memory: MAX_D +
// 2 x WORKGROUP_X + KEY_GROUPS x (MAX_D + 2) floats (2.5 KiB at 64 invocations, 7 KiB at 256).
// More invocations per workgroup is what speeds a dispatch of few rows up. Decode (S == 1) takes
// sdpa_split + sdpa_combine instead, which spread a head's keys over workgroups (the lowering
// picks by zero grids; measurements: docs/PERFORMANCE.md, "issue 13"), and prefill with D <= 128
// takes sdpa_flash, whose workgroups share each tile of keys and values over 32 query rows: the
// lowering dispatches this kernel only for prefill with 128 < D <= 256.

const GROUP: u32 = 64u;                        // invocations per key group; MAX_D = 4 x GROUP
const KEY_GROUPS: u32 = WORKGROUP_X / GROUP;
const CHUNK: u32 = WORKGROUP_X;                // keys per chunk: one per invocation
const LOWEST: f32 = -3.4028234663852886e38;

var<workgroup> q_scaled: array<f32, MAX_D>;
var<workgroup> scores: array<f32, CHUNK>;
var<workgroup> weights: array<f32, CHUNK>;
var<workgroup> group_acc: array<f32, KEY_GROUPS * MAX_D>;
var<workgroup> group_max: array<f32, KEY_GROUPS>;
var<workgroup> group_sum: array<f32, KEY_GROUPS>;

@compute @workgroup_size(WORKGROUP_X, WORKGROUP_Y, WORKGROUP_Z)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let h = wid.x;
    let s = wid.y;
    let b = wid.z;
    let lid = lid3.x;
    let g = lid / GROUP;            // this invocation's key group
    let l = lid % GROUP;            // and its index in the group
    let D = params.D;
    let kv_head = h / (params.Hq / params.Hkv);
    let q_base = ((b * params.S + s) * params.Hq + h) * D;
    let key_stride = params.Hkv * D;                          // elements from key j to key j + 1
    let kv_base = (b * params.C * params.Hkv + kv_head) * D;  // key 0 of this cache head
    var n_keys = params.start_pos + params.S;
    if (params.causal != 0u) {
        n_keys = params.start_pos + s + 1u;
    }
    n_keys = min(n_keys, params.C);   // uniform over the workgroup, as the chunk loop's bound
    let last = n_keys - 1u;

    let scale = param_f32(params.scale_bits);
    for (var d = lid; d < D; d += WORKGROUP_X) {
        q_scaled[d] = q[q_base + d] * scale;
    }
    workgroupBarrier();

    let w0 = g * GROUP;             // the group's slots in scores and weights
    var acc0 = 0.0;                 // output dims l, l + 64, l + 128, l + 192
    var acc1 = 0.0;
    var acc2 = 0.0;
    var acc3 = 0.0;
    var running_max = LOWEST;
    var running_sum = 0.0;
    for (var j0 = 0u; j0 < n_keys; j0 += CHUNK) {
        let first = j0 + g * GROUP;                           // the group's first key
        let sub_len = min(GROUP, max(n_keys, first) - first);  // its visible keys (0 past the end)

        // 1. The score of this invocation's key.
        var score = 0.0;
        if (l < sub_len) {
            score = key_dot(kv_base + (first + l) * key_stride, D);
        }
        scores[w0 + l] = score;
        workgroupBarrier();

        // 2. The group's max; this invocation's key's weight.
        var sub_max = LOWEST;
        for (var c = 0u; c < sub_len; c++) {
            sub_max = max(sub_max, scores[w0 + c]);
        }
        let new_max = max(running_max, sub_max);
        let correction = exp(running_max - new_max);   // 0 on the group's first visible chunk
        running_max = new_max;
        weights[w0 + l] = select(0.0, exp(score - new_max), l < sub_len);
        workgroupBarrier();
        // (The next chunk writes scores and weights only after a barrier, which every
        // invocation reaches when done reading this chunk's.)

        // 3. Rescale; accumulate the group's weights and weight x v.
        let rounds = (sub_len + 15u) / 16u;
        var chunk_sum = 0.0;
        for (var c = 0u; c < sub_len; c++) {
            chunk_sum += weights[w0 + c];
        }
        running_sum = running_sum * correction + chunk_sum;
        if (l < D) {
            acc0 = acc0 * correction + weighted_v(w0, first, last, rounds, kv_base, key_stride, l);
        }
        if (l + GROUP < D) {
            acc1 = acc1 * correction + weighted_v(w0, first, last, rounds, kv_base, key_stride, l + GROUP);
        }
        if (l + 2u * GROUP < D) {
            acc2 = acc2 * correction + weighted_v(w0, first, last, rounds, kv_base, key_stride, l + 2u * GROUP);
        }
        if (l + 3u * GROUP < D) {
            acc3 = acc3 * correction + weighted_v(w0, first, last, rounds, kv_base, key_stride, l + 3u * GROUP);
        }
    }

    // Combine the groups: out = sum_g e^(m_g - M) acc_g / sum_g e^(m_g - M) sum_g, M = max_g m_g
    // (a group that saw no key has m_g = LOWEST: its factor is 0).
    let a = g * MAX_D + l;
    group_acc[a] = acc0;
    group_acc[a + GROUP] = acc1;
    group_acc[a + 2u * GROUP] = acc2;
    group_acc[a + 3u * GROUP] = acc3;
    if (l == 0u) {
        group_max[g] = running_max;
        group_sum[g] = running_sum;
    }
    workgroupBarrier();
    if (g == 0u) {
        var m = LOWEST;
        for (var gg = 0u; gg < KEY_GROUPS; gg++) {
            m = max(m, group_max[gg]);
        }
        var total = 0.0;
        for (var gg = 0u; gg < KEY_GROUPS; gg++) {
            total += group_sum[gg] * exp(group_max[gg] - m);
        }
        for (var dim = l; dim < D; dim += GROUP) {
            var y = 0.0;
            for (var gg = 0u; gg < KEY_GROUPS; gg++) {
                y += group_acc[gg * MAX_D + dim] * exp(group_max[gg] - m);
            }
            out[q_base + dim] = y / total;
        }
    }
}
