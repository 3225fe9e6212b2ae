// Flash-decoding, step 2 of 2: merges the n_splits partial records sdpa_split.wgsl wrote for each
// query row into the attention output (custom_sdpa's semantics: see sdpa.wgsl's header).
//
// Grid (Hq, S, B): one workgroup per query row (h, s, b). With the records (m_i, l_i, acc_i) of
// the row's splits i < n_splits (layout: sdpa_split.wgsl's header) and M = max_i m_i,
//   out[b][s][h][d] = sum_i exp(m_i - M) acc_i[d] / sum_i exp(m_i - M) l_i
// (a split that saw no key has m_i = LOWEST, l_i = 0, acc_i = 0: its factor is 0). Invocation l
// computes output dims l, l + 64, l + 128, l + 192 (WORKGROUP_X = 64 = MAX_D / 4: the registry
// checks); the factors exp(m_i - M) go through workgroup memory, WORKGROUP_X splits at a time.

const LOWEST: f32 = -3.4028234663852886e38;

var<workgroup> tree_max: array<f32, WORKGROUP_X>;
var<workgroup> factors: array<f32, WORKGROUP_X>;

@compute @workgroup_size(WORKGROUP_X, WORKGROUP_Y, WORKGROUP_Z)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let h = wid.x;
    let s = wid.y;
    let b = wid.z;
    let lid = lid3.x;
    let D = params.D;
    let n = params.n_splits;
    let stride = D + 2u;                                      // floats per record
    let row = (b * params.S + s) * params.Hq + h;
    let base = row * n * stride;                              // the row's first record

    // M, the largest of the splits' maxima.
    var m = LOWEST;
    for (var i = lid; i < n; i += WORKGROUP_X) {
        m = max(m, partial[base + i * stride]);
    }
    tree_max[lid] = m;
    workgroupBarrier();
    for (var span = WORKGROUP_X / 2u; span > 0u; span /= 2u) {
        if (lid < span) {
            m = max(m, tree_max[lid + span]);
            tree_max[lid] = m;
        }
        workgroupBarrier();
    }
    let row_max = tree_max[0];

    var total = 0.0;
    var acc0 = 0.0;
    var acc1 = 0.0;
    var acc2 = 0.0;
    var acc3 = 0.0;
    for (var c0 = 0u; c0 < n; c0 += WORKGROUP_X) {
        let i = c0 + lid;
        var f = 0.0;
        if (i < n) {
            f = exp(partial[base + i * stride] - row_max);
        }
        factors[lid] = f;
        workgroupBarrier();
        let count = min(WORKGROUP_X, n - c0);
        for (var c = 0u; c < count; c++) {
            let rec = base + (c0 + c) * stride + 2u;          // the record's acc[0]
            let fc = factors[c];
            total += fc * partial[rec - 1u];
            if (lid < D) {
                acc0 += fc * partial[rec + lid];
            }
            if (lid + WORKGROUP_X < D) {
                acc1 += fc * partial[rec + lid + WORKGROUP_X];
            }
            if (lid + 2u * WORKGROUP_X < D) {
                acc2 += fc * partial[rec + lid + 2u * WORKGROUP_X];
            }
            if (lid + 3u * WORKGROUP_X < D) {
                acc3 += fc * partial[rec + lid + 3u * WORKGROUP_X];
            }
        }
        workgroupBarrier();
    }

    let o = row * D;
    if (lid < D) {
        out[o + lid] = acc0 / total;
    }
    if (lid + WORKGROUP_X < D) {
        out[o + lid + WORKGROUP_X] = acc1 / total;
    }
    if (lid + 2u * WORKGROUP_X < D) {
        out[o + lid + 2u * WORKGROUP_X] = acc2 / total;
    }
    if (lid + 3u * WORKGROUP_X < D) {
        out[o + lid + 3u * WORKGROUP_X] = acc3 / total;
    }
}
