#!/usr/bin/env bash
# One command for a machine with a GPU: what the adapter is, whether the GPU tests pass on it,
# how fast the kernels and models run, and one timed MobileNetV2 epoch and PGD-10 evaluation at
# 224x224. Everything goes to one results file. Budget: under 10 minutes with prebuilt binaries.
#
#   benches/gpu-check.sh                       build with cargo here (if needed), then check
#   benches/gpu-check.sh --make-bundle B.tgz   on an x86-64 build machine: build the test and
#                                              bench binaries into B.tgz, run nothing
#   benches/gpu-check.sh --bundle B.tgz        on the GPU machine (same repository checkout):
#                                              run the prebuilt binaries, no compiling
#   --small                                    shrunk sizes and a test subset: a dry run on a
#                                              software adapter (Mesa llvmpipe)
#   --out FILE                                 results file (default gpu-check-results.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"

small=0
out="gpu-check-results.txt"
bundle=""
make_bundle=""
while [ $# -gt 0 ]; do
    case "$1" in
        --small) small=1 ;;
        --out) out="$2"; shift ;;
        --bundle) bundle="$2"; shift ;;
        --make-bundle) make_bundle="$2"; shift ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "gpu-check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done

# The test binaries, the CLI binary they call and the bench binaries, as cargo builds them.
# Cargo prints each executable in its JSON messages; those paths are what a bundle carries.
executables() {
    grep -o '"executable":"[^"]*"' | sed 's/"executable":"//; s/"$//'
}
# Test and bench harnesses live in deps/ (cargo also lists the program itself, which the CLI
# tests run and which the bundle carries separately).
harnesses() {
    executables | grep '/deps/'
}

if [ -n "$make_bundle" ]; then
    export CARGO_TERM_COLOR=never
    tests=$(cargo test --no-run --message-format=json | harnesses)
    benches=$(cargo bench --no-run --message-format=json | harnesses)
    list=$(mktemp)
    {
        for f in $tests $benches; do echo "${f#"$root"/}"; done
        # The CLI tests run the test profile's build of the program.
        echo "target/debug/robust-dml"
    } | sort -u >"$list"
    manifest="target/gpu-check-bundle.txt"
    {
        echo "build_root=$root"
        echo "commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)"
        echo "built=$(date -u +%FT%TZ) on $(uname -m)"
        echo "tests=$(for f in $tests; do basename "$f"; done | tr '\n' ' ')"
        echo "benches=$(for f in $benches; do basename "$f"; done | tr '\n' ' ')"
    } >"$manifest"
    echo "$manifest" >>"$list"
    # Test binaries carry ~150 MB of debug info each; the bundle drops it.
    stage=$(mktemp -d)
    while read -r f; do
        mkdir -p "$stage/$(dirname "$f")"
        cp "$f" "$stage/$f"
        if command -v strip >/dev/null && [ -x "$f" ]; then strip --strip-debug "$stage/$f"; fi
    done <"$list"
    bundle_path=$(realpath -m "$make_bundle")
    (cd "$stage" && tar -czf "$bundle_path" -T "$list")
    rm -rf "$stage"
    echo "gpu-check: wrote $make_bundle ($(wc -l <"$list") files). On the GPU machine, in a checkout of the same commit:"
    echo "  benches/gpu-check.sh --bundle $(basename "$make_bundle")"
    exit 0
fi

# ------------------------------------------------------------------ the Vulkan loader
have_vulkan_loader() {
    ldconfig -p 2>/dev/null | grep -q 'libvulkan\.so\.1' && return 0
    for d in ${LD_LIBRARY_PATH//:/ } /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib /usr/local/lib; do
        [ -e "$d/libvulkan.so.1" ] && return 0
    done
    return 1
}
if ! have_vulkan_loader; then
    cat >&2 <<'EOF'
gpu-check: the Vulkan loader (libvulkan.so.1) is not installed, so no GPU can be opened.
  Debian/Ubuntu:  sudo apt-get install libvulkan1
  Fedora/RHEL:    sudo dnf install vulkan-loader
  Without root:   apt-get download libvulkan1 && dpkg -x libvulkan1_*.deb "$HOME/vulkan" &&
                  export LD_LIBRARY_PATH="$HOME/vulkan/usr/lib/x86_64-linux-gnu:$LD_LIBRARY_PATH"
The GPU's own Vulkan driver (ICD) must be present as well: NVIDIA's driver package ships it
(/usr/share/vulkan/icd.d/nvidia_icd.json); AMD and Intel use Mesa (mesa-vulkan-drivers).
EOF
    exit 3
fi
icds=$(ls /usr/share/vulkan/icd.d/*.json /etc/vulkan/icd.d/*.json 2>/dev/null || true)
if [ -z "$icds" ]; then
    echo "gpu-check: the Vulkan loader is installed but no driver (ICD) is: install the GPU's driver (NVIDIA's, or mesa-vulkan-drivers)" >&2
    exit 3
fi

export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp/robust-dml-xdg-$(id -u)}"
mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
export ROBUST_DML_REQUIRE_GPU=1
export CARGO_TERM_COLOR=never

# ------------------------------------------------------------------ binaries
# bench_bin NAME: the path of a bench binary; test_bins: the test binaries.
if [ -n "$bundle" ]; then
    tar -xzf "$bundle" -C "$root"
    manifest="$root/target/gpu-check-bundle.txt"
    build_root=$(sed -n 's/^build_root=//p' "$manifest")
    built_commit=$(sed -n 's/^commit=//p' "$manifest")
    here_commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
    if [ "$built_commit" != "$here_commit" ]; then
        echo "gpu-check: warning: the bundle was built from $built_commit, this checkout is $here_commit; shaders and fixtures come from the binaries' build, tests read fixtures from here" >&2
    fi
    # Test binaries find fixtures and the CLI binary under the build machine's checkout path.
    if [ "$build_root" != "$root" ] && [ ! -e "$build_root" ]; then
        if mkdir -p "$(dirname "$build_root")" 2>/dev/null && ln -s "$root" "$build_root" 2>/dev/null; then
            echo "gpu-check: linked $build_root -> $root (the build machine's checkout path)"
        else
            echo "gpu-check: warning: cannot create $build_root; tests that read fixtures will fail (check out at that path, or build here)" >&2
        fi
    fi
    bench_bin() { ls "$root"/target/release/deps/"$1"-* 2>/dev/null | grep -v '\.d$' | head -n1; }
    test_bins() {
        for t in $(sed -n 's/^tests=//p' "$manifest"); do echo "$root/target/debug/deps/$t"; done
    }
else
    echo "gpu-check: building the tests and benches; pass --bundle to skip this on the GPU machine"
    test_list=$(cargo test --no-run --message-format=json 2>/dev/null | harnesses)
    bench_list=$(cargo bench --no-run --message-format=json 2>/dev/null | harnesses)
    bench_bin() { echo "$bench_list" | grep "/$1-" | head -n1; }
    test_bins() { echo "$test_list"; }
fi

# ------------------------------------------------------------------ the check
: >"$out"
log() { echo "$*" | tee -a "$out"; }
section() { log ""; log "=== $* ($(date -u +%T) UTC)"; }
# run_for SECONDS CMD...: runs with a time limit, appends its output, notes a failure or timeout.
run_for() {
    local limit=$1
    shift
    local started=$SECONDS status=0
    timeout --kill-after=10 "$limit" "$@" >>"$out" 2>&1 || status=$?
    case $status in
        0) log "(ok, $((SECONDS - started)) s)" ;;
        124|137) log "(TIMED OUT after $limit s: $*)"; failures=$((failures + 1)) ;;
        *) log "(FAILED with status $status after $((SECONDS - started)) s: $*)"; failures=$((failures + 1)) ;;
    esac
}
failures=0
started_all=$SECONDS

if [ "$small" = 1 ]; then
    # Shrunk: a test subset covering the shaders, the kernel variants and device memory,
    # the matmul kernels, the c2f2 model cases, a 32x32 epoch and attack.
    test_filter="shaders|ops_conv|ops_norm_pool|ops_matmul|device_memory"
    kernels_args=(matmul_1024)
    model_args=(c2f2)
    check_args=(--small)
    limits=(300 120 180 420)
else
    test_filter=""
    kernels_args=()
    model_args=()
    check_args=()
    limits=(200 90 120 170)
fi

section "machine"
log "date: $(date -u +%FT%TZ); host: $(uname -n) ($(uname -m)); kernel $(uname -r)"
log "commit: $(git rev-parse HEAD 2>/dev/null || sed -n 's/^commit=//p' "$root/target/gpu-check-bundle.txt" 2>/dev/null || echo unknown)"
log "mode: $([ "$small" = 1 ] && echo "--small (shrunk dry run)" || echo full)$([ -n "$bundle" ] && echo ", prebuilt bundle $bundle")"
log "Vulkan drivers (ICDs): $(echo $icds)"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >>"$out" 2>&1 || true
fi
if command -v vulkaninfo >/dev/null; then
    vulkaninfo --summary 2>/dev/null | sed -n '/^Devices:/,$p' >>"$out" || true
fi

section "adapter, driver, limits; one MobileNetV2 training epoch and a PGD-10 evaluation"
run_for "${limits[3]}" "$(bench_bin gpu_check)" "${check_args[@]}"

section "GPU test suite on this adapter"
for t in $(test_bins); do
    name=$(basename "$t" | sed 's/-[0-9a-f]*$//')
    if [ -n "$test_filter" ] && ! echo "$name" | grep -Eqx "$test_filter"; then
        continue
    fi
    log "--- $name"
    run_for "${limits[0]}" "$t"
done

section "cargo bench --bench kernels ${kernels_args[*]}"
run_for "${limits[1]}" "$(bench_bin kernels)" "${kernels_args[@]}"

section "cargo bench --bench model ${model_args[*]} (224x224 cases and memory notes on a real GPU)"
run_for "${limits[2]}" "$(bench_bin model)" "${model_args[@]}"

section "summary"
log "$(grep -c '^test .* ok$' "$out" || true) tests passed, $(grep -c '^test .* FAILED$' "$out" || true) failed"
grep -E '^bench .*(train_epoch|pgd10_eval|matmul_1024|mnv2_train_step_224) ' "$out" || true
log "$failures step(s) failed or timed out; $((SECONDS - started_all)) s in all"
echo "gpu-check: results in $out"
[ "$failures" = 0 ]
