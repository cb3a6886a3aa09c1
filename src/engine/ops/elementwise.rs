//! Elementwise ops: add, sub, mul, scale, affine, relu, relu6, sign, clamp, square, and their
//! backward passes, on both devices. GPU: `shaders/elementwise.wgsl`.

use crate::engine::cpu;
use crate::engine::error::{shape_err, Result};
use crate::engine::gpu::{groups_for, to_u32, Kernel, OpCodes};
use crate::engine::launch::Launch;
use crate::engine::tape::Backward;
use crate::engine::tensor::Tensor;
use crate::{kernel, kernel_params};

const UNARY: Kernel = kernel!("elementwise.wgsl", "unary", [Read, Read, ReadWrite]);
const BINARY: Kernel = kernel!("elementwise.wgsl", "binary", [Read, Read, ReadWrite]);

kernel_params! {
    pub struct ElementwiseParams for ["elementwise.wgsl"] {
        n: u32,
        /// A [`Unary`] or [`Binary`] op code.
        op: u32,
        a: f32,
        b: f32,
    }
}

/// Unary operations.
#[derive(Clone, Copy, Debug)]
pub enum Unary {
    /// a * x + b
    Affine(f32, f32),
    Relu,
    Relu6,
    Sign,
    Clamp(f32, f32),
    Square,
}

/// The unary op codes: the shader's `UNARY_*` constants and the cases of its `unary_op`
/// switch.
pub const UNARY_CODES: OpCodes = OpCodes {
    file: "elementwise.wgsl",
    prefix: "UNARY_",
    switch_fn: Some("unary_op"),
    codes: &[
        ("AFFINE", 0),
        ("RELU", 1),
        ("RELU6", 2),
        ("SIGN", 3),
        ("CLAMP", 4),
        ("SQUARE", 5),
    ],
};

impl Unary {
    /// The op code (an entry of [`UNARY_CODES`]) and the two scalar arguments.
    fn code(self) -> (u32, f32, f32) {
        match self {
            Unary::Affine(a, b) => (const { UNARY_CODES.code("AFFINE") }, a, b),
            Unary::Relu => (const { UNARY_CODES.code("RELU") }, 0.0, 0.0),
            Unary::Relu6 => (const { UNARY_CODES.code("RELU6") }, 0.0, 0.0),
            Unary::Sign => (const { UNARY_CODES.code("SIGN") }, 0.0, 0.0),
            Unary::Clamp(lo, hi) => (const { UNARY_CODES.code("CLAMP") }, lo, hi),
            Unary::Square => (const { UNARY_CODES.code("SQUARE") }, 0.0, 0.0),
        }
    }

    /// `x` mapped through [`Unary::apply`] on all cores. The variant is matched once, outside
    /// the loop: each arm's loop applies one constant operation, which the compiler specialises
    /// and vectorises (a match per element kept the loop scalar, behind a jump table).
    fn map_cpu(self, x: &[f32]) -> Vec<f32> {
        match self {
            Unary::Affine(a, b) => cpu::map(x, move |v| Unary::Affine(a, b).apply(v)),
            Unary::Relu => cpu::map(x, |v| Unary::Relu.apply(v)),
            Unary::Relu6 => cpu::map(x, |v| Unary::Relu6.apply(v)),
            Unary::Sign => cpu::map(x, |v| Unary::Sign.apply(v)),
            Unary::Clamp(lo, hi) => cpu::map(x, move |v| Unary::Clamp(lo, hi).apply(v)),
            Unary::Square => cpu::map(x, |v| Unary::Square.apply(v)),
        }
    }

    /// The reference: one element.
    #[inline(always)]
    fn apply(self, v: f32) -> f32 {
        match self {
            Unary::Affine(a, b) => a * v + b,
            Unary::Relu => v.max(0.0),
            Unary::Relu6 => v.clamp(0.0, 6.0),
            Unary::Sign => {
                // WGSL's sign(0) is 0, unlike Rust's f32::signum.
                if v > 0.0 {
                    1.0
                } else if v < 0.0 {
                    -1.0
                } else {
                    0.0
                }
            }
            Unary::Clamp(lo, hi) => v.max(lo).min(hi),
            Unary::Square => v * v,
        }
    }
}

/// Binary operations on same-shape tensors.
#[derive(Clone, Copy, Debug)]
pub enum Binary {
    /// a * x + b * y
    Axpby(f32, f32),
    Mul,
    /// x = forward input, y = output gradient
    ReluBack,
    Relu6Back,
    ClampBack(f32, f32),
}

/// The binary op codes: the shader's `BINARY_*` constants and the cases of its `binary_op`
/// switch.
pub const BINARY_CODES: OpCodes = OpCodes {
    file: "elementwise.wgsl",
    prefix: "BINARY_",
    switch_fn: Some("binary_op"),
    codes: &[
        ("AXPBY", 0),
        ("MUL", 1),
        ("RELU_BACK", 2),
        ("RELU6_BACK", 3),
        ("CLAMP_BACK", 4),
    ],
};

impl Binary {
    /// The op code (an entry of [`BINARY_CODES`]) and the two scalar arguments.
    fn code(self) -> (u32, f32, f32) {
        match self {
            Binary::Axpby(a, b) => (const { BINARY_CODES.code("AXPBY") }, a, b),
            Binary::Mul => (const { BINARY_CODES.code("MUL") }, 0.0, 0.0),
            Binary::ReluBack => (const { BINARY_CODES.code("RELU_BACK") }, 0.0, 0.0),
            Binary::Relu6Back => (const { BINARY_CODES.code("RELU6_BACK") }, 0.0, 0.0),
            Binary::ClampBack(lo, hi) => (const { BINARY_CODES.code("CLAMP_BACK") }, lo, hi),
        }
    }

    /// `x` and `y` combined through [`Binary::apply`] on all cores, the variant matched once
    /// outside the loop (as [`Unary::map_cpu`]).
    fn zip_map_cpu(self, x: &[f32], y: &[f32]) -> Vec<f32> {
        match self {
            Binary::Axpby(a, b) => cpu::zip_map(x, y, move |u, v| Binary::Axpby(a, b).apply(u, v)),
            Binary::Mul => cpu::zip_map(x, y, |u, v| Binary::Mul.apply(u, v)),
            Binary::ReluBack => cpu::zip_map(x, y, |u, v| Binary::ReluBack.apply(u, v)),
            Binary::Relu6Back => cpu::zip_map(x, y, |u, v| Binary::Relu6Back.apply(u, v)),
            Binary::ClampBack(lo, hi) => {
                cpu::zip_map(x, y, move |u, v| Binary::ClampBack(lo, hi).apply(u, v))
            }
        }
    }

    /// The reference: one pair of elements.
    #[inline(always)]
    fn apply(self, x: f32, y: f32) -> f32 {
        match self {
            Binary::Axpby(a, b) => a * x + b * y,
            Binary::Mul => x * y,
            Binary::ReluBack => {
                if x > 0.0 {
                    y
                } else {
                    0.0
                }
            }
            Binary::Relu6Back => {
                if x > 0.0 && x < 6.0 {
                    y
                } else {
                    0.0
                }
            }
            Binary::ClampBack(lo, hi) => {
                if x >= lo && x <= hi {
                    y
                } else {
                    0.0
                }
            }
        }
    }
}

fn elementwise_params(n: usize, (op, a, b): (u32, f32, f32)) -> Result<ElementwiseParams> {
    Ok(ElementwiseParams {
        n: to_u32(n)?,
        op,
        a,
        b,
    })
}

/// Applies `op` to every element, without recording (the building block of the ops below).
pub fn unary_raw(x: &Tensor, op: Unary) -> Result<Tensor> {
    let [y] = Launch::flat("elementwise", &[x]).run(
        [x.shape()],
        // The scalar `apply` is the reference; the CPU backend maps it over all cores.
        || Ok([op.map_cpu(&x.cpu()?)]),
        |call| {
            let (n, xb) = (call.out[0].len(), call.input(0)?);
            let bufs = [xb, xb, &call.out[0]];
            let params = elementwise_params(n, op.code())?;
            call.ctx
                .dispatch(&UNARY, &params, &bufs, groups_for(n, 256)?)
        },
    )?;
    Ok(y)
}

/// Combines two same-shape tensors element by element, without recording.
pub fn binary_raw(x: &Tensor, y: &Tensor, op: Binary) -> Result<Tensor> {
    if x.shape() != y.shape() {
        return shape_err(
            "elementwise",
            format!("{:?} and {:?} ({op:?})", x.shape(), y.shape()),
        );
    }
    let [z] = Launch::flat("elementwise", &[x, y]).run(
        [x.shape()],
        || Ok([op.zip_map_cpu(&x.cpu()?, &y.cpu()?)]),
        |call| {
            let n = call.out[0].len();
            let bufs = [call.input(0)?, call.input(1)?, &call.out[0]];
            let params = elementwise_params(n, op.code())?;
            call.ctx
                .dispatch(&BINARY, &params, &bufs, groups_for(n, 256)?)
        },
    )?;
    Ok(z)
}

/// A tensor of ones with `t`'s shape and device.
pub fn ones_like(t: &Tensor) -> Result<Tensor> {
    Tensor::full(1.0, t.shape(), &t.device())
}

/// A tensor of zeros with `t`'s shape and device.
pub fn zeros_like(t: &Tensor) -> Result<Tensor> {
    Tensor::zeros(t.shape(), &t.device())
}

// ------------------------------------------------------------------ recorded ops

struct AxpbyBack(f32, f32);
impl Backward for AxpbyBack {
    fn name(&self) -> &'static str {
        "axpby"
    }
    fn backward(&self, _i: &[Tensor], _o: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(scale(g, self.0)?), Some(scale(g, self.1)?)])
    }
}

/// a * x + b * y.
pub fn axpby(a: f32, x: &Tensor, b: f32, y: &Tensor) -> Result<Tensor> {
    Ok(binary_raw(x, y, Binary::Axpby(a, b))?.record(AxpbyBack(a, b), &[x, y]))
}

pub fn add(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    axpby(1.0, x, 1.0, y)
}

pub fn sub(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    axpby(1.0, x, -1.0, y)
}

struct MulBack;
impl Backward for MulBack {
    fn name(&self) -> &'static str {
        "mul"
    }
    fn backward(&self, i: &[Tensor], _o: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![
            Some(binary_raw(g, &i[1], Binary::Mul)?),
            Some(binary_raw(g, &i[0], Binary::Mul)?),
        ])
    }
}

/// Element-wise product.
pub fn mul(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    Ok(binary_raw(x, y, Binary::Mul)?.record(MulBack, &[x, y]))
}

struct AffineBack(f32);
impl Backward for AffineBack {
    fn name(&self) -> &'static str {
        "affine"
    }
    fn backward(&self, _i: &[Tensor], _o: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(unary_raw(g, Unary::Affine(self.0, 0.0))?)])
    }
}

/// a * x + b with scalars a and b.
pub fn affine(x: &Tensor, a: f32, b: f32) -> Result<Tensor> {
    Ok(unary_raw(x, Unary::Affine(a, b))?.record(AffineBack(a), &[x]))
}

/// s * x.
pub fn scale(x: &Tensor, s: f32) -> Result<Tensor> {
    affine(x, s, 0.0)
}

/// Backward of an activation whose derivative is a mask of its input.
struct MaskBack(fn(f32, f32) -> Binary, f32, f32);
impl Backward for MaskBack {
    fn name(&self) -> &'static str {
        "activation"
    }
    fn backward(&self, i: &[Tensor], _o: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(binary_raw(&i[0], g, (self.0)(self.1, self.2))?)])
    }
}

pub fn relu(x: &Tensor) -> Result<Tensor> {
    Ok(unary_raw(x, Unary::Relu)?.record(MaskBack(|_, _| Binary::ReluBack, 0.0, 0.0), &[x]))
}

pub fn relu6(x: &Tensor) -> Result<Tensor> {
    Ok(unary_raw(x, Unary::Relu6)?.record(MaskBack(|_, _| Binary::Relu6Back, 0.0, 0.0), &[x]))
}

/// Clamps to [lo, hi]; the gradient passes where lo <= x <= hi (PyTorch's convention).
pub fn clamp(x: &Tensor, lo: f32, hi: f32) -> Result<Tensor> {
    Ok(unary_raw(x, Unary::Clamp(lo, hi))?.record(MaskBack(Binary::ClampBack, lo, hi), &[x]))
}

struct ZeroBack;
impl Backward for ZeroBack {
    fn name(&self) -> &'static str {
        "sign"
    }
    fn backward(&self, i: &[Tensor], _o: &Tensor, _g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(zeros_like(&i[0])?)])
    }
}

/// sign(x) with sign(0) = 0; its gradient is zero almost everywhere.
pub fn sign(x: &Tensor) -> Result<Tensor> {
    Ok(unary_raw(x, Unary::Sign)?.record(ZeroBack, &[x]))
}

struct SquareBack;
impl Backward for SquareBack {
    fn name(&self) -> &'static str {
        "square"
    }
    fn backward(&self, i: &[Tensor], _o: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let two_x = unary_raw(&i[0], Unary::Affine(2.0, 0.0))?;
        Ok(vec![Some(binary_raw(&two_x, g, Binary::Mul)?)])
    }
}

pub fn square(x: &Tensor) -> Result<Tensor> {
    Ok(unary_raw(x, Unary::Square)?.record(SquareBack, &[x]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values on every side of every variant's kinks, with the specials.
    const VALUES: [f32; 14] = [
        -7.5,
        -1.0,
        -0.5,
        -0.0,
        0.0,
        0.25,
        0.5,
        3.0,
        6.0,
        7.5,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1e-30,
    ];

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// The specialised loops are `apply` element by element, bit for bit, for every variant
    /// (a swapped arm, say Relu's loop running Relu6, fails here on 7.5).
    #[test]
    fn specialised_cpu_loops_are_apply() {
        let x: Vec<f32> = (0..300).map(|i| VALUES[i % VALUES.len()]).collect();
        let y: Vec<f32> = (0..300)
            .map(|i| VALUES[(i * 7 + 3) % VALUES.len()])
            .collect();
        for op in [
            Unary::Affine(-1.5, 0.25),
            Unary::Relu,
            Unary::Relu6,
            Unary::Sign,
            Unary::Clamp(-0.5, 0.5),
            Unary::Square,
        ] {
            let want: Vec<f32> = x.iter().map(|&v| op.apply(v)).collect();
            assert_eq!(bits(&op.map_cpu(&x)), bits(&want), "{op:?}");
        }
        for op in [
            Binary::Axpby(0.5, -2.0),
            Binary::Mul,
            Binary::ReluBack,
            Binary::Relu6Back,
            Binary::ClampBack(-0.5, 0.5),
        ] {
            let want: Vec<f32> = x.iter().zip(&y).map(|(&a, &b)| op.apply(a, b)).collect();
            assert_eq!(bits(&op.zip_map_cpu(&x, &y)), bits(&want), "{op:?}");
        }
    }
}
