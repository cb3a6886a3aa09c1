#!/usr/bin/env python3
"""robrank's own ranking-attack code on one of our c2f2 checkpoints: an independent check of
`robust-dml attack --suite ranking --profile rob28`.

    python3 benches/robrank_crosscheck.py --robrank path/to/robrank \
        --checkpoint runs/robrank-fashion/none/seed0/checkpoint.safetensors \
        --data-dir /usr/share/datasets/fashion-mnist --queries 1000 --channels grey

- It imports only robrank's `robrank/attacks/advrank*.py` from a checkout of cdluminate/robrank
  (their imports need torch, numpy, scipy, tqdm, termcolor and pytest). Never in tests or CI.
- It rebuilds the checkpoint's network in PyTorch: c2f2, the 512-d head, L2 normalisation
  (robrank's metric "N"), in eval mode.
- The database is the 10,000 test images' clean embeddings; the queries are ours
  (`--queries N`: test index i * 10000 // N, as `attack --queries N` picks them), in batches of
  128.
- Each of rob28's nine attacks runs through robrank's `AdvRank`; the scores and ERS come out as
  robrank's `tools/pjswipe.py` computes them (per-batch means averaged over batches).
- `--channels grey` gives the network one grey input channel (the first layer's weights summed
  over the three channels our checkpoints hold), so the attack perturbs the grey image, as robrank
  does. `--channels rgb` feeds three copies of it and lets each move on its own.
"""

import argparse
import gzip
import importlib
import json
import os
import struct
import sys
import time
import types

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROB28 = dict(eps=0.30196, alpha=0.011764, pgditer=32)
# (name in the table, robrank attack type, extra keyword arguments); robrank's `profile_rob28`.
SUITE = [
    ("CA+", "CA", dict(W=1, pm="+")),
    ("CA-", "CA", dict(W=1, pm="-")),
    ("QA+", "QA", dict(M=1, pm="+")),
    ("QA-", "QA", dict(M=1, pm="-")),
    ("TMA", "TMA", {}),
    ("ES", "ES", {}),
    ("LTM", "LTM", {}),
    ("GTM", "GTM", {}),
    ("GTT", "GTT", {}),
]


def load_advrank(root):
    """robrank.attacks.advrank without robrank's package __init__ (which imports its whole
    training stack): stub packages whose __path__ points into the checkout."""
    pkg_dir = os.path.join(root, "robrank")
    if not os.path.isfile(os.path.join(pkg_dir, "attacks", "advrank.py")):
        sys.exit(f"--robrank {root}: no robrank/attacks/advrank.py there; give a robrank checkout")
    pkg = types.ModuleType("robrank")
    pkg.__path__ = [pkg_dir]
    utils = types.ModuleType("robrank.utils")
    utils.rjson = lambda s: s
    attacks = types.ModuleType("robrank.attacks")
    attacks.__path__ = [os.path.join(pkg_dir, "attacks")]
    sys.modules.update({"robrank": pkg, "robrank.utils": utils, "robrank.attacks": attacks})
    return importlib.import_module("robrank.attacks.advrank").AdvRank


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        body = f.read()
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] != "F32":
            sys.exit(f"{path}: tensor {key} is {info['dtype']}, expected F32")
        a, b = info["data_offsets"]
        out[key] = torch.from_numpy(np.frombuffer(body[a:b], dtype="<f4").copy()).view(info["shape"])
    return out


def pick(weights, suffix):
    # The network's tensors, not the optimiser state saved beside them (member0/adam_m/...).
    keys = [k for k in weights if k.endswith(suffix) and "adam" not in k]
    if len(keys) != 1:
        sys.exit(f"checkpoint: expected one tensor named *{suffix}, found {keys or 'none'}")
    return weights[keys[0]]


class C2f2Embedding(nn.Module):
    def __init__(self, weights, grey):
        super().__init__()
        w1 = pick(weights, "c2f2.conv1.weight")
        self.conv1 = nn.Conv2d(1 if grey else 3, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
        self.fc = nn.Linear(64 * 7 * 7, 1024)
        emb = pick(weights, "embedding.weight")
        self.embedding = nn.Linear(1024, emb.shape[0])
        with torch.no_grad():
            self.conv1.weight.copy_(w1.sum(1, keepdim=True) if grey else w1)
            self.conv1.bias.copy_(pick(weights, "c2f2.conv1.bias"))
            self.conv2.weight.copy_(pick(weights, "c2f2.conv2.weight"))
            self.conv2.bias.copy_(pick(weights, "c2f2.conv2.bias"))
            self.fc.weight.copy_(pick(weights, "c2f2.fc.weight"))
            self.fc.bias.copy_(pick(weights, "c2f2.fc.bias"))
            self.embedding.weight.copy_(emb)
            self.embedding.bias.copy_(pick(weights, "embedding.bias"))
        # AdvRank reads the dataset's name (only its semantic-preserving variants use it).
        self.dataset = "fashion"
        self.grey = grey

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc(x.flatten(1)))
        return F.normalize(self.embedding(x))


def read_idx(path):
    with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = struct.unpack(">" + "I" * dims, data[4 : 4 + 4 * dims])
    return np.frombuffer(data[4 + 4 * dims :], dtype=np.uint8).reshape(shape)


def test_set(data_dir):
    def find(stem):
        for name in (stem, stem + ".gz"):
            p = os.path.join(data_dir, name)
            if os.path.exists(p):
                return p
        sys.exit(f"--data-dir {data_dir}: no {stem}[.gz]")

    x = read_idx(find("t10k-images-idx3-ubyte")).astype(np.float32) / 255.0
    y = read_idx(find("t10k-labels-idx1-ubyte")).astype(np.int64)
    return torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y)


def scores(name, adv):
    """One table column from AdvRank's adversarial summary (tools/pjswipe.py's reading)."""
    if name in ("CA+", "CA-", "QA+", "QA-"):
        key = next(k for k in adv if "prank" in k)
        return {name: 100.0 * adv[key]}
    if name == "TMA":
        return {"TMA": adv["Cosine-SIM"]}
    if name == "ES":
        return {"ES:D": adv["embshift"], "ES:R": adv["r@1"]}
    if name in ("LTM", "GTM"):
        return {name: 100.0 * adv["r@1"]}
    return {"GTT": 100.0 * adv["retain@4"]}


def ers(s):
    """robrank's tools/pjswipe.py: ersnormalize and the mean."""
    terms = [
        2.0 * s["CA+"],
        100.0 - s["CA-"],
        2.0 * s["QA+"],
        100.0 - s["QA-"],
        100.0 * (1.0 - s["TMA"]),
        100.0 * (2.0 - s["ES:D"]) / 2.0,
        s["ES:R"],
        s["LTM"],
        s["GTM"],
        s["GTT"],
    ]
    return sum(terms) / len(terms)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--robrank", required=True, help="a checkout of cdluminate/robrank")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data-dir", required=True, help="Fashion-MNIST's IDX files")
    ap.add_argument("--queries", type=int, default=1000, help="0 = all 10,000 test images")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--channels", choices=("grey", "rgb"), default="grey")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the scores here")
    args = ap.parse_args()
    if args.queries < 0 or args.batch_size < 1:
        sys.exit("--queries must be >= 0 and --batch-size >= 1")

    AdvRank = load_advrank(args.robrank)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    grey = args.channels == "grey"
    model = C2f2Embedding(read_safetensors(args.checkpoint), grey).eval()
    x, y = test_set(args.data_dir)
    if not grey:
        x = x.repeat(1, 3, 1, 1)
    n = x.shape[0]
    with torch.no_grad():
        db = torch.cat([model(x[i : i + 512]) for i in range(0, n, 512)])
    q = args.queries or n
    picks = torch.tensor([i * n // q for i in range(min(q, n))])
    candi = (db, y)
    r1 = np.mean([(y[torch.cdist(db[i : i + 1], db).flatten().argsort()[1]] == y[i]).item() for i in picks])
    print(f"clean R@1 on the queries {100 * r1:.2f}", flush=True)

    table = {}
    for name, kind, extra in SUITE:
        t0 = time.time()
        atk = AdvRank(model, attack_type=kind, metric="N", device="cpu", **ROB28, **extra)
        per_batch = []
        for b in range(0, len(picks), args.batch_size):
            idx = picks[b : b + args.batch_size]
            _, _, _, adv = atk(x[idx].clone(), y[idx].clone(), candi)
            per_batch.append(adv)
        mean = {k: float(np.mean([a[k] for a in per_batch])) for k in per_batch[0]}
        table.update(scores(name, mean))
        print(f"{name}: {scores(name, mean)} ({time.time() - t0:.0f} s)", flush=True)
    table["ERS"] = ers(table)
    cols = ["CA+", "CA-", "QA+", "QA-", "TMA", "ES:D", "ES:R", "LTM", "GTM", "GTT", "ERS"]
    print("| " + " | ".join(cols) + " |")
    print("| " + " | ".join(f"{table[c]:.3f}" if c in ("TMA", "ES:D") else f"{table[c]:.2f}" for c in cols) + " |")
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump({"channels": args.channels, "queries": len(picks), **table}, f, indent=1)
        os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
