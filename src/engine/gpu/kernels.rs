//! Kernel declarations: which file and entry point, the bindings' access, the parameter
//! block's layout (`kernel!`, `kernel_params!`), and the grid arithmetic of a launch.

use crate::engine::error::{EngineError, Result};

/// Workgroup counts above this are folded into a second grid dimension.
pub const MAX_GRID_DIM: u32 = 65_535;

/// How a kernel uses one of its storage bindings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    Read,
    ReadWrite,
}

/// A compute entry point and the layout of its storage bindings. Binding 0 is always the
/// uniform parameter block; storage bindings follow from binding 1 in the order given here.
#[derive(Clone, Copy, Debug)]
pub struct Kernel {
    /// File name in `shaders/`, used as the cache key of the shader module.
    pub file: &'static str,
    pub source: &'static str,
    pub entry: &'static str,
    pub bindings: &'static [Access],
}

/// Declares a [`Kernel`] from a file in `shaders/`.
#[macro_export]
macro_rules! kernel {
    ($file:literal, $entry:literal, [$($acc:ident),* $(,)?]) => {
        $crate::engine::gpu::Kernel {
            file: $file,
            source: include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/shaders/", $file)),
            entry: $entry,
            bindings: &[$($crate::engine::gpu::Access::$acc),*],
        }
    };
}

/// The scalar types a parameter block holds (WGSL `u32` and `f32`, 4 bytes each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamType {
    U32,
    F32,
}

/// A Rust type that may be a field of a parameter block.
pub trait ParamScalar {
    const TYPE: ParamType;
}
impl ParamScalar for u32 {
    const TYPE: ParamType = ParamType::U32;
}
impl ParamScalar for f32 {
    const TYPE: ParamType = ParamType::F32;
}

/// One field of a parameter block: its name, byte offset and type, as the shader must see them.
#[derive(Clone, Copy, Debug)]
pub struct ParamField {
    pub name: &'static str,
    pub offset: usize,
    pub ty: ParamType,
}

/// The layout of a Rust parameter block and the shader files whose `Params` struct it mirrors;
/// `tests/kernel_params.rs` compares the two with naga.
#[derive(Clone, Copy, Debug)]
pub struct ParamsLayout {
    pub rust_name: &'static str,
    pub files: &'static [&'static str],
    pub size: usize,
    pub fields: &'static [ParamField],
}

/// A kernel family's uniform parameter block: a `#[repr(C)]` plain-old-data struct whose fields
/// are those of the WGSL `Params` struct, in order. Declare it with [`kernel_params!`].
pub trait KernelParams: bytemuck::Pod {
    const LAYOUT: ParamsLayout;
}

/// Declares a kernel family's parameter block, `#[repr(C)]` and `bytemuck::Pod`, and records
/// its field names and offsets ([`KernelParams::LAYOUT`]) for the layout test.
#[macro_export]
macro_rules! kernel_params {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident for [$($file:literal),+ $(,)?] {
            $($(#[$fmeta:meta])* $field:ident : $ty:ty),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
        $vis struct $name {
            $($(#[$fmeta])* pub $field: $ty),*
        }
        impl $crate::engine::gpu::KernelParams for $name {
            const LAYOUT: $crate::engine::gpu::ParamsLayout = $crate::engine::gpu::ParamsLayout {
                rust_name: stringify!($name),
                files: &[$($file),+],
                size: ::core::mem::size_of::<$name>(),
                fields: &[$($crate::engine::gpu::ParamField {
                    name: stringify!($field),
                    offset: ::core::mem::offset_of!($name, $field),
                    ty: <$ty as $crate::engine::gpu::ParamScalar>::TYPE,
                }),*],
            };
        }
    };
}

/// Folds a 1-D workgroup count into x/y so that neither exceeds 65,535.
pub fn fold_grid(workgroups: u32) -> [u32; 3] {
    if workgroups <= MAX_GRID_DIM {
        [workgroups, 1, 1]
    } else {
        let y = workgroups.div_ceil(MAX_GRID_DIM);
        let x = workgroups.div_ceil(y);
        [x, y, 1]
    }
}

/// Workgroups needed to cover `n` items with `per_group` items each.
pub fn groups_for(n: usize, per_group: usize) -> Result<u32> {
    to_u32(n.div_ceil(per_group))
}

/// A size or index as the `u32` the kernels compute with; larger values are an error (naming
/// the value) rather than silently truncated.
pub fn to_u32(v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| EngineError::SizeOverU32 { value: v })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_folding() {
        assert_eq!(fold_grid(10), [10, 1, 1]);
        let g = fold_grid(200_000);
        assert!(g[0] <= MAX_GRID_DIM && g[0] * g[1] >= 200_000);
    }
}
