// Batched matmul of two fp32 graph tensors (activation x activation: Q . K^T, P . V):
//   out[t][m][n] = sum_k a[a_off + t*sa_b + m*sa_m + k*sa_k] * b[b_off + t*sb_b + k*sb_k + n*sb_n]
// out is contiguous [batch][M][N]; each operand is read through its own offset and strides
// (a broadcast batch has stride 0). One workgroup per TILE x TILE block of out (grid x over N,
// y over M, z over the batch), one output per invocation; a and b are staged TILE x TILE in
// workgroup memory per step of K, zero past the edges, so every M, N and K is exact.

const TILE: u32 = WORKGROUP_X;   // the workgroup is TILE x TILE (its registry entry: 16 x 16)

var<workgroup> a_tile: array<f32, TILE * TILE>;          // [m][k]
var<workgroup> b_tile: array<f32, TILE * (TILE + 1u)>;   // [k][n], rows padded

@compute @workgroup_size(WORKGROUP_X, WORKGROUP_Y, WORKGROUP_Z)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let col = wid.x * TILE + lid.x;
    let row = wid.y * TILE + lid.y;
    let t = wid.z;
    let a_base = params.a_off + t * params.sa_b;
    let b_base = params.b_off + t * params.sb_b;
    var acc = 0.0;
    for (var k0 = 0u; k0 < params.K; k0 += TILE) {
        let ka = k0 + lid.x;
        var av = 0.0;
        if (row < params.M && ka < params.K) {
            av = a[a_base + row * params.sa_m + ka * params.sa_k];
        }
        a_tile[lid.y * TILE + lid.x] = av;
        let kb = k0 + lid.y;
        var bv = 0.0;
        if (kb < params.K && col < params.N) {
            bv = b[b_base + kb * params.sb_k + col * params.sb_n];
        }
        b_tile[lid.y * (TILE + 1u) + lid.x] = bv;
        workgroupBarrier();
        for (var k = 0u; k < TILE; k++) {
            acc += a_tile[lid.y * TILE + k] * b_tile[k * (TILE + 1u) + lid.x];
        }
        workgroupBarrier();
    }
    if (row < params.M && col < params.N) {
        out[(t * params.M + row) * params.N + col] = acc;
    }
}
