//! Every shader for every backend, without a GPU.
//!
//! Each WGSL module is taken exactly as the device gets it (`engine::gpu::shader_modules`: the
//! prelude and the file with its `#include`s resolved; no overrides or constants exist), validated by naga (the version wgpu
//! uses) with no optional capabilities (so no f16, no subgroups), checked against the WebGPU
//! baseline limits, and translated per entry point to SPIR-V, MSL and HLSL the way wgpu's
//! Vulkan, Metal and DX12 backends do. The SPIR-V then goes through `spirv-val` (Debian's
//! `spirv-tools`) when it is installed; `ROBUST_DML_REQUIRE_SPIRV_VAL=1` (set by CI) makes its
//! absence a failure. Failures name the shader, the entry point and the backend.

use std::path::{Path, PathBuf};
use std::process::Command;

use naga::back::{hlsl, msl, spv};
use naga::valid::{Capabilities, ModuleInfo, ValidationFlags, Validator};
use robust_dml::engine::gpu::{shader_modules, INCLUDE_FILES, SHADER_FILES};

/// `wgpu::Limits::default()`, the WebGPU baseline (kept here as numbers so that this test
/// does not need wgpu's device types).
const MAX_INVOCATIONS_PER_WORKGROUP: u32 = 256;
const MAX_WORKGROUP_SIZE: [u32; 3] = [256, 256, 64];
const MAX_WORKGROUP_STORAGE_BYTES: u32 = 16 * 1024;
const MAX_STORAGE_BUFFERS_PER_STAGE: usize = 8;

/// SPIR-V versions wgpu emits: 1.0 for Vulkan 1.0 devices up to 1.6 for Vulkan 1.3.
const SPIRV_TARGETS: &[((u8, u8), &str)] = &[((1, 0), "vulkan1.0"), ((1, 6), "vulkan1.3")];
/// The oldest Metal language wgpu's Metal backend targets (macOS 10.13) and a current one.
const MSL_VERSIONS: &[(u8, u8)] = &[(2, 0), (3, 0)];
/// FXC's shader model 5.1 (DX12 without DXC) and DXC's 6.0.
const HLSL_MODELS: &[hlsl::ShaderModel] = &[hlsl::ShaderModel::V5_1, hlsl::ShaderModel::V6_0];

struct Parsed {
    file: &'static str,
    source: String,
    module: naga::Module,
    info: ModuleInfo,
}

/// Parses and validates one module; the error names the shader and shows naga's report.
fn parse_and_validate(file: &'static str, source: String) -> Result<Parsed, String> {
    let module = naga::front::wgsl::parse_str(&source).map_err(|e| {
        format!(
            "{file}: WGSL parse error\n{}",
            e.emit_to_string_with_path(&source, file)
        )
    })?;
    let info = Validator::new(ValidationFlags::all(), Capabilities::empty())
        .validate(&module)
        .map_err(|e| {
            format!(
                "{file}: naga validation failed (no optional capabilities: f16, subgroups and 64-bit types are not allowed)\n{}",
                e.emit_to_string_with_path(&source, file)
            )
        })?;
    Ok(Parsed {
        file,
        source,
        module,
        info,
    })
}

/// Checks one entry point against the WebGPU baseline limits that can be read off the shader.
fn check_baseline_limits(p: &Parsed, ep_index: usize) -> Vec<String> {
    let ep = &p.module.entry_points[ep_index];
    let what = format!("{} entry point {}", p.file, ep.name);
    let mut failures = Vec::new();
    let size = ep.workgroup_size;
    let invocations: u32 = size.iter().product();
    if invocations > MAX_INVOCATIONS_PER_WORKGROUP {
        failures.push(format!(
            "{what}: workgroup {size:?} has {invocations} invocations, over the WebGPU baseline of {MAX_INVOCATIONS_PER_WORKGROUP}"
        ));
    }
    for (d, (&s, &max)) in size.iter().zip(MAX_WORKGROUP_SIZE.iter()).enumerate() {
        if s > max {
            failures.push(format!(
                "{what}: workgroup size {s} in dimension {d} is over the WebGPU baseline of {max}"
            ));
        }
    }
    let mut layouter = naga::proc::Layouter::default();
    if let Err(e) = layouter.update(p.module.to_ctx()) {
        failures.push(format!("{what}: type layout failed: {e}"));
        return failures;
    }
    let uses = p.info.get_entry_point(ep_index);
    let mut workgroup_bytes = 0;
    let mut storage_buffers = 0;
    for (handle, var) in p.module.global_variables.iter() {
        if uses[handle].is_empty() {
            continue;
        }
        match var.space {
            naga::AddressSpace::WorkGroup => workgroup_bytes += layouter[var.ty].size,
            naga::AddressSpace::Storage { .. } => storage_buffers += 1,
            _ => {}
        }
    }
    if workgroup_bytes > MAX_WORKGROUP_STORAGE_BYTES {
        failures.push(format!(
            "{what}: {workgroup_bytes} bytes of workgroup memory, over the WebGPU baseline of {MAX_WORKGROUP_STORAGE_BYTES}"
        ));
    }
    if storage_buffers > MAX_STORAGE_BUFFERS_PER_STAGE {
        failures.push(format!(
            "{what}: {storage_buffers} storage buffers, over the WebGPU baseline of {MAX_STORAGE_BUFFERS_PER_STAGE} per stage"
        ));
    }
    failures
}

/// The bounds-check policies wgpu uses on adapters without robust buffer access.
fn restrict_policies() -> naga::proc::BoundsCheckPolicies {
    naga::proc::BoundsCheckPolicies {
        index: naga::proc::BoundsCheckPolicy::Restrict,
        buffer: naga::proc::BoundsCheckPolicy::Restrict,
        image_load: naga::proc::BoundsCheckPolicy::Restrict,
        binding_array: naga::proc::BoundsCheckPolicy::Restrict,
    }
}

fn write_spirv(p: &Parsed, ep: &str, lang_version: (u8, u8)) -> Result<Vec<u32>, String> {
    let options = spv::Options {
        lang_version,
        bounds_check_policies: restrict_policies(),
        ..Default::default()
    };
    let pipeline = spv::PipelineOptions {
        shader_stage: naga::ShaderStage::Compute,
        entry_point: ep.to_string(),
    };
    spv::write_vec(&p.module, &p.info, &options, Some(&pipeline)).map_err(|e| e.to_string())
}

fn write_msl(p: &Parsed, ep: &str, lang_version: (u8, u8)) -> Result<String, String> {
    let options = msl::Options {
        lang_version,
        bounds_check_policies: restrict_policies(),
        ..Default::default()
    };
    let pipeline = msl::PipelineOptions {
        entry_point: Some((naga::ShaderStage::Compute, ep.to_string())),
        ..Default::default()
    };
    msl::write_string(&p.module, &p.info, &options, &pipeline)
        .map(|(text, _)| text)
        .map_err(|e| e.to_string())
}

fn write_hlsl(p: &Parsed, ep: &str, shader_model: hlsl::ShaderModel) -> Result<String, String> {
    let options = hlsl::Options {
        shader_model,
        ..Default::default()
    };
    let pipeline = hlsl::PipelineOptions {
        entry_point: Some((naga::ShaderStage::Compute, ep.to_string())),
    };
    let mut text = String::new();
    hlsl::Writer::new(&mut text, &options, &pipeline)
        .write(&p.module, &p.info, None)
        .map(|_| text)
        .map_err(|e| e.to_string())
}

/// Runs `spirv-val` on one SPIR-V binary; `None` when the tool is not installed.
fn spirv_val(words: &[u32], target_env: &str, scratch: &Path) -> Option<Result<(), String>> {
    std::fs::write(scratch, bytemuck_words(words)).expect("write SPIR-V to the temp dir");
    let out = match Command::new("spirv-val")
        .arg("--target-env")
        .arg(target_env)
        .arg(scratch)
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => return Some(Err(format!("spirv-val could not run: {e}"))),
    };
    Some(if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    })
}

fn bytemuck_words(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// A scratch directory per test (tests run in parallel and each removes its own).
fn scratch_dir(test: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("robust-dml-shaders-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create a temp dir");
    dir
}

/// Translates every entry point of one module to every backend; returns the failures and
/// whether spirv-val was available.
fn check_backends(p: &Parsed, scratch: &Path) -> (Vec<String>, bool) {
    let mut failures = Vec::new();
    let mut have_spirv_val = true;
    for (i, ep) in p.module.entry_points.iter().enumerate() {
        let name = ep.name.as_str();
        let at = |backend: &str, e: String| {
            format!("{} entry point {name}, backend {backend}: {e}", p.file)
        };
        failures.extend(check_baseline_limits(p, i));
        for &(version, target_env) in SPIRV_TARGETS {
            let backend = format!("SPIR-V {}.{}", version.0, version.1);
            match write_spirv(p, name, version) {
                Err(e) => failures.push(at(&backend, e)),
                Ok(words) => {
                    let file = scratch.join(format!("{}-{name}-{target_env}.spv", p.file));
                    match spirv_val(&words, target_env, &file) {
                        None => have_spirv_val = false,
                        Some(Ok(())) => {}
                        Some(Err(e)) => {
                            failures.push(at(&format!("{backend} (spirv-val {target_env})"), e))
                        }
                    }
                }
            }
        }
        for &version in MSL_VERSIONS {
            if let Err(e) = write_msl(p, name, version) {
                failures.push(at(&format!("MSL {}.{}", version.0, version.1), e));
            }
        }
        for &model in HLSL_MODELS {
            if let Err(e) = write_hlsl(p, name, model) {
                failures.push(at(&format!("HLSL {model:?}"), e));
            }
        }
    }
    (failures, have_spirv_val)
}

#[test]
fn shader_registry_matches_the_shaders_directory() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .expect("read shaders/")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| n.ends_with(".wgsl") && n != "prelude.wgsl")
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = SHADER_FILES.iter().map(|(f, _)| f.to_string()).collect();
    listed.sort();
    assert_eq!(
        listed, on_disk,
        "engine::gpu::SHADER_FILES must list every kernel file in shaders/ (add the new file there)"
    );
}

#[test]
fn include_registry_matches_the_include_directory() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders/include");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .expect("read shaders/include/")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = INCLUDE_FILES.iter().map(|(f, _)| f.to_string()).collect();
    listed.sort();
    assert_eq!(
        listed, on_disk,
        "engine::gpu::INCLUDE_FILES must list every file in shaders/include/ (add the new file there)"
    );
}

#[test]
fn every_shader_builds_for_every_backend() {
    let scratch = scratch_dir("all");
    let mut failures = Vec::new();
    let mut missing_spirv_val = false;
    let mut entry_points = 0;
    for (file, source) in shader_modules().expect("every #include names a file of INCLUDE_FILES") {
        match parse_and_validate(file, source) {
            Err(e) => failures.push(e),
            Ok(p) => {
                assert!(
                    !p.source.contains("override "),
                    "{file}: pipeline-overridable constants are not supported by this test; give them values in it"
                );
                entry_points += p.module.entry_points.len();
                let (f, have) = check_backends(&p, &scratch);
                failures.extend(f);
                missing_spirv_val |= !have;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    assert!(
        failures.is_empty(),
        "{} shader failure(s):\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    assert!(entry_points > 0, "no entry points found");
    if missing_spirv_val {
        let msg = "spirv-val is not installed (Debian: apt-get install spirv-tools); the SPIR-V was written but not validated";
        if std::env::var("ROBUST_DML_REQUIRE_SPIRV_VAL").is_ok_and(|v| v == "1") {
            panic!("{msg}");
        }
        println!("SKIPPED spirv-val: {msg}");
    }
    println!(
        "{} modules, {entry_points} entry points: SPIR-V, MSL and HLSL written",
        SHADER_FILES.len()
    );
}

/// The checker catches a module that is valid WGSL but that some backends cannot translate, and
/// names those backends only: `inverse()` of a matrix goes to SPIR-V (GLSL.std.450's
/// MatrixInverse) but naga's MSL and HLSL writers reject it. WGSL has no `inverse`, so the
/// construct is made by editing the IR of a `transpose()`; unedited, the same module passes.
#[test]
fn a_shader_broken_for_some_backends_is_named_per_backend() {
    const SOURCE: &str = "
@group(0) @binding(0) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(1)
fn main() {
    let m = mat2x2<f32>(out[0], out[1], out[2], out[3]);
    out[0] = transpose(m)[0][0];
}";
    let scratch = scratch_dir("probe");
    let fine = parse_and_validate("probe.wgsl", SOURCE.into()).unwrap();
    let (failures, _) = check_backends(&fine, &scratch);
    assert!(failures.is_empty(), "{failures:#?}");

    let mut broken = fine;
    let mut edited = 0;
    for (_, expr) in broken.module.entry_points[0]
        .function
        .expressions
        .iter_mut()
    {
        if let naga::Expression::Math { fun, .. } = expr {
            if *fun == naga::MathFunction::Transpose {
                *fun = naga::MathFunction::Inverse;
                edited += 1;
            }
        }
    }
    assert_eq!(edited, 1);
    broken.info = Validator::new(ValidationFlags::all(), Capabilities::empty())
        .validate(&broken.module)
        .expect("inverse of a 2x2 matrix is valid IR");
    let (failures, _) = check_backends(&broken, &scratch);
    let _ = std::fs::remove_dir_all(&scratch);
    let named = |backend: &str| failures.iter().any(|f| f.contains(backend));
    assert!(
        named("backend MSL 2.0") && named("backend MSL 3.0"),
        "{failures:#?}"
    );
    assert!(named("backend HLSL"), "{failures:#?}");
    assert!(!named("SPIR-V"), "{failures:#?}");
    assert!(
        failures
            .iter()
            .all(|f| f.starts_with("probe.wgsl entry point main, backend ")),
        "{failures:#?}"
    );
}
