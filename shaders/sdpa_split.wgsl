// Flash-decoding, step 1 of 2: attention over one split of the keys, as a partial result that
// sdpa_combine.wgsl merges. Same semantics and Params as sdpa.wgsl (see its header): q and out are
// [B][S][Hq][D], k and v the whole caches [B][C][Hkv][D], GQA maps query head h onto cache head
// h / (Hq / Hkv), query s sees keys j < start_pos + s + 1 when causal (else j < start_pos + S), and
// j < C. No cache row past the visible keys is read. D <= MAX_D = 256.
//
// Grid (n_splits, Hq, B x S); workgroup (split, h, b x S + s) takes keys [split x KEYS_PER_SPLIT,
// (split + 1) x KEYS_PER_SPLIT) of the visible ones and writes the record of (b, s, h, split):
//   partial[r x (D + 2) + 0]      m = the max of its scores (scale x q . k)
//   partial[r x (D + 2) + 1]      l = sum_j exp(score_j - m)
//   partial[r x (D + 2) + 2 + d]  acc[d] = sum_j exp(score_j - m) v[j][d]  (not divided by l)
// with r = ((b x S + s) x Hq + h) x n_splits + split. n_splits (a Params field: the lowering's grid
// x) is ceil(min(start_pos + S, C) / KEYS_PER_SPLIT). A split with no visible key for its row (only
// a causal S > 1 has one) writes m = LOWEST, l = 0, acc = 0, which the combine weighs 0.
// direct_out = 1 (the lowering sets it when n_splits is 1: up to KEYS_PER_SPLIT visible keys) skips
// the record: the split writes out[b][s][h][:] = acc / l itself and no combine runs.
//
// Three phases over the split's keys, one key per invocation per round of WORKGROUP_X:
//   1. invocation i computes the full dot product q . k of keys i, i + WORKGROUP_X, ... (8 loads in
//      flight) into workgroup memory and keeps its own (max, sum of exp); a tree over the
//      workgroup then gives the split's (m, l);
//   2. each score becomes its weight exp(score - m) (0 past the visible keys);
//   3. the invocations form KEY_GROUPS = WORKGROUP_X / 64 groups of 64; group g adds weight x v
//      over its GROUP_KEYS keys for output dims l, l + 64, l + 128, l + 192 (16 keys a round,
//      loads of v coalesced over the group, keys past the visible ones clamped to the last visible
//      one with weight 0), and the groups' sums are added in workgroup memory.
// WORKGROUP_X is a multiple of 64 and KEYS_PER_SPLIT a multiple of WORKGROUP_X (the registry
// checks). Workgroup memory: MAX_D + KEYS_PER_SPLIT + 2 x WORKGROUP_X + KEY_GROUPS x MAX_D floats
// (8 KiB at 256 and 256).

const GROUP: u32 = 64u;                        // invocations per key group; MAX_D = 4 x GROUP
const KEY_GROUPS: u32 = WORKGROUP_X / GROUP;
const GROUP_KEYS: u32 = KEYS_PER_SPLIT / KEY_GROUPS;   // a multiple of 64, so of the 16 keys a round
const LOWEST: f32 = -3.4028234663852886e38;

var<workgroup> q_scaled: array<f32, MAX_D>;
var<workgroup> weights: array<f32, KEYS_PER_SPLIT>;    // scores, then exp(score - m)
var<workgroup> tree_max: array<f32, WORKGROUP_X>;
var<workgroup> tree_sum: array<f32, WORKGROUP_X>;
var<workgroup> group_acc: array<f32, KEY_GROUPS * MAX_D>;

@compute @workgroup_size(WORKGROUP_X, WORKGROUP_Y, WORKGROUP_Z)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let split = wid.x;
    let h = wid.y;
    let s = wid.z % params.S;
    let b = wid.z / params.S;
    let lid = lid3.x;
    let g = lid / GROUP;            // this invocation's key group
    let l = lid % GROUP;            // and its index in the group
    let D = params.D;
    let kv_head = h / (params.Hq / params.Hkv);
    let row = (b * params.S + s) * params.Hq + h;             // the query row (b, s, h)
    let key_stride = params.Hkv * D;                          // elements from key j to key j + 1
    let kv_base = (b * params.C * params.Hkv + kv_head) * D;  // key 0 of this cache head
    var n_keys = params.start_pos + params.S;
    if (params.causal != 0u) {
        n_keys = params.start_pos + s + 1u;
    }
    n_keys = min(n_keys, params.C);
    let first = split * KEYS_PER_SPLIT;                       // the split's first key
    let n_here = min(KEYS_PER_SPLIT, max(n_keys, first) - first);   // its visible keys (uniform)

    let scale = param_f32(params.scale_bits);
    for (var d = lid; d < D; d += WORKGROUP_X) {
        q_scaled[d] = q[row * D + d] * scale;
    }
    workgroupBarrier();

    // 1. Scores, each invocation's (max, sum of exp), then the split's by a tree.
    var m = LOWEST;
    var sum = 0.0;
    for (var i = lid; i < n_here; i += WORKGROUP_X) {
        let score = key_dot(kv_base + (first + i) * key_stride, D);
        weights[i] = score;
        let new_m = max(m, score);
        sum = sum * exp(m - new_m) + exp(score - new_m);
        m = new_m;
    }
    tree_max[lid] = m;
    tree_sum[lid] = sum;
    workgroupBarrier();
    for (var span = WORKGROUP_X / 2u; span > 0u; span /= 2u) {
        if (lid < span) {
            let m2 = tree_max[lid + span];
            let new_m = max(m, m2);
            sum = sum * exp(m - new_m) + tree_sum[lid + span] * exp(m2 - new_m);
            m = new_m;
            tree_max[lid] = m;
            tree_sum[lid] = sum;
        }
        workgroupBarrier();
    }
    let split_max = tree_max[0];
    let split_sum = tree_sum[0];

    // 2. Weights (an invocation rewrites only the scores it wrote); 0 past the visible keys.
    for (var i = lid; i < KEYS_PER_SPLIT; i += WORKGROUP_X) {
        weights[i] = select(0.0, exp(weights[i] - split_max), i < n_here);
    }
    workgroupBarrier();

    // 3. weight x v over the group's keys, then the groups' sums.
    let w0 = g * GROUP_KEYS;                                  // the group's first slot in weights
    let group_len = min(GROUP_KEYS, max(n_here, w0) - w0);
    let rounds = (group_len + 15u) / 16u;
    let last = first + n_here - 1u;                           // used only when rounds > 0
    let gfirst = first + w0;
    var acc0 = 0.0;
    var acc1 = 0.0;
    var acc2 = 0.0;
    var acc3 = 0.0;
    if (l < D) {
        acc0 = weighted_v(w0, gfirst, last, rounds, kv_base, key_stride, l);
    }
    if (l + GROUP < D) {
        acc1 = weighted_v(w0, gfirst, last, rounds, kv_base, key_stride, l + GROUP);
    }
    if (l + 2u * GROUP < D) {
        acc2 = weighted_v(w0, gfirst, last, rounds, kv_base, key_stride, l + 2u * GROUP);
    }
    if (l + 3u * GROUP < D) {
        acc3 = weighted_v(w0, gfirst, last, rounds, kv_base, key_stride, l + 3u * GROUP);
    }
    let a = g * MAX_D + l;
    group_acc[a] = acc0;
    group_acc[a + GROUP] = acc1;
    group_acc[a + 2u * GROUP] = acc2;
    group_acc[a + 3u * GROUP] = acc3;
    workgroupBarrier();

    let record = (row * params.n_splits + split) * (D + 2u);
    for (var dim = lid; dim < D; dim += WORKGROUP_X) {
        var y = 0.0;
        for (var gg = 0u; gg < KEY_GROUPS; gg++) {
            y += group_acc[gg * MAX_D + dim];
        }
        if (params.direct_out != 0u) {
            out[row * D + dim] = y / split_sum;
        } else {
            partial[record + 2u + dim] = y;
        }
    }
    if (params.direct_out != 0u) {
        return;
    }
    if (lid == 0u) {
        partial[record] = split_max;
        partial[record + 1u] = split_sum;
    }
}
