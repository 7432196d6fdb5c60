//! Elementwise activations.

use ndarray::ArrayD;

/// `max(x, 0)` with NaN propagating (`torch.relu(nan) == nan`).
#[inline]
pub fn relu_scalar(v: f32) -> f32 {
    if v > 0.0 || v.is_nan() {
        v
    } else {
        0.0
    }
}

/// `clamp(x, lo, hi)` with NaN propagating (as `torch.clamp`).
#[inline]
pub fn clamp_scalar(v: f32, lo: f32, hi: f32) -> f32 {
    if v < lo {
        lo
    } else if v > hi {
        hi
    } else {
        v
    }
}

/// `torch.relu`: NaN stays NaN.
pub fn relu(x: &ArrayD<f32>) -> ArrayD<f32> {
    x.mapv(relu_scalar)
}

/// `torch.clamp(x, min, max)`: NaN stays NaN.
pub fn clamp(x: &ArrayD<f32>, min: f32, max: f32) -> ArrayD<f32> {
    x.mapv(|v| clamp_scalar(v, min, max))
}

/// `torch.nn.functional.hardsigmoid`: `min(max(x + 3, 0), 6) / 6`.
pub fn hardsigmoid(x: &ArrayD<f32>) -> ArrayD<f32> {
    x.mapv(|v| clamp_scalar(v + 3.0, 0.0, 6.0) / 6.0)
}

/// `torch.nn.functional.hardswish`: `x * min(max(x + 3, 0), 6) / 6`.
pub fn hardswish(x: &ArrayD<f32>) -> ArrayD<f32> {
    x.mapv(|v| v * clamp_scalar(v + 3.0, 0.0, 6.0) / 6.0)
}

/// `torch.sigmoid`: `1 / (1 + exp(-x))`.
pub fn sigmoid(x: &ArrayD<f32>) -> ArrayD<f32> {
    x.mapv(|v| 1.0 / (1.0 + (-v).exp()))
}

/// `torch.nn.functional.silu`: `x / (1 + exp(-x))`.
pub fn silu(x: &ArrayD<f32>) -> ArrayD<f32> {
    x.mapv(|v| v / (1.0 + (-v).exp()))
}

/// The error function in `f64` (absolute error below `1e-13`): Taylor series for
/// `|x| < 3`, a continued fraction for `erfc` beyond.
pub fn erf(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    let a = x.abs();
    let r = if a < 3.0 {
        // erf(x) = 2/sqrt(pi) * sum_n (-1)^n x^(2n+1) / (n! (2n+1))
        let x2 = a * a;
        let mut term = a;
        let mut sum = a;
        // At |x| < 3 the terms are below 1e-17 of the sum by n = 60.
        for n in 1..=80 {
            let n = n as f64;
            term *= -x2 / n;
            let t = term / (2.0 * n + 1.0);
            sum += t;
            if t.abs() <= 1e-17 * sum.abs() {
                break;
            }
        }
        sum * std::f64::consts::FRAC_2_SQRT_PI
    } else if a < 27.0 {
        // erfc(a) = exp(-a^2)/sqrt(pi) / (a + (1/2)/(a + 1/(a + (3/2)/(a + 2/(a + ...)))))
        let mut f = a;
        for k in (1..=60).rev() {
            f = a + (k as f64 / 2.0) / f;
        }
        1.0 - (-a * a).exp() / (f * std::f64::consts::PI.sqrt())
    } else {
        1.0
    };
    r.copysign(x)
}

/// `torch.nn.functional.gelu`: `x/2 (1 + erf(x / sqrt 2))`, or with `tanh` the
/// approximation `x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
pub fn gelu(x: &ArrayD<f32>, tanh: bool) -> ArrayD<f32> {
    if tanh {
        let k = (2.0f32 / std::f32::consts::PI).sqrt();
        x.mapv(|v| 0.5 * v * (1.0 + (k * (v + 0.044715 * v * v * v)).tanh()))
    } else {
        x.mapv(|v| {
            let e = erf(v as f64 * std::f64::consts::FRAC_1_SQRT_2) as f32;
            v * 0.5 * (1.0 + e)
        })
    }
}
