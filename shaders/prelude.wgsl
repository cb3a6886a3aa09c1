// Prepended to every shader file by the engine (src/engine/gpu/shaders.rs).

// Linear workgroup index of a grid that the host folded into x/y past 65,535 workgroups.
fn wg_linear(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}
