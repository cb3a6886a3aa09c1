//! Elementwise ops: add, sub, mul, scale, affine, relu, relu6, sign, clamp, square, and their
//! backward passes, on both devices. GPU: `shaders/elementwise.wgsl`.

use crate::engine::error::{shape_err, Result};
use crate::engine::gpu::{f, groups_for, u, Kernel};
use crate::engine::split;
use crate::engine::tape::Backward;
use crate::engine::tensor::{same_device, Tensor};
use crate::engine::{cpu, Device};
use crate::kernel;

const UNARY: Kernel = kernel!("elementwise.wgsl", "unary", [Read, Read, ReadWrite]);
const BINARY: Kernel = kernel!("elementwise.wgsl", "binary", [Read, Read, ReadWrite]);

/// Unary operations; the discriminant is the shader's op code.
#[derive(Clone, Copy, Debug)]
pub enum Unary {
    /// a * x + b
    Affine(f32, f32),
    Relu,
    Relu6,
    Sign,
    Clamp(f32, f32),
    Fill(f32),
    Square,
    Sqrt,
    Exp,
    Abs,
}

impl Unary {
    fn code(self) -> (u32, f32, f32) {
        match self {
            Unary::Affine(a, b) => (0, a, b),
            Unary::Relu => (1, 0.0, 0.0),
            Unary::Relu6 => (2, 0.0, 0.0),
            Unary::Sign => (3, 0.0, 0.0),
            Unary::Clamp(lo, hi) => (4, lo, hi),
            Unary::Fill(v) => (5, v, 0.0),
            Unary::Square => (6, 0.0, 0.0),
            Unary::Sqrt => (7, 0.0, 0.0),
            Unary::Exp => (8, 0.0, 0.0),
            Unary::Abs => (9, 0.0, 0.0),
        }
    }

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
            Unary::Fill(c) => c,
            Unary::Square => v * v,
            Unary::Sqrt => v.sqrt(),
            Unary::Exp => v.exp(),
            Unary::Abs => v.abs(),
        }
    }
}

/// Binary operations on same-shape tensors; the discriminant is the shader's op code.
#[derive(Clone, Copy, Debug)]
pub enum Binary {
    /// a * x + b * y
    Axpby(f32, f32),
    Mul,
    /// x = forward input, y = output gradient
    ReluBack,
    Relu6Back,
    ClampBack(f32, f32),
    Div,
}

impl Binary {
    fn code(self) -> (u32, f32, f32) {
        match self {
            Binary::Axpby(a, b) => (0, a, b),
            Binary::Mul => (1, 0.0, 0.0),
            Binary::ReluBack => (2, 0.0, 0.0),
            Binary::Relu6Back => (3, 0.0, 0.0),
            Binary::ClampBack(lo, hi) => (4, lo, hi),
            Binary::Div => (5, 0.0, 0.0),
        }
    }

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
            Binary::Div => x / y,
        }
    }
}

/// Applies `op` to every element, without recording (the building block of the ops below).
pub fn unary_raw(x: &Tensor, op: Unary) -> Result<Tensor> {
    match x.device() {
        // The scalar `apply` is the reference; the CPU backend maps it over all cores.
        Device::Cpu => Tensor::from_cpu(cpu::map(&x.cpu()?, |v| op.apply(v)), x.shape()),
        Device::Gpu(ctx) => {
            if let Some(y) = split::flat("elementwise", &[x], |c| unary_raw(&c[0], op))? {
                return Ok(y);
            }
            let n = x.numel();
            let out = ctx.alloc(n)?;
            let (code, a, b) = op.code();
            let xb = x.gpu()?;
            ctx.dispatch(
                &UNARY,
                &[u(n), code, f(a), f(b)],
                &[xb, xb, &out],
                groups_for(n, 256),
            )?;
            Tensor::from_gpu(out, x.shape())
        }
    }
}

/// Combines two same-shape tensors element by element, without recording.
pub fn binary_raw(x: &Tensor, y: &Tensor, op: Binary) -> Result<Tensor> {
    if x.shape() != y.shape() {
        return shape_err(
            "elementwise",
            format!("{:?} and {:?} ({op:?})", x.shape(), y.shape()),
        );
    }
    match same_device("elementwise", &[x, y])? {
        Device::Cpu => Tensor::from_cpu(
            cpu::zip_map(&x.cpu()?, &y.cpu()?, |a, b| op.apply(a, b)),
            x.shape(),
        ),
        Device::Gpu(ctx) => {
            if let Some(z) = split::flat("elementwise", &[x, y], |c| binary_raw(&c[0], &c[1], op))?
            {
                return Ok(z);
            }
            let n = x.numel();
            let out = ctx.alloc(n)?;
            let (code, a, b) = op.code();
            ctx.dispatch(
                &BINARY,
                &[u(n), code, f(a), f(b)],
                &[x.gpu()?, y.gpu()?, &out],
                groups_for(n, 256),
            )?;
            Tensor::from_gpu(out, x.shape())
        }
    }
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
