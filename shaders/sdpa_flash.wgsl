// Prefill attention (custom_sdpa at S > 1, D <= MAX_D = 128), FlashAttention-2 tiling. Same
// semantics, Params and bindings as sdpa.wgsl (see its header): q and out are [B][S][Hq][D], k and v
// the whole caches [B][C][Hkv][D]; query head h reads cache head h / G (G = Hq / Hkv); query s sees
// keys j <= start_pos + s when causal, j < start_pos + S otherwise, and j < C.
//
// Rows. The G query heads of one cache head attend over the same keys, so a workgroup takes ROWS
// rows of the (position, head of the group) rows of one cache head and batch: row f < S x G is
// query (s = f / G, h = kvh x G + f % G) -- G adjacent heads of a position are adjacent in q and
// out. Grid (Hkv, ceil(S x G / ROWS), B); workgroup (kvh, y, b) takes tile ceil(S x G / ROWS) - 1 - y:
// GPUs start workgroups x fastest, so the tiles of the last positions, which see the most keys when
// causal, start first, for every cache head, and the shortest ones make the tail.
//
// Keys. A tile goes over the keys its last row sees (n_tile) by tiles of KEYS; nothing past them is
// read. Per key tile, with thread (r = lid % ROWS, g = lid / ROWS):
//   1. scores: q (times scale) and k go through workgroup memory CHUNK_QUADS x 4 dims at a time,
//      q as [CHUNK_QUADS][ROWS] vec4 (consecutive rows: conflict-free reads), k as
//      [KEYS][CHUNK_QUADS] vec4 (read by a whole warp at one address); thread (r, g) keeps the
//      scores of row r against keys g x 16 .. g x 16 + 15 in four vec4 registers;
//   2. online softmax per row: scores the row does not see become LOWEST, the tile's row max is
//      taken over the KEY_GROUPS threads of the row (workgroup memory), then m, the rescale factor
//      of the row's accumulators, and its weights exp(score - m) (0 where the row does not see
//      the key), which go to `probs` [KEYS][ROWS]; each thread keeps the sum of its own weights
//      (the row's sum is added up at the end: the threads of a row share m);
//   3. out += weights x v: v goes through workgroup memory by chunks of keys as [keys][16 or 32]
//      vec4 (D <= 64: 16 quads a key; else 32); thread (r, g) accumulates row r's output quads
//      g, g + 4, g + 8, ... (4 of them when D <= 64, else 8) in vec4 registers.
// No per-invocation state is an array (arrays indexed in loops go to local memory on GPUs). Each
// store to `stage` is a whole vec4 of one invocation (four loads of q, k or v; zeros past D and
// past the visible keys): a store to one component of a vector in memory may rewrite all of it.
//
// Workgroup memory (16 KiB, WebGPU's default limit): `stage`, STAGE_VEC4 vec4 (8 KiB: the q and k
// chunks and one vec4 per invocation for the row maxima and sums, then the v chunks), and `probs`,
// KEYS x ROWS floats (8 KiB). The registry checks the constants against these layouts.

const KEYS_PER_GROUP: u32 = KEYS / KEY_GROUPS;            // 16: a thread's scores, four vec4
const CHUNK_DIMS: u32 = 4u * CHUNK_QUADS;                 // dims of q and k staged at a time
const K_BASE: u32 = ROWS * CHUNK_QUADS;                   // the staged keys, after the q quads
const RED_BASE: u32 = K_BASE + KEYS * CHUNK_QUADS;        // one vec4 per invocation: row maxima, sums
const NARROW_QUADS: u32 = 4u * KEY_GROUPS;                // quads a staged v row holds when D <= 64
const LOWEST: f32 = -3.4028234663852886e38;

var<workgroup> stage: array<vec4<f32>, STAGE_VEC4>;
var<workgroup> probs: array<f32, KEYS * ROWS>;            // probs[j x ROWS + r]: row r's weight of key j0 + j

// The per-invocation slot of thread (r, g) (lid = g x ROWS + r) for the row max and sum exchange.
fn red_put(lid: u32, x: f32) {
    stage[RED_BASE + lid] = vec4<f32>(x);
}

fn red_get(g: u32, r: u32) -> f32 {
    return stage[RED_BASE + g * ROWS + r].x;
}

// First element of q (and out) of tile row f: (s, h) = (f / G, kvh x G + f % G).
fn row_start(b: u32, f: u32, G: u32, kvh: u32) -> u32 {
    return ((b * params.S + f / G) * params.Hq + kvh * G + f % G) * params.D;
}

// Dims d .. d + 3 below D; and q[at + d .. at + d + 3] with zeros past D (loads clamped to dim D - 1,
// so a row is never read past its end), and the same of k and v.
fn quad_in(d: u32) -> vec4<bool> {
    return vec4<u32>(d, d + 1u, d + 2u, d + 3u) < vec4<u32>(params.D);
}

fn q_quad(at: u32, d: u32) -> vec4<f32> {
    let e = at + params.D - 1u;
    return select(vec4<f32>(), vec4<f32>(q[min(at + d, e)], q[min(at + d + 1u, e)], q[min(at + d + 2u, e)],
                                         q[min(at + d + 3u, e)]), quad_in(d));
}

fn k_quad(at: u32, d: u32) -> vec4<f32> {
    let e = at + params.D - 1u;
    return select(vec4<f32>(), vec4<f32>(k[min(at + d, e)], k[min(at + d + 1u, e)], k[min(at + d + 2u, e)],
                                         k[min(at + d + 3u, e)]), quad_in(d));
}

fn v_quad(at: u32, d: u32) -> vec4<f32> {
    let e = at + params.D - 1u;
    return select(vec4<f32>(), vec4<f32>(v[min(at + d, e)], v[min(at + d + 1u, e)], v[min(at + d + 2u, e)],
                                         v[min(at + d + 3u, e)]), quad_in(d));
}

// q4 . (4 staged keys from vec4 `at`, one every CHUNK_QUADS vec4).
fn dots4(q4: vec4<f32>, at: u32) -> vec4<f32> {
    return vec4<f32>(dot(q4, stage[at]), dot(q4, stage[at + CHUNK_QUADS]), dot(q4, stage[at + 2u * CHUNK_QUADS]),
                     dot(q4, stage[at + 3u * CHUNK_QUADS]));
}

// sum over c < 4 of p[c] x (staged v quad at `at` + c x stride).
fn pv4(p: vec4<f32>, at: u32, stride: u32) -> vec4<f32> {
    return (p.x * stage[at] + p.y * stage[at + stride]) + (p.z * stage[at + 2u * stride] + p.w * stage[at + 3u * stride]);
}

// Row r's weights of keys j .. j + 3 of the tile.
fn probs4(j: u32, r: u32) -> vec4<f32> {
    return vec4<f32>(probs[j * ROWS + r], probs[(j + 1u) * ROWS + r], probs[(j + 2u) * ROWS + r],
                     probs[(j + 3u) * ROWS + r]);
}

fn put_probs4(j: u32, r: u32, p: vec4<f32>) {
    probs[j * ROWS + r] = p.x;
    probs[(j + 1u) * ROWS + r] = p.y;
    probs[(j + 2u) * ROWS + r] = p.z;
    probs[(j + 3u) * ROWS + r] = p.w;
}

// out[start + 4 x quad + c] = y[c] for the dims below D.
fn store_quad(start: u32, quad: u32, y: vec4<f32>) {
    let d = 4u * quad;
    if (d < params.D) {
        out[start + d] = y.x;
    }
    if (d + 1u < params.D) {
        out[start + d + 1u] = y.y;
    }
    if (d + 2u < params.D) {
        out[start + d + 2u] = y.z;
    }
    if (d + 3u < params.D) {
        out[start + d + 3u] = y.w;
    }
}

@compute @workgroup_size(WORKGROUP_X, WORKGROUP_Y, WORKGROUP_Z)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let lid = lid3.x;
    let r = lid % ROWS;             // this thread's row of the tile
    let g = lid / ROWS;             // its key group: keys g x 16 .. g x 16 + 15; output quads g + 4i
    let D = params.D;
    let G = params.Hq / params.Hkv;
    let n_flat = params.S * G;      // rows of one cache head and batch
    let n_tiles = (n_flat + ROWS - 1u) / ROWS;
    if (wid.y >= n_tiles) {
        return;
    }
    let tile = n_tiles - 1u - wid.y;
    let kvh = wid.x;
    let b = wid.z;
    let f0 = tile * ROWS;           // the tile's first row
    let visible = min(params.start_pos + params.S, params.C);
    var n_tile = visible;           // keys the tile's last row sees (uniform: the key loop's bound)
    var n_row = visible;            // keys row r sees
    if (params.causal != 0u) {
        n_tile = min(params.start_pos + (min(f0 + ROWS, n_flat) - 1u) / G + 1u, params.C);
        n_row = min(params.start_pos + min(f0 + r, n_flat - 1u) / G + 1u, params.C);
    }
    let key_stride = params.Hkv * D;                          // elements from key j to key j + 1
    let kv_base = (b * params.C * params.Hkv + kvh) * D;      // key 0 of this cache head
    let scale = param_f32(params.scale_bits);
    let nq = (D + 3u) / 4u;
    let v_quads = select(2u * NARROW_QUADS, NARROW_QUADS, nq <= NARROW_QUADS);   // quads a staged v row holds
    let v_shift = select(5u, 4u, nq <= NARROW_QUADS);         // log2(v_quads)
    let chunk_keys = STAGE_VEC4 / v_quads;                    // keys of v per chunk

    // The q quad this thread stages per chunk (ROWS x CHUNK_QUADS = WORKGROUP_X): row r's quad g (a row
    // past the tile's last stages zeros).
    let q_at = row_start(b, min(f0 + r, n_flat - 1u), G, kvh);
    let q_ok = f0 + r < n_flat;

    var m = LOWEST;                 // row r's running max
    var l = 0.0;                    // sum of this thread's weights, in terms of m
    var o0 = vec4<f32>();           // row r's output quads g, g + 4, ..., g + 28 (o4..o7: D > 64)
    var o1 = vec4<f32>();
    var o2 = vec4<f32>();
    var o3 = vec4<f32>();
    var o4 = vec4<f32>();
    var o5 = vec4<f32>();
    var o6 = vec4<f32>();
    var o7 = vec4<f32>();
    for (var j0 = 0u; j0 < n_tile; j0 += KEYS) {
        // 1. Scores of row r against keys kj .. kj + 15.
        let kj = j0 + g * KEYS_PER_GROUP;
        var sc0 = vec4<f32>();
        var sc1 = vec4<f32>();
        var sc2 = vec4<f32>();
        var sc3 = vec4<f32>();
        for (var d0 = 0u; d0 < D; d0 += CHUNK_DIMS) {
            workgroupBarrier();     // the previous chunk's (or tile's) readers are done
            var qx = vec4<f32>();
            if (q_ok) {
                qx = q_quad(q_at, d0 + 4u * g) * scale;
            }
            stage[lid] = qx;                                  // [CHUNK_QUADS][ROWS]: quad g of row r
            for (var e = lid; e < KEYS * CHUNK_QUADS; e += WORKGROUP_X) {   // [KEYS][CHUNK_QUADS]
                let j = j0 + e / CHUNK_QUADS;
                var x = vec4<f32>();
                if (j < n_tile) {
                    x = k_quad(kv_base + j * key_stride, d0 + 4u * (e % CHUNK_QUADS));
                }
                stage[K_BASE + e] = x;
            }
            workgroupBarrier();
            if (kj < n_tile) {
                for (var dq = 0u; dq < CHUNK_QUADS; dq++) {
                    let q4 = stage[dq * ROWS + r];
                    let at = K_BASE + g * KEYS_PER_GROUP * CHUNK_QUADS + dq;
                    sc0 += dots4(q4, at);
                    sc1 += dots4(q4, at + 4u * CHUNK_QUADS);
                    sc2 += dots4(q4, at + 8u * CHUNK_QUADS);
                    sc3 += dots4(q4, at + 12u * CHUNK_QUADS);
                }
            }
        }

        // 2. Online softmax: the tile's max of row r over its KEY_GROUPS threads, then the weights.
        let nr = vec4<u32>(n_row);
        let j4 = vec4<u32>(kj, kj + 1u, kj + 2u, kj + 3u);
        let in0 = j4 < nr;
        let in1 = j4 + vec4<u32>(4u) < nr;
        let in2 = j4 + vec4<u32>(8u) < nr;
        let in3 = j4 + vec4<u32>(12u) < nr;
        let low = vec4<f32>(LOWEST);
        let mx = max(max(select(low, sc0, in0), select(low, sc1, in1)), max(select(low, sc2, in2), select(low, sc3, in3)));
        red_put(lid, max(max(mx.x, mx.y), max(mx.z, mx.w)));
        workgroupBarrier();
        var tile_max = red_get(0u, r);
        for (var gg = 1u; gg < KEY_GROUPS; gg++) {
            tile_max = max(tile_max, red_get(gg, r));
        }
        let m_new = max(m, tile_max);  // finite from the first tile on: every row sees key 0
        let correction = exp(m - m_new);
        m = m_new;
        let mv = vec4<f32>(m_new);
        let zero = vec4<f32>();
        let p0 = select(zero, exp(sc0 - mv), in0);
        let p1 = select(zero, exp(sc1 - mv), in1);
        let p2 = select(zero, exp(sc2 - mv), in2);
        let p3 = select(zero, exp(sc3 - mv), in3);
        l = l * correction + dot((p0 + p1) + (p2 + p3), vec4<f32>(1.0));
        let jl = g * KEYS_PER_GROUP;
        put_probs4(jl, r, p0);
        put_probs4(jl + 4u, r, p1);
        put_probs4(jl + 8u, r, p2);
        put_probs4(jl + 12u, r, p3);
        o0 *= correction;
        o1 *= correction;
        o2 *= correction;
        o3 *= correction;
        o4 *= correction;
        o5 *= correction;
        o6 *= correction;
        o7 *= correction;

        // 3. out += weights x v, by chunks of chunk_keys keys. Keys past n_tile weigh 0 and are
        // staged as 0, so a chunk is taken 4 keys at a time past its last visible key.
        let tile_keys = min(KEYS, n_tile - j0);
        for (var c0 = 0u; c0 < tile_keys; c0 += chunk_keys) {
            workgroupBarrier();     // every weight is written; the stage's readers are done
            for (var e = lid; e < STAGE_VEC4; e += WORKGROUP_X) {          // [chunk_keys][v_quads]
                let j = j0 + c0 + (e >> v_shift);
                var x = vec4<f32>();
                if (j < n_tile) {
                    x = v_quad(kv_base + j * key_stride, 4u * (e & (v_quads - 1u)));
                }
                stage[e] = x;
            }
            workgroupBarrier();
            let n_here = min(chunk_keys, tile_keys - c0);
            if (v_quads == NARROW_QUADS) {
                for (var jj = 0u; jj < n_here; jj += 4u) {
                    let p = probs4(c0 + jj, r);
                    let at = jj * NARROW_QUADS + g;
                    o0 += pv4(p, at, NARROW_QUADS);
                    o1 += pv4(p, at + KEY_GROUPS, NARROW_QUADS);
                    o2 += pv4(p, at + 2u * KEY_GROUPS, NARROW_QUADS);
                    o3 += pv4(p, at + 3u * KEY_GROUPS, NARROW_QUADS);
                }
            } else {
                for (var jj = 0u; jj < n_here; jj += 4u) {
                    let p = probs4(c0 + jj, r);
                    let at = jj * 2u * NARROW_QUADS + g;
                    o0 += pv4(p, at, 2u * NARROW_QUADS);
                    o1 += pv4(p, at + KEY_GROUPS, 2u * NARROW_QUADS);
                    o2 += pv4(p, at + 2u * KEY_GROUPS, 2u * NARROW_QUADS);
                    o3 += pv4(p, at + 3u * KEY_GROUPS, 2u * NARROW_QUADS);
                    o4 += pv4(p, at + 4u * KEY_GROUPS, 2u * NARROW_QUADS);
                    o5 += pv4(p, at + 5u * KEY_GROUPS, 2u * NARROW_QUADS);
                    o6 += pv4(p, at + 6u * KEY_GROUPS, 2u * NARROW_QUADS);
                    o7 += pv4(p, at + 7u * KEY_GROUPS, 2u * NARROW_QUADS);
                }
            }
        }
    }

    // The row's sum over its KEY_GROUPS threads; out = accumulators / sum.
    workgroupBarrier();
    red_put(lid, l);
    workgroupBarrier();
    var total = red_get(0u, r);
    for (var gg = 1u; gg < KEY_GROUPS; gg++) {
        total += red_get(gg, r);
    }
    if (f0 + r < n_flat) {
        let start = row_start(b, f0 + r, G, kvh);
        let inv = 1.0 / total;
        store_quad(start, g, o0 * inv);
        store_quad(start, g + KEY_GROUPS, o1 * inv);
        store_quad(start, g + 2u * KEY_GROUPS, o2 * inv);
        store_quad(start, g + 3u * KEY_GROUPS, o3 * inv);
        store_quad(start, g + 4u * KEY_GROUPS, o4 * inv);
        store_quad(start, g + 5u * KEY_GROUPS, o5 * inv);
        store_quad(start, g + 6u * KEY_GROUPS, o6 * inv);
        store_quad(start, g + 7u * KEY_GROUPS, o7 * inv);
    }
}
