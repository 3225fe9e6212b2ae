// out[o] = op(a[ia], b[ib]) for every index of an iteration shape d0..d5 (leading dims of
// size 1 pad lower ranks). Each operand has its own offset and strides in elements
// (registry.ELEMENTWISE_PARAMS), so one kernel does broadcasting arithmetic, permutes,
// slices, cats (one dispatch per part) and writes into a cache at a row offset.

fn gelu_erf(x: f32) -> f32 {
    // erf by Abramowitz-Stegun 7.1.26 is 1.5e-7 absolute: within the 1e-4 bar.
    let z = abs(x) * 0.70710678118654752;
    let t = 1.0 / (1.0 + 0.3275911 * z);
    let poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    let erf_abs = 1.0 - poly * exp(-z * z);
    let erf_x = select(-erf_abs, erf_abs, x >= 0.0);
    return 0.5 * x * (1.0 + erf_x);
}

// torch.pow. WGSL's pow(x, y) is undefined for x < 0 (in practice NaN), but x.pow(2) of a signed
// activation is common: a negative base with an integer exponent is |x|^y, negated for an odd y.
// A negative base with a fractional exponent stays pow's NaN, as torch's is.
fn pow_torch(x: f32, y: f32) -> f32 {
    if (y == 2.0) {
        return x * x;   // the common case, exactly
    }
    if (y == 0.0) {
        return 1.0;     // x^0 = 1 for every x, 0 included (pow(0, 0) is undefined)
    }
    if (x >= 0.0 || y != trunc(y)) {
        return pow(x, y);
    }
    let magnitude = pow(-x, y);
    let odd = y - 2.0 * floor(0.5 * y) != 0.0;   // exact for every integer y
    return select(magnitude, -magnitude, odd);
}

fn apply(op: u32, x: f32, y: f32) -> f32 {
    switch op {
        case OP_ADD: { return x + y; }
        case OP_SUB: { return x - y; }
        case OP_MUL: { return x * y; }
        case OP_DIV: { return x / y; }
        case OP_POW: { return pow_torch(x, y); }
        case OP_MAX: { return max(x, y); }
        case OP_MIN: { return min(x, y); }
        case OP_SILU_MUL: { return x / (1.0 + exp(-x)) * y; }
        case OP_COPY: { return x; }
        case OP_NEG: { return -x; }
        case OP_RSQRT: { return inverseSqrt(x); }
        case OP_SQRT: { return sqrt(x); }
        case OP_EXP: { return exp(x); }
        case OP_SIGMOID: { return 1.0 / (1.0 + exp(-x)); }
        case OP_SILU: { return x / (1.0 + exp(-x)); }
        case OP_TANH: { return tanh(x); }
        case OP_GELU_ERF: { return gelu_erf(x); }
        case OP_GELU_TANH: {
            let inner = 0.79788456080286536 * (x + 0.044715 * x * x * x);
            return 0.5 * x * (1.0 + tanh(inner));
        }
        case OP_RECIPROCAL: { return 1.0 / x; }
        case OP_ABS: { return abs(x); }
        case OP_LOG: { return log(x); }
        case OP_COS: { return cos(x); }
        case OP_SIN: { return sin(x); }
        case OP_RELU: { return max(x, 0.0); }
        default: { return x; }
    }
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
    var io = params.out_off;
    for (var k = 0u; k < RANK; k++) {
        let dim = RANK - 1u - k;      // innermost first
        let size = d_at(dim);
        let idx = rest % size;
        rest = rest / size;
        ia += idx * sa_at(dim);
        ib += idx * sb_at(dim);
        io += idx * so_at(dim);
    }
    var y = 0.0;
    if (params.op < OP_COPY) {
        y = select(b[ib], param_f32(params.scalar_bits), params.b_is_scalar != 0u);
    }
    out[io] = apply(params.op, a[ia], y);
}
