//! WGSL assembly: each kernel file with the prelude and its `#include`s resolved once, and
//! the op-code tables a shader branches on.

use crate::engine::error::{EngineError, Result};

/// Functions every shader may use; prepended to each WGSL file.
const PRELUDE: &str = include_str!("../../../shaders/prelude.wgsl");

/// A kernel file's name and text, the stem written once.
macro_rules! shader_file {
    ($stem:literal) => {
        (
            concat!($stem, ".wgsl"),
            include_str!(concat!("../../../shaders/", $stem, ".wgsl")),
        )
    };
}

/// Every kernel file in `shaders/` (all but the prelude and `include/`) with its text, so that tests can build
/// each module exactly as the device gets it ([`shader_modules`]). `tests/shaders.rs` checks that
/// this list matches the directory.
pub const SHADER_FILES: &[(&str, &str)] = &[
    shader_file!("adamw"),
    shader_file!("batchnorm"),
    shader_file!("channels"),
    shader_file!("conv2d"),
    shader_file!("depthwise"),
    shader_file!("elementwise"),
    shader_file!("im2col"),
    shader_file!("kmeans"),
    shader_file!("matmul"),
    shader_file!("matmul_vec4"),
    shader_file!("normalize"),
    shader_file!("pgd"),
    shader_file!("pool"),
    shader_file!("proxy_anchor"),
    shader_file!("reduce"),
    shader_file!("topk"),
];

/// A file in `shaders/include/` with its text.
macro_rules! include_file {
    ($stem:literal) => {
        (
            concat!($stem, ".wgsl"),
            include_str!(concat!("../../../shaders/include/", $stem, ".wgsl")),
        )
    };
}

/// The pieces kernel files share, pulled in with a line `#include "name.wgsl"` so that each is
/// written once: a parameter block used by several kernel files, the workgroup reductions.
pub const INCLUDE_FILES: &[(&str, &str)] = &[
    include_file!("conv_layout"),
    include_file!("matmul_params"),
    include_file!("workgroup_reduce"),
];

/// The WGSL text handed to the device for a kernel file: the prelude, then the file with each
/// `#include "name.wgsl"` line replaced by that file of [`INCLUDE_FILES`] (an include already
/// pulled in becomes empty, so two includes of one file declare nothing twice). No overrides,
/// constants or other substitutions are applied anywhere (pipelines are created with default
/// compilation options), so this is the whole of what each backend compiles. `file` names the
/// kernel file in the error for an include that does not exist.
pub fn assembled_source(file: &str, file_text: &str) -> Result<String> {
    let mut out = format!("{PRELUDE}\n");
    let mut included = Vec::new();
    append_resolved(file, file_text, &mut included, &mut out)?;
    Ok(out)
}

fn append_resolved(
    file: &str,
    text: &str,
    included: &mut Vec<&'static str>,
    out: &mut String,
) -> Result<()> {
    for line in text.lines() {
        let Some(directive) = line.trim().strip_prefix("#include") else {
            out.push_str(line);
            out.push('\n');
            continue;
        };
        let name = directive.trim().trim_matches('"');
        let Some(&(name, body)) = INCLUDE_FILES.iter().find(|(n, _)| *n == name) else {
            return Err(EngineError::Gpu(format!(
                "{file}: `{}` names no file of engine::gpu::INCLUDE_FILES (add it to shaders/include/ and that list)",
                line.trim()
            )));
        };
        if !included.contains(&name) {
            included.push(name);
            append_resolved(name, body, included, out)?;
        }
    }
    Ok(())
}

/// Every shader module as it goes to the device: (file name, assembled WGSL).
pub fn shader_modules() -> Result<Vec<(&'static str, String)>> {
    SHADER_FILES
        .iter()
        .map(|(file, text)| Ok((*file, assembled_source(file, text)?)))
        .collect()
}

/// The op codes a shader branches on, the one place their values are written: each is a WGSL
/// `const` named `prefix + NAME` with this value, and when `switch_fn` is given, the `switch`
/// in that function has exactly these cases. `tests/kernel_params.rs` checks both with naga;
/// Rust reads a code by name with [`OpCodes::code`].
#[derive(Clone, Copy, Debug)]
pub struct OpCodes {
    pub file: &'static str,
    pub prefix: &'static str,
    pub switch_fn: Option<&'static str>,
    pub codes: &'static [(&'static str, u32)],
}

impl OpCodes {
    /// The code named `name`. Use it in a constant (`const { CODES.code("NAME") }`), so that
    /// a name missing from the table fails the build.
    pub const fn code(&self, name: &str) -> u32 {
        let mut i = 0;
        while i < self.codes.len() {
            if same_str(self.codes[i].0, name) {
                return self.codes[i].1;
            }
            i += 1;
        }
        panic!("no such op code")
    }
}

/// `a == b`, in a `const fn`.
const fn same_str(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn includes_resolve_once_and_unknown_ones_are_errors() {
        let text =
            "#include \"matmul_params.wgsl\"\n  #include \"matmul_params.wgsl\"\nfn f() {}\n";
        let src = assembled_source("t.wgsl", text).unwrap();
        assert_eq!(src.matches("struct Params").count(), 1, "{src}");
        assert!(!src.contains("#include") && src.contains("fn f() {}"));
        let err = assembled_source("t.wgsl", "#include \"nope.wgsl\"\n").unwrap_err();
        assert!(err.to_string().contains("t.wgsl") && err.to_string().contains("nope.wgsl"));
    }
}
