//! GPU contexts whose storage bindings are capped at a few KiB, so that the tensors of a small
//! test exceed one binding and the ops must split them (`engine::split`). The device is opened
//! with that limit, so wgpu itself would reject a larger binding: an op that forgot to split
//! fails instead of passing unnoticed. Each op family's test file runs its split cases on such
//! a context against the CPU.

use std::sync::{Arc, Mutex, OnceLock};

use robust_dml::engine::gpu::GpuContext;
use robust_dml::engine::testing::gpu_or_skip;
use robust_dml::engine::{Device, Tensor};

/// 16 KiB: 4,096 values per binding.
pub const CAP: u64 = 16 << 10;
/// [20, 5, 9, 7]: 315 values per sample (odd, so that chunk starts need several samples to
/// meet the offset alignment), 6,300 in all, about 1.5x the cap.
pub const X: [usize; 4] = [20, 5, 9, 7];
/// A plane of 8x6 pixels sends convolutions through the im2col GEMM on CPU adapters.
pub const X_GEMM: [usize; 4] = [20, 5, 8, 6];

/// GPU contexts by binding cap, made once per cap (per test binary).
type CappedContexts = Mutex<Vec<(u64, Arc<GpuContext>)>>;

/// A GPU device whose bindings hold at most `cap` bytes, or `None` (the test skips) where no
/// GPU adapter is present and `ROBUST_DML_REQUIRE_GPU` is unset.
pub fn capped(test: &str, cap: u64) -> Option<Device> {
    static CONTEXTS: OnceLock<CappedContexts> = OnceLock::new();
    gpu_or_skip(test)?;
    let mut cache = CONTEXTS.get_or_init(Default::default).lock().unwrap();
    if let Some((_, ctx)) = cache.iter().find(|(c, _)| *c == cap) {
        return Some(Device::Gpu(ctx.clone()));
    }
    let ctx = GpuContext::with_binding_cap(cap).expect("a capped GPU context");
    assert!(ctx.max_binding_bytes() <= cap.max(256));
    cache.push((cap, ctx.clone()));
    Some(Device::Gpu(ctx))
}

/// Asserts that `t` does not fit one binding of the capped device `dev`, so that a case really
/// tests splitting.
pub fn over_cap(dev: &Device, t: &Tensor) {
    let Device::Gpu(ctx) = dev else {
        panic!("over_cap takes the capped GPU device of `capped`")
    };
    assert!(
        t.numel() as u64 * 4 > ctx.max_binding_bytes(),
        "{:?} fits one binding of {} bytes: this case would not test splitting",
        t.shape(),
        ctx.max_binding_bytes()
    );
}
