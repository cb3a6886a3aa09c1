#!/usr/bin/env python3
"""Convert a PyTorch checkpoint (.pth / .pt state dict) into a safetensors file that
`robust-dml --pretrained` / `robust-dml embed --weights` loads.

Run it on your own machine (needs `pip install torch safetensors`); the program itself never
runs Python.

    python weights/convert_pth.py mobilenet_v2-b0353104.pth weights/mobilenet_v2.safetensors
    python weights/convert_pth.py bn_inception-52deb4733.pth weights/bn_inception.safetensors --dtype bf16

Keys are kept as they are (torchvision, timm and Cadene names all load); a wrapping
`state_dict` / `model` entry and `module.` prefixes are unwrapped; `num_batches_tracked` is dropped.
"""
import argparse

import torch
from safetensors.torch import save_file


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="PyTorch checkpoint (.pth/.pt)")
    ap.add_argument("dst", help="output .safetensors")
    ap.add_argument("--dtype", choices=["f32", "f16", "bf16"], default="f32")
    args = ap.parse_args()
    obj = torch.load(args.src, map_location="cpu", weights_only=False)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if hasattr(obj, "state_dict"):
        obj = obj.state_dict()
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    out = {}
    for k, v in obj.items():
        if not torch.is_tensor(v) or k.endswith("num_batches_tracked"):
            continue
        k = k[len("module."):] if k.startswith("module.") else k
        out[k] = v.detach().to(dtype).contiguous()
    save_file(out, args.dst)
    print(f"wrote {len(out)} tensors to {args.dst} ({args.dtype})")


if __name__ == "__main__":
    main()
