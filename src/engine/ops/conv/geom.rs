//! Every size of one convolution, validated once, and the words the kernels receive.

use super::{Conv2dParams, OP};
use crate::engine::error::{shape_err, EngineError, Result};
use crate::engine::gpu::to_u32;

/// Every size of one convolution, validated.
#[derive(Clone, Copy, Debug)]
pub(super) struct Geom {
    pub(super) n: usize,
    pub(super) cin: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) cout: usize,
    pub(super) kh: usize,
    pub(super) kw: usize,
    pub(super) oh: usize,
    pub(super) ow: usize,
    pub(super) sh: usize,
    pub(super) sw: usize,
    pub(super) ph: usize,
    pub(super) pw: usize,
    pub(super) dh: usize,
    pub(super) dw: usize,
    pub(super) groups: usize,
    pub(super) cin_g: usize,
    pub(super) cout_g: usize,
}

/// The sizes both parameter blocks ([`ConvParams`], [`Im2colParams`]) carry, as the kernels'
/// u32s: n, cin, h, w, cout, kh, kw, oh, ow, sh, sw, ph, pw, dh, dw.
pub(super) type GeomWords = [u32; 15];

impl Geom {
    pub(super) fn words(&self) -> Result<GeomWords> {
        let sizes = [
            self.n, self.cin, self.h, self.w, self.cout, self.kh, self.kw, self.oh, self.ow,
            self.sh, self.sw, self.ph, self.pw, self.dh, self.dw,
        ];
        let mut words = [0; 15];
        for (word, size) in words.iter_mut().zip(sizes) {
            *word = to_u32(size)?;
        }
        Ok(words)
    }

    pub(super) fn new(x: &[usize], w: &[usize], p: Conv2dParams) -> Result<Geom> {
        let (n, cin, h, wd) = match *x {
            [a, b, c, d] => (a, b, c, d),
            _ => return shape_err(OP, format!("input must be NCHW (4-D), got {x:?}")),
        };
        let (cout, wc, kh, kw) = match *w {
            [a, b, c, d] => (a, b, c, d),
            _ => {
                return shape_err(
                    OP,
                    format!("weight must be [C_out, C_in/groups, kh, kw], got {w:?}"),
                )
            }
        };
        let g = p.groups;
        if g == 0 || p.stride.0 == 0 || p.stride.1 == 0 || p.dilation.0 == 0 || p.dilation.1 == 0 {
            return Err(EngineError::Invalid {
                op: OP,
                detail: format!("groups, stride and dilation must be positive, got {p:?}"),
            });
        }
        if cin % g != 0 || cout % g != 0 {
            return shape_err(
                OP,
                format!("groups {g} must divide C_in {cin} and C_out {cout}"),
            );
        }
        if wc != cin / g {
            return shape_err(
                OP,
                format!("weight {w:?} expects {wc} input channels per group, input {x:?} with groups {g} has {}", cin / g),
            );
        }
        if kh == 0 || kw == 0 || cout == 0 {
            return shape_err(OP, format!("empty weight {w:?}"));
        }
        let out_len = |size: usize, pad: usize, dil: usize, k: usize, s: usize| -> Result<usize> {
            let span = dil * (k - 1) + 1;
            if size + 2 * pad < span {
                return shape_err(
                    OP,
                    format!("kernel span {span} larger than the padded input {} (input {x:?}, weight {w:?}, {p:?})", size + 2 * pad),
                );
            }
            Ok((size + 2 * pad - span) / s + 1)
        };
        let oh = out_len(h, p.padding.0, p.dilation.0, kh, p.stride.0)?;
        let ow = out_len(wd, p.padding.1, p.dilation.1, kw, p.stride.1)?;
        Ok(Geom {
            n,
            cin,
            h,
            w: wd,
            cout,
            kh,
            kw,
            oh,
            ow,
            sh: p.stride.0,
            sw: p.stride.1,
            ph: p.padding.0,
            pw: p.padding.1,
            dh: p.dilation.0,
            dw: p.dilation.1,
            groups: g,
            cin_g: cin / g,
            cout_g: cout / g,
        })
    }

    pub(super) fn out_shape(&self) -> [usize; 4] {
        [self.n, self.cout, self.oh, self.ow]
    }

    /// Depthwise (each input channel convolved by its own `cout / cin` filters).
    pub(super) fn is_depthwise(&self) -> bool {
        self.groups > 1 && self.groups == self.cin
    }

    /// A 1x1 convolution with stride 1 and no padding over a multiple-of-4 channel count: its
    /// input is already the GEMM's column matrix.
    pub(super) fn is_pointwise(&self) -> bool {
        self.kh == 1
            && self.kw == 1
            && self.sh == 1
            && self.sw == 1
            && self.ph == 0
            && self.pw == 0
            && self.groups == 1
            && self.cin.is_multiple_of(4)
    }
}
