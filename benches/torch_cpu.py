"""The PyTorch side of the CPU comparison (2 threads): the same cases as benches/kernels.rs and benches/model.rs.

Each case: 2 warm-up runs (the first also reported as `first_run_ms`), then 5 timed runs, or
BENCH_RUNS of them as in our benches (CPU ops are synchronous, so the clock needs no sync). Output lines:
  bench <case> median_ms=<f> min_ms=<f> max_ms=<f> [gflops=<f>]
Lines starting with `#` are information only.

Usage: python3 torch_cpu.py [CASE ...]   (needs: pip install torch torchvision)
  runs only the named cases (exact names, or a prefix ending in `*`); all by default.
"""
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

WARMUP, RUNS = 2, max(5, int(os.environ.get("BENCH_RUNS", "5")))
SELECTED = sys.argv[1:]


def wants(name):
    return not SELECTED or any(
        name.startswith(s[:-1]) if s.endswith("*") else name == s for s in SELECTED)


def case(name, run, flop=None):
    if not wants(name):
        return
    first_ms = 0.0
    for i in range(WARMUP):
        t = time.perf_counter()
        out = run()
        if i == 0:
            first_ms = (time.perf_counter() - t) * 1e3
        del out
    ms = []
    for _ in range(RUNS):
        t = time.perf_counter()
        out = run()
        ms.append((time.perf_counter() - t) * 1e3)
        del out
    ms.sort()
    med = ms[RUNS // 2]
    line = f"bench {name} median_ms={med:.3f} min_ms={ms[0]:.3f} max_ms={ms[-1]:.3f}"
    if flop is not None:
        line += f" gflops={flop / (med * 1e-3) / 1e9:.3f}"
    print(line, flush=True)
    print(f"# {name} first_run_ms={first_ms:.1f}", flush=True)


def mobilenet_v2_half(num_out=128):
    """torchvision MobileNetV2, width 0.5, classifier = plain Linear(1280, num_out) (no dropout)."""
    m = torchvision.models.mobilenet_v2(width_mult=0.5)
    m.classifier = nn.Linear(m.last_channel, num_out)
    return m


def c2f2(dim=128):
    """conv5x5(3->32, pad 2)+ReLU+maxpool2, conv5x5(32->64, pad 2)+ReLU+maxpool2, fc(3136->1024)+ReLU,
    fc(1024->dim), L2 normalisation (28x28 input)."""
    class C2f2(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 32, 5, padding=2)
            self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
            self.fc = nn.Linear(64 * 7 * 7, 1024)
            self.embedding = nn.Linear(1024, dim)

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.conv1(x)), 2)
            x = F.max_pool2d(F.relu(self.conv2(x)), 2)
            x = F.relu(self.fc(x.flatten(1)))
            return F.normalize(self.embedding(x), dim=1)
    return C2f2()


def main():
    torch.set_num_threads(2)
    torch.manual_seed(0)
    print(f"# torch {torch.__version__} torchvision {torchvision.__version__} threads={torch.get_num_threads()} "
          f"mkldnn={torch.backends.mkldnn.is_available()} cpu_capability={torch.backends.cpu.get_cpu_capability()}")

    # a. matmul 1024^3
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    with torch.no_grad():
        case("matmul_1024_fwd", lambda: a @ b, 2.0 * n ** 3)

    # b/c. conv2d 3x3 s1 p1 (dense 32->32 and depthwise 96), no bias; loss = sum(y).
    for name, c, groups in [("conv3x3_c32", 32, 1), ("dwconv3x3_c96", 96, 96)]:
        flop = 2.0 * 8 * 56 * 56 * (c * c // groups) * 9
        x = torch.randn(8, c, 56, 56)
        w = torch.randn(c, c // groups, 3, 3)
        with torch.no_grad():
            case(f"{name}_fwd", lambda: F.conv2d(x, w, padding=1, groups=groups), flop)
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        case(f"{name}_fwdbwd",
             lambda: torch.autograd.grad(F.conv2d(xg, wg, padding=1, groups=groups).sum(), [xg, wg]),
             3.0 * flop)

    # d. batch norm 2d, training mode (batch statistics + running-stat update); loss = sum(y).
    bn = nn.BatchNorm2d(96).train()
    x = torch.randn(8, 96, 56, 56, requires_grad=True)
    case("bn2d_c96_train_fwdbwd",
         lambda: torch.autograd.grad(bn(x).sum(), [x, bn.weight, bn.bias]))

    # d'. single convolutions of the whole-model cases at their shapes, the same names as
    #     benches/kernels.rs's model_layer_cases: (name, input, weight, stride, padding).
    for name, xs, ws, s, p in [
            ("c2f2_conv1", (128, 3, 28, 28), (32, 3, 5, 5), 1, 2),
            ("c2f2_conv2", (128, 32, 14, 14), (64, 32, 5, 5), 1, 2),
            ("mbv2_stem", (16, 3, 64, 64), (16, 3, 3, 3), 2, 1),
            ("mbv2_expand", (16, 8, 32, 32), (48, 8, 1, 1), 1, 0),
            ("mbv2_project", (16, 96, 16, 16), (16, 96, 1, 1), 1, 0),
            ("mbv2_dw_s2", (16, 48, 32, 32), (48, 1, 3, 3), 2, 1),
            ("mbv2_dw_s1", (16, 96, 16, 16), (96, 1, 3, 3), 1, 1)]:
        x, w, groups = torch.randn(*xs), torch.randn(*ws) * 0.1, xs[1] // ws[1]
        out = [(n + 2 * p - ws[2]) // s + 1 for n in xs[2:]]
        flop = 2.0 * xs[0] * ws[0] * out[0] * out[1] * ws[1] * ws[2] * ws[3]
        conv = lambda x, w, s=s, p=p, g=groups: F.conv2d(x, w, stride=s, padding=p, groups=g)
        with torch.no_grad():
            case(f"layer_{name}_fwd", lambda: conv(x, w), flop)
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        case(f"layer_{name}_fwd_bwd", lambda: torch.autograd.grad(conv(xg, wg).sum(), [xg, wg]), 3.0 * flop)

    # e0. c2f2 (the small CNN of the Fashion-MNIST protocol), batch 128, 3x28x28, 128-d L2-normalised
    #     embedding, MSE to a fixed target, AdamW.
    model_cases("c2f2_{}_b128_28px", c2f2, torch.rand(128, 3, 28, 28),
                F.normalize(torch.randn(128, 128), dim=1), lr=1e-3)

    # e0'. ResNet-18 -> 512 (torchvision's, fc replaced by Linear(512, 512)), batch 16, 64x64,
    #      MSE loss, AdamW: the shape of benches/model.rs's resnet18 cases.
    def resnet18_512():
        rn = torchvision.models.resnet18()
        rn.fc = nn.Linear(512, 512)
        return rn

    model_cases("resnet18_{}_b16_64px", resnet18_512, torch.rand(16, 3, 64, 64),
                torch.randn(16, 512) * 0.05, lr=1e-4)

    # e. MobileNetV2 x0.5 -> 128, batch 16, 64x64, MSE loss.
    model_cases("mbv2_{}_b16_64px", mobilenet_v2_half, torch.randn(16, 3, 64, 64),
                torch.randn(16, 128), lr=1e-3, note="mbv2_x0.5")


def model_cases(pattern, make, x, y, lr, note=None):
    """A whole model's two cases, `pattern` filled with train_step and input_grad: one training
    step (MSE to `y`, AdamW), and one PGD iteration: forward + backward w.r.t. the input only
    (parameters frozen, BatchNorm still in training mode, as in the training step)."""
    train_name, grad_name = pattern.format("train_step"), pattern.format("input_grad")
    if not (wants(train_name) or wants(grad_name)):
        return
    model = make().train()
    if note:
        print(f"# {note} params={sum(p.numel() for p in model.parameters())}")
    opt = torch.optim.AdamW(model.parameters(), lr=lr)

    def train_step():
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss

    case(train_name, train_step)
    for p in model.parameters():
        p.requires_grad_(False)
    xin = x.clone().requires_grad_()
    case(grad_name, lambda: torch.autograd.grad(F.mse_loss(model(xin), y), [xin]))


if __name__ == "__main__":
    main()
