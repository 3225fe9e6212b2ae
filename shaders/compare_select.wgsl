// Comparisons, logic, casts, where, fill and arange: out[o] = f(a[ia], b[ib], c[ic]) for every
// index of an iteration shape d0..d5 (leading dims of size 1 pad lower ranks), each operand
// through its own offset and strides in elements (as elementwise.wgsl: broadcast dims stride 0).
// The graph holds booleans as 1.0 / 0.0 and integers as their exact f32 values
// (backend/graph/ops_transformer.py); an integer input of the delegate is i32 in its buffer.
//   SEL_EQ .. SEL_GE        a <op> y -> 1.0 / 0.0, y = b, or the f32 `scalar` when b_is_scalar = 1
//   SEL_AND, SEL_OR, SEL_XOR (a != 0) <op> (y != 0)
//   SEL_NOT                 a == 0
//   SEL_TO_BOOL             a != 0
//   SEL_FROM_I32            f32(a read as i32)
//   SEL_I32_TO_BOOL         (a read as i32) != 0
//   SEL_TRUNC               trunc(a): a float to an integer type
//   SEL_WHERE               c != 0 ? a : b
//   SEL_FILL                scalar (no operand is read)
//   SEL_ARANGE              scalar + step * (flat index) (no operand is read)
// An operand the op does not use is never read. a, b, c, out are declared u32 (an i32 input is
// read as its bits; where and copies move words untouched); arithmetic bitcasts to f32.

fn as_f32(x: bool) -> f32 {
    return select(0.0, 1.0, x);
}

@compute @workgroup_size(WORKGROUP_X, WORKGROUP_Y, WORKGROUP_Z)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let flat = flat_index(gid, groups);
    if (flat >= params.n) {
        return;
    }
    var rest = flat;
    var ia = params.a_off;
    var ib = params.b_off;
    var ic = params.c_off;
    var io = params.out_off;
    for (var k = 0u; k < RANK; k++) {
        let dim = RANK - 1u - k;      // innermost first
        let size = d_at(dim);
        let idx = rest % size;
        rest = rest / size;
        ia += idx * sa_at(dim);
        ib += idx * sb_at(dim);
        ic += idx * sc_at(dim);
        io += idx * so_at(dim);
    }
    let op = params.op;
    let scalar = param_f32(params.scalar_bits);
    if (op == SEL_FILL) {
        out[io] = bitcast<u32>(scalar);
        return;
    }
    if (op == SEL_ARANGE) {
        out[io] = bitcast<u32>(scalar + param_f32(params.step_bits) * f32(flat));
        return;
    }
    if (op == SEL_WHERE) {
        out[io] = select(b[ib], a[ia], bitcast<f32>(c[ic]) != 0.0);
        return;
    }
    let x = bitcast<f32>(a[ia]);
    var y = 0.0;
    if (op < SEL_NOT) {   // binary
        if (params.b_is_scalar != 0u) {
            y = scalar;
        } else {
            y = bitcast<f32>(b[ib]);
        }
    }
    var r = 0.0;
    switch op {
        case SEL_EQ: { r = as_f32(x == y); }
        case SEL_NE: { r = as_f32(x != y); }
        case SEL_LT: { r = as_f32(x < y); }
        case SEL_LE: { r = as_f32(x <= y); }
        case SEL_GT: { r = as_f32(x > y); }
        case SEL_GE: { r = as_f32(x >= y); }
        case SEL_AND: { r = as_f32(x != 0.0 && y != 0.0); }
        case SEL_OR: { r = as_f32(x != 0.0 || y != 0.0); }
        case SEL_XOR: { r = as_f32((x != 0.0) != (y != 0.0)); }
        case SEL_NOT: { r = as_f32(x == 0.0); }
        case SEL_TO_BOOL: { r = as_f32(x != 0.0); }
        case SEL_FROM_I32: { r = f32(bitcast<i32>(a[ia])); }
        case SEL_I32_TO_BOOL: { r = as_f32(bitcast<i32>(a[ia]) != 0); }
        case SEL_TRUNC: { r = trunc(x); }
        default: { r = x; }
    }
    out[io] = bitcast<u32>(r);
}
