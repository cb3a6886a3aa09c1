//! The Rust side of every kernel's parameter block and op codes against the WGSL side, read
//! with naga (CPU only, no device): field names, offsets, types and sizes of each `Params`
//! struct, the values of the op-code constants, and the cases of the op-code switches.

use std::collections::{BTreeMap, BTreeSet};

use naga::{AddressSpace, Block, Module, ScalarKind, Statement, SwitchValue, TypeInner};
use robust_dml::engine::gpu::{shader_modules, KernelParams, OpCodes, ParamType, ParamsLayout};
use robust_dml::engine::ops::{
    attack::PgdParams, batchnorm, channels::ChannelsParams, conv, elementwise,
    kmeans::KmeansParams, matmul::MatmulParams, normalize::NormalizeParams, optim::AdamwParams,
    pool::PoolParams, proxy_anchor::ProxyAnchorParams, reduce, topk::TopkParams,
};

/// Every parameter block the Rust side sends.
const LAYOUTS: &[ParamsLayout] = &[
    AdamwParams::LAYOUT,
    batchnorm::BatchNormParams::LAYOUT,
    ChannelsParams::LAYOUT,
    conv::ConvParams::LAYOUT,
    conv::Im2colParams::LAYOUT,
    elementwise::ElementwiseParams::LAYOUT,
    KmeansParams::LAYOUT,
    MatmulParams::LAYOUT,
    NormalizeParams::LAYOUT,
    PgdParams::LAYOUT,
    PoolParams::LAYOUT,
    ProxyAnchorParams::LAYOUT,
    reduce::ReduceParams::LAYOUT,
    TopkParams::LAYOUT,
];

/// Every set of op codes the Rust side sends.
const OP_CODES: &[OpCodes] = &[
    elementwise::UNARY_CODES,
    elementwise::BINARY_CODES,
    reduce::DIM_CODES,
    reduce::SUM_CODES,
    batchnorm::FORM_CODES,
    batchnorm::MODE_CODES,
];

fn parsed_modules() -> BTreeMap<&'static str, Module> {
    shader_modules()
        .expect("every #include names a file of INCLUDE_FILES")
        .into_iter()
        .map(|(file, src)| {
            let module = naga::front::wgsl::parse_str(&src)
                .unwrap_or_else(|e| panic!("{file}: {}", e.emit_to_string(&src)));
            (file, module)
        })
        .collect()
}

/// (name, offset, type) of each member of the uniform block at group 0, binding 0, and the
/// struct's size; `None` when the module has no such binding.
/// A shader's parameter block: (name, offset, type) per field, and the block's size.
type UniformBlock = (Vec<(String, u32, ParamType)>, u32);

fn uniform_block(module: &Module) -> Option<UniformBlock> {
    let (_, var) = module.global_variables.iter().find(|(_, v)| {
        v.space == AddressSpace::Uniform
            && v.binding
                .as_ref()
                .is_some_and(|b| b.group == 0 && b.binding == 0)
    })?;
    let TypeInner::Struct { members, span } = &module.types[var.ty].inner else {
        panic!("the uniform at binding 0 is not a struct");
    };
    let fields = members
        .iter()
        .map(|m| {
            let ty = match module.types[m.ty].inner {
                TypeInner::Scalar(s) if s.width == 4 && s.kind == ScalarKind::Uint => {
                    ParamType::U32
                }
                TypeInner::Scalar(s) if s.width == 4 && s.kind == ScalarKind::Float => {
                    ParamType::F32
                }
                ref other => panic!(
                    "field {:?} has a type no Rust block holds: {other:?}",
                    m.name
                ),
            };
            (m.name.clone().unwrap_or_default(), m.offset, ty)
        })
        .collect();
    Some((fields, *span))
}

/// Differences between a Rust layout and a shader's block, one line each.
fn layout_mismatches(
    layout: &ParamsLayout,
    file: &str,
    wgsl: &(Vec<(String, u32, ParamType)>, u32),
) -> Vec<String> {
    let rust: Vec<(String, u32, ParamType)> = layout
        .fields
        .iter()
        .map(|f| (f.name.to_string(), f.offset as u32, f.ty))
        .collect();
    let mut out = Vec::new();
    if rust != wgsl.0 {
        out.push(format!(
            "{file}: Params fields differ from {}:\n  wgsl: {:?}\n  rust: {:?}",
            layout.rust_name, wgsl.0, rust
        ));
    }
    if layout.size as u32 != wgsl.1 {
        out.push(format!(
            "{file}: Params is {} bytes, {} is {}",
            wgsl.1, layout.rust_name, layout.size
        ));
    }
    out
}

#[test]
fn every_params_block_matches_its_shader() {
    let modules = parsed_modules();
    let mut problems = Vec::new();
    let mut covered = BTreeSet::new();
    for layout in LAYOUTS {
        for file in layout.files {
            let Some(module) = modules.get(file) else {
                problems.push(format!("{}: no shader file {file}", layout.rust_name));
                continue;
            };
            if !covered.insert(*file) {
                problems.push(format!("{file}: more than one Rust parameter block"));
            }
            match uniform_block(module) {
                Some(block) => problems.extend(layout_mismatches(layout, file, &block)),
                None => problems.push(format!("{file}: no uniform block at binding 0")),
            }
        }
    }
    for (file, module) in &modules {
        if uniform_block(module).is_some() && !covered.contains(file) {
            problems.push(format!(
                "{file}: its Params block has no Rust twin in LAYOUTS"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The module's `u32` constants by name.
fn u32_constants(module: &Module) -> BTreeMap<String, u32> {
    module
        .constants
        .iter()
        .filter_map(|(_, c)| {
            let name = c.name.clone()?;
            match module.global_expressions[c.init] {
                naga::Expression::Literal(naga::Literal::U32(v)) => Some((name, v)),
                _ => None,
            }
        })
        .collect()
}

/// The case values of every `switch` in `block`, nested blocks included.
fn switch_cases(block: &Block, out: &mut Vec<BTreeSet<u32>>) {
    for stmt in block.iter() {
        match stmt {
            Statement::Block(b) => switch_cases(b, out),
            Statement::If { accept, reject, .. } => {
                switch_cases(accept, out);
                switch_cases(reject, out);
            }
            Statement::Loop {
                body, continuing, ..
            } => {
                switch_cases(body, out);
                switch_cases(continuing, out);
            }
            Statement::Switch { cases, .. } => {
                out.push(
                    cases
                        .iter()
                        .filter_map(|c| match c.value {
                            SwitchValue::U32(v) => Some(v),
                            SwitchValue::I32(v) => u32::try_from(v).ok(),
                            SwitchValue::Default => None,
                        })
                        .collect(),
                );
                for c in cases {
                    switch_cases(&c.body, out);
                }
            }
            _ => {}
        }
    }
}

fn op_code_mismatches(codes: &OpCodes, module: &Module) -> Vec<String> {
    let mut out = Vec::new();
    let constants = u32_constants(module);
    let rust: BTreeMap<String, u32> = codes
        .codes
        .iter()
        .map(|(name, v)| (format!("{}{name}", codes.prefix), *v))
        .collect();
    let wgsl: BTreeMap<String, u32> = constants
        .into_iter()
        .filter(|(name, _)| name.starts_with(codes.prefix))
        .collect();
    if rust != wgsl {
        out.push(format!(
            "{}: {}* constants differ:\n  wgsl: {wgsl:?}\n  rust: {rust:?}",
            codes.file, codes.prefix
        ));
    }
    if let Some(fn_name) = codes.switch_fn {
        let Some((_, function)) = module
            .functions
            .iter()
            .find(|(_, f)| f.name.as_deref() == Some(fn_name))
        else {
            return vec![format!("{}: no function {fn_name}", codes.file)];
        };
        let mut switches = Vec::new();
        switch_cases(&function.body, &mut switches);
        let want: BTreeSet<u32> = codes.codes.iter().map(|(_, v)| *v).collect();
        if switches != [want.clone()] {
            out.push(format!(
                "{}: {fn_name} should hold one switch with cases {want:?}, has {switches:?}",
                codes.file
            ));
        }
    }
    out
}

#[test]
fn every_op_code_matches_its_shader() {
    let modules = parsed_modules();
    let mut problems = Vec::new();
    for codes in OP_CODES {
        match modules.get(codes.file) {
            Some(module) => problems.extend(op_code_mismatches(codes, module)),
            None => problems.push(format!("no shader file {}", codes.file)),
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
