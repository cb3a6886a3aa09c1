//! Which kernel variant each GPU op runs. Every GPU context holds one [`KernelPolicy`], chosen
//! from its adapter when the context is opened; nothing else decides. Tests run the variants an
//! adapter would not pick by opening a second context on the same device with another policy
//! ([`crate::engine::Device::with_policy`]), so one test binary covers every variant.

/// What the adapter-dependent kernel choices are made for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelTarget {
    /// A CPU adapter (llvmpipe, WARP, SwiftShader): lanes are SIMD lanes of a few cores, so
    /// kernels prefer long per-invocation loops and vec4 loads to wide workgroups.
    CpuAdapter,
    /// A real GPU: wide workgroups, coalesced loads, workgroup memory.
    Gpu,
}

/// The GEMM kernels; all compute the same thing for every shape and stride.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmKernel {
    /// 64x64 output tile per 256-invocation workgroup, K staged through workgroup memory.
    Tiled,
    /// 16 rows x 4 columns per invocation, scalar loads: the CPU-adapter fallback.
    Scalar,
    /// 16x8 block per invocation, operands read as vec4s; needs both operands' stored rows to
    /// be a multiple of 4 long, else falls back to Scalar.
    Vec4,
}

impl GemmKernel {
    pub const ALL: [GemmKernel; 3] = [GemmKernel::Tiled, GemmKernel::Scalar, GemmKernel::Vec4];
}

/// Which GPU implementation ungrouped convolutions use; `Auto` picks by target and shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvRoute {
    Auto,
    ImplicitGemm,
    Im2colGemm,
}

/// Where the top-k of a GPU similarity chunk is selected; `Auto` picks by target and k.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopkPlacement {
    Auto,
    /// The device kernel, whenever k is within its limit.
    Device,
    /// Read back and selected on the host.
    Host,
}

/// The kernel variants a GPU context's ops run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelPolicy {
    pub target: KernelTarget,
    /// `None`: the target's default ([`KernelPolicy::gemm_kernel`]).
    pub gemm: Option<GemmKernel>,
    pub conv_route: ConvRoute,
    pub topk: TopkPlacement,
}

impl KernelPolicy {
    /// The automatic choices for a target.
    pub fn for_target(target: KernelTarget) -> Self {
        KernelPolicy {
            target,
            gemm: None,
            conv_route: ConvRoute::Auto,
            topk: TopkPlacement::Auto,
        }
    }

    /// The automatic choices for an adapter.
    pub fn for_adapter(info: &wgpu::AdapterInfo) -> Self {
        Self::for_target(if info.device_type == wgpu::DeviceType::Cpu {
            KernelTarget::CpuAdapter
        } else {
            KernelTarget::Gpu
        })
    }

    pub fn tuned_for_cpu_adapter(&self) -> bool {
        self.target == KernelTarget::CpuAdapter
    }

    /// The GEMM kernel ops use. CPU adapters pay a per-lane loop for every storage or workgroup
    /// load, so they get register blocks with vec4 loads and no workgroup memory (Vec4); those
    /// kernels' loads do not coalesce across a warp, so GPUs keep the workgroup-tiled kernel.
    pub fn gemm_kernel(&self) -> GemmKernel {
        self.gemm.unwrap_or(match self.target {
            KernelTarget::CpuAdapter => GemmKernel::Vec4,
            KernelTarget::Gpu => GemmKernel::Tiled,
        })
    }

    pub fn with_target(self, target: KernelTarget) -> Self {
        KernelPolicy { target, ..self }
    }

    pub fn with_gemm(self, gemm: GemmKernel) -> Self {
        KernelPolicy {
            gemm: Some(gemm),
            ..self
        }
    }

    pub fn with_conv_route(self, conv_route: ConvRoute) -> Self {
        KernelPolicy { conv_route, ..self }
    }

    pub fn with_topk(self, topk: TopkPlacement) -> Self {
        KernelPolicy { topk, ..self }
    }
}
