"""Peer timing of the Fashion-MNIST protocol (docs/DESIGN.md, The Fashion-MNIST protocol) in PyTorch on the CPU:
one PAL training epoch (c2f2, Proxy Anchor, batch 128, 78 steps, AdamW, proxies at 100x, gradient
clipping at 10) and PGD-10 (embedding shift, eps 0.1) on the 5,000 zero-shot test images, both
scenarios' attacks (every test image perturbed once; template matching reuses them as queries).
Timing only: it prints seconds and peak RSS, not metrics. Never run in tests or CI.

Usage: python3 benches/torch_fashion_mnist.py [DATA_DIR] (default /usr/share/datasets/fashion-mnist;
needs torch). Threads: 2, as benches/torch_cpu.py.
"""
import gzip
import resource
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DATA = sys.argv[1] if len(sys.argv) > 1 else "/usr/share/datasets/fashion-mnist"


def idx(name):
    with gzip.open(f"{DATA}/{name}", "rb") as f:
        raw = f.read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)


def split(prefix, classes):
    x, y = idx(f"{prefix}-images-idx3-ubyte.gz"), idx(f"{prefix}-labels-idx1-ubyte.gz")
    keep = np.isin(y, classes)
    x = torch.tensor(x[keep], dtype=torch.float32).div(255).unsqueeze(1).repeat(1, 3, 1, 1)
    return x, torch.tensor(y[keep], dtype=torch.long) - min(classes)


class C2f2(nn.Module):
    def __init__(self, dim=128):
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


def proxy_anchor(emb, labels, proxies, alpha=32.0, delta=0.1):
    cos = emb @ F.normalize(proxies, dim=1).t()
    pos = F.one_hot(labels, proxies.shape[0]).float()
    neg = 1 - pos
    pos_exp = torch.exp(-alpha * (cos - delta)) * pos
    neg_exp = torch.exp(alpha * (cos + delta)) * neg
    with_pos = (pos.sum(0) > 0).sum().clamp(min=1)
    return (torch.log1p(pos_exp.sum(0)).sum() / with_pos
            + torch.log1p(neg_exp.sum(0)).sum() / proxies.shape[0])


def main():
    torch.set_num_threads(2)
    torch.manual_seed(0)
    xtr, ytr = split("train", [0, 1, 2, 3, 4])
    xte, _ = split("t10k", [5, 6, 7, 8, 9])
    net = C2f2()
    proxies = nn.Parameter(torch.randn(5, 128))
    opt = torch.optim.AdamW([{"params": net.parameters()},
                             {"params": [proxies], "lr": 1e-1}], lr=1e-3, weight_decay=1e-4)
    order = torch.randperm(len(xtr))
    start = time.perf_counter()
    for step in range(78):
        b = order[step * 128:(step + 1) * 128]
        opt.zero_grad(set_to_none=True)
        loss = proxy_anchor(net(xtr[b]), ytr[b], proxies)
        loss.backward()
        nn.utils.clip_grad_norm_(list(net.parameters()) + [proxies], 10.0)
        opt.step()
    print(f"pal_epoch_seconds={time.perf_counter() - start:.2f} steps=78 batch=128", flush=True)

    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    eps, steps = 0.1, 10
    alpha = eps / 4
    start = time.perf_counter()
    for i in range(0, len(xte), 128):
        x = xte[i:i + 128]
        with torch.no_grad():
            clean = net(x)
        adv = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
        for _ in range(steps):
            adv.requires_grad_(True)
            shift = (net(adv) - clean).pow(2).sum()
            grad, = torch.autograd.grad(shift, [adv])
            adv = torch.min(torch.max(adv.detach() + alpha * grad.sign(), x - eps), x + eps).clamp(0, 1)
    print(f"pgd10_seconds={time.perf_counter() - start:.2f} images={len(xte)}", flush=True)
    print(f"peak_rss_mib={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}", flush=True)


if __name__ == "__main__":
    main()
