// One workgroup per row r of a contiguous [rows][n] input `a` (rows over grid x, then y):
//   REDUCE_SUM / REDUCE_MEAN / REDUCE_MAX: out[r] = the row's sum / mean / max;
//   ROWS_SOFTMAX: out[r][:] = softmax(a[r][:]);
//   ROWS_RMS_NORM: out[r][:] = a[r][:] * rsqrt(mean(a[r]^2) + eps), times w[:] when has_w;
//   ROWS_LAYER_NORM: (a[r][:] - mean) * rsqrt(var + eps), then * w[0:n] + w[n:2n] when has_w;
//   ROWS_ADD_RMS_NORM: sum[r][:] = a[r][:] + b[r][:] (a residual add) and out[r][:] = ROWS_RMS_NORM of
//     that sum: one dispatch where the add and the norm took two, and the sum is read once.

var<workgroup> partial: array<f32, WORKGROUP_X>;

// The workgroup's reduction (sum, or max when take_max) of each invocation's value; every
// invocation gets the result.
fn workgroup_reduce(lid: u32, value: f32, take_max: bool) -> f32 {
    partial[lid] = value;
    workgroupBarrier();
    for (var half = WORKGROUP_X / 2u; half > 0u; half = half / 2u) {
        if (lid < half) {
            let other = partial[lid + half];
            partial[lid] = select(partial[lid] + other, max(partial[lid], other), take_max);
        }
        workgroupBarrier();
    }
    let result = partial[0];
    workgroupBarrier();   // partial is reused by the next reduction
    return result;
}

@compute @workgroup_size(WORKGROUP_X, WORKGROUP_Y, WORKGROUP_Z)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>,
        @builtin(num_workgroups) groups: vec3<u32>) {
    let row = wid.x + wid.y * groups.x;
    if (row >= params.rows) {   // uniform per workgroup: the whole group returns together
        return;
    }
    let lid = lid3.x;
    let n = params.n;
    let base = row * n;
    let op = params.op;
    if (op == REDUCE_MAX || op == ROWS_SOFTMAX) {
        var m = -3.4028234663852886e38;
        for (var i = lid; i < n; i += WORKGROUP_X) {
            m = max(m, a[base + i]);
        }
        m = workgroup_reduce(lid, m, true);
        if (op == REDUCE_MAX) {
            if (lid == 0u) { out[row] = m; }
            return;
        }
        var s = 0.0;
        for (var i = lid; i < n; i += WORKGROUP_X) {
            s += exp(a[base + i] - m);
        }
        s = workgroup_reduce(lid, s, false);
        for (var i = lid; i < n; i += WORKGROUP_X) {
            out[base + i] = exp(a[base + i] - m) / s;
        }
        return;
    }
    if (op == ROWS_ADD_RMS_NORM) {
        var sq = 0.0;
        for (var i = lid; i < n; i += WORKGROUP_X) {
            let x = a[base + i] + b[base + i];
            sum[base + i] = x;
            sq += x * x;
        }
        let inv = inverseSqrt(workgroup_reduce(lid, sq, false) / f32(n) + param_f32(params.eps_bits));
        for (var i = lid; i < n; i += WORKGROUP_X) {
            let w_i = select(1.0, w[i], params.has_w != 0u);
            out[base + i] = sum[base + i] * inv * w_i;   // this invocation's own write above
        }
        return;
    }
    var s = 0.0;
    for (var i = lid; i < n; i += WORKGROUP_X) {
        s += a[base + i];
    }
    s = workgroup_reduce(lid, s, false);
    let mean = s / f32(n);
    if (op == REDUCE_SUM || op == REDUCE_MEAN) {
        if (lid == 0u) { out[row] = select(mean, s, op == REDUCE_SUM); }
        return;
    }
    let eps = param_f32(params.eps_bits);
    if (op == ROWS_RMS_NORM) {
        var sq = 0.0;
        for (var i = lid; i < n; i += WORKGROUP_X) {
            let x = a[base + i];
            sq += x * x;
        }
        let inv = inverseSqrt(workgroup_reduce(lid, sq, false) / f32(n) + eps);
        for (var i = lid; i < n; i += WORKGROUP_X) {
            let w_i = select(1.0, w[i], params.has_w != 0u);
            out[base + i] = a[base + i] * inv * w_i;
        }
        return;
    }
    // ROWS_LAYER_NORM: the variance from centred values (two passes over the row, as torch does).
    var var_sum = 0.0;
    for (var i = lid; i < n; i += WORKGROUP_X) {
        let c = a[base + i] - mean;
        var_sum += c * c;
    }
    let inv = inverseSqrt(workgroup_reduce(lid, var_sum, false) / f32(n) + eps);
    for (var i = lid; i < n; i += WORKGROUP_X) {
        var y = (a[base + i] - mean) * inv;
        if (params.has_w != 0u) {
            y = y * w[i] + w[n + i];
        }
        out[base + i] = y;
    }
}
