"""Peer timing of the Fashion-MNIST protocol (docs/DESIGN.md, The Fashion-MNIST protocol) in PyTorch on the CPU.

Two modes, timing only (they print seconds, R@1 as a check that training worked, and peak RSS):

- `epoch` (the default): one PAL training epoch (c2f2, Proxy Anchor, batch 128, 78 steps,
  AdamW, proxies at 100x, gradient clipping at 10) and PGD-10 (embedding shift, eps 0.1) on the
  5,000 zero-shot test images, both scenarios' attacks (every test image perturbed once;
  template matching reuses them as queries).
- `protocol`: the reference for `robust-dml experiment --preset fashion-mnist --methods
  none,at,eat`: each method trained at full scale (3 epochs of 78 steps; AT and EAT against
  PGD-5 at eps 0.1; EAT as Algorithm 1: 3 members, each on its two thirds of the data, each
  member's step attacking the sum of all members' objectives, beta 0.5), then evaluated with
  the attacks the experiment runs: PGD-10 on the 5,000 test images; PGD-1/2/5/20 and PGD-10 at
  eps 12.75/38.25/51 (/255) on 500; the metric and retrieval objectives on 500. Not
  reproduced (ours only): NMI/F1 clustering, the sanity probes and the transfer rows.

Usage: python3 benches/torch_fashion_mnist.py [epoch|protocol] [DATA_DIR]
(default DATA_DIR /usr/share/datasets/fashion-mnist; needs torch). Threads: 2, as
benches/torch_cpu.py. Never run in tests or CI.
"""
import gzip
import resource
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

MODE = sys.argv[1] if len(sys.argv) > 1 else "epoch"
DATA = sys.argv[2] if len(sys.argv) > 2 else "/usr/share/datasets/fashion-mnist"
EPS = 0.1


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


def epoch_timing():
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


# --- the full protocol ---------------------------------------------------------------------


def new_member(seed):
    torch.manual_seed(seed)
    net = C2f2()
    proxies = nn.Parameter(torch.empty(5, 128))
    nn.init.kaiming_normal_(proxies, mode="fan_out")
    opt = torch.optim.AdamW([{"params": net.parameters()},
                             {"params": [proxies], "lr": 1e-1}], lr=1e-3, weight_decay=1e-4)
    return net, proxies, opt


def pgd(nets, x, objective, steps, eps, alpha):
    """L-inf PGD from x + 0.001 N(0, 1), maximising the sum over `nets` of objective(net, adv)."""
    adv = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
    for _ in range(steps):
        adv.requires_grad_(True)
        total = sum(objective(i, net, adv) for i, net in enumerate(nets))
        grad, = torch.autograd.grad(total, [adv])
        adv = torch.min(torch.max(adv.detach() + alpha * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return adv.detach()


def shift_objective(nets, x):
    with torch.no_grad():
        clean = [net(x) for net in nets]
    return lambda i, net, adv: (net(adv) - clean[i]).pow(2).sum()


def train_step(member, nets, x, y, method):
    net, proxies, opt = member
    if method == "none":
        loss = proxy_anchor(net(x), y, proxies)
    else:
        attacked = [net] if method == "at" else nets
        adv = pgd(attacked, x, shift_objective(attacked, x), 5, EPS, 2.5 * EPS / 5)
        adv_loss = proxy_anchor(net(adv), y, proxies)
        loss = adv_loss if method == "at" else 0.5 * proxy_anchor(net(x), y, proxies) + 0.5 * adv_loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(list(net.parameters()) + [proxies], 10.0)
    opt.step()


def train(method, xtr, ytr):
    n = 3 if method == "eat" else 1
    members = [new_member(i) for i in range(n)]
    nets = [m[0] for m in members]
    if n == 1:
        parts = [torch.arange(len(xtr))]
    else:
        folds = torch.randperm(len(xtr)).chunk(n)
        parts = [torch.cat([f for j, f in enumerate(folds) if j != i]) for i in range(n)]
    for epoch in range(3):
        for i, member in enumerate(members):
            order = parts[i][torch.randperm(len(parts[i]))]
            for step in range(78):
                b = order[step * 128:(step + 1) * 128]
                train_step(member, nets, xtr[b], ytr[b], method)
    for net in nets:
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
    return nets


def embed(nets, x):
    with torch.no_grad():
        return torch.cat([F.normalize(sum(net(x[i:i + 256]) for net in nets), dim=1)
                          for i in range(0, len(x), 256)])


def recall_at_1(emb, labels):
    sim = emb @ emb.t()
    sim.fill_diagonal_(-2)
    return (labels[sim.argmax(1)] == labels).float().mean().item() * 100


def attack_all(nets, x, labels, steps, eps, objective="shift"):
    """Adversarial inputs for x in batches of 128 (the gallery: x's clean embeddings)."""
    gallery = [embed([net], x) for net in nets]
    out = []
    for i in range(0, len(x), 128):
        xb, yb = x[i:i + 128], labels[i:i + 128]
        if objective == "shift":
            obj = shift_objective(nets, xb)
        elif objective == "metric":
            centroids = [F.normalize(torch.stack([g[labels == c].mean(0) for c in range(5)]), dim=1)
                         for g in gallery]
            obj = lambda j, net, adv: proxy_anchor(net(adv), yb, centroids[j])
        else:
            targets = []
            for g in gallery:
                sim = g[i:i + 128] @ g.t()
                sim[torch.arange(len(xb)), torch.arange(i, i + len(xb))] = -2
                same = labels[None, :] == yb[:, None]
                near_other = sim.masked_fill(same, -3).argmax(1)
                near_same = sim.masked_fill(~same, -3).argmax(1)
                targets.append(g[near_other] - g[near_same])
            obj = lambda j, net, adv: (net(adv) * targets[j]).sum()
        out.append(pgd(nets, xb, obj, steps, eps, 2.5 * eps / steps))
    return torch.cat(out)


def evaluate(nets, xte, yte):
    clean = recall_at_1(embed(nets, xte), yte)
    r1 = recall_at_1(embed(nets, attack_all(nets, xte, yte, 10, EPS)), yte)
    sub = torch.arange(0, len(xte), len(xte) // 500)[:500]
    xs, ys = xte[sub], yte[sub]
    for steps in [1, 2, 5, 20]:
        attack_all(nets, xs, ys, steps, EPS)
    for eps in [12.75 / 255, 38.25 / 255, 51 / 255]:
        attack_all(nets, xs, ys, 10, eps)
    for objective in ["metric", "retrieval"]:
        attack_all(nets, xs, ys, 10, EPS, objective)
    return clean, r1


def protocol_timing():
    torch.set_num_threads(2)
    xtr, ytr = split("train", [0, 1, 2, 3, 4])
    xte, yte = split("t10k", [5, 6, 7, 8, 9])
    total = time.perf_counter()
    for method in ["none", "at", "eat"]:
        torch.manual_seed(0)
        start = time.perf_counter()
        nets = train(method, xtr, ytr)
        trained = time.perf_counter() - start
        start = time.perf_counter()
        clean, attacked = evaluate(nets, xte, yte)
        print(f"method={method} train_seconds={trained:.1f} eval_seconds={time.perf_counter() - start:.1f} "
              f"clean_r1={clean:.2f} pgd10_r1={attacked:.2f}", flush=True)
    print(f"total_seconds={time.perf_counter() - total:.1f}", flush=True)
    print(f"peak_rss_mib={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}", flush=True)


if __name__ == "__main__":
    {"epoch": epoch_timing, "protocol": protocol_timing}[MODE]()
