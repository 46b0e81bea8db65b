"""Saved-activation memory of one training step: resnet_fused (stages recomputing BN, adds and
ReLUs in the backward pass: $RESNET_FUSED_TRAIN_MEMORY=recompute, stage_recompute.py; and by
default, keeping what torchvision keeps) vs torchvision, NCHW and channels_last (the training
BatchNorm policy as on this machine), and torchvision with torch.utils.checkpoint around each
stage (stock PyTorch's way to trade compute for activation memory: it reruns the stages'
convolutions; `bench --train --providers checkpoint,...` times it).

What autograd keeps for the backward pass is recorded with saved-tensor hooks during the forward
pass (CPU, no GPU needed). Two figures per model:
  * saved:  bytes of every activation tensor autograd saves, counted per save (parameters
            excluded) -- what the ops ask to keep;
  * unique: bytes of the distinct storages behind them -- the memory actually held, since one
            tensor saved by two ops (a ReLU output that the next conv also saves) is stored once.
On a GPU (--device cuda) the same, plus the peak of torch.cuda.max_memory_allocated over a
forward+backward step. The training BatchNorm is the device's policy ($RESNET_FUSED_TRAIN_BN
overrides it; with stock BatchNorm a recomputing stage has nothing to recompute).

    python benchmarks/train_memory.py [--device cpu] [--batch 8] [--size 224] [--dtype float32]
writes benchmarks/results/train_memory.{json,md} (--out: another folder).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch
import torchvision

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import resnet_fused  # noqa: E402
from resnet_fused import extension, stage_recompute, training  # noqa: E402
from resnet_fused.tools.bench_train import checkpoint_stages  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")


def saved_activation_bytes(model: torch.nn.Module, x: torch.Tensor) -> dict:
    params = {p.data_ptr() for p in model.parameters()}
    saved = 0
    count = 0
    storages = {}

    def pack(t: torch.Tensor):
        nonlocal saved, count
        if t.data_ptr() not in params:
            saved += t.numel() * t.element_size()
            count += 1
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return {"saved_bytes": saved, "saved_tensors": count, "unique_bytes": sum(storages.values()),
            "unique_storages": len(storages)}


def cuda_peak_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    model(x).sum().backward()  # warm-up (cuDNN workspaces, allocator)
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model(x).sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    model.zero_grad(set_to_none=True)
    return peak


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    reason = extension.unavailable_reason(device)
    if reason is not None:
        print(f"the extension is unavailable ({reason}): 'ours' would run stock BN",
              file=sys.stderr)
        return 1
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    theirs = torchvision.models.resnet50()
    # (the reentrant checkpoint: its stage inputs go through save_for_backward, so the hooks
    # see them; the default variant holds the same tensors out of their sight)
    models = {"resnet_fused": (resnet_fused.fuse(theirs), "recompute"),
              "resnet_fused_save": (resnet_fused.fuse(theirs), "save"),
              "torchvision": (theirs, None),
              "torchvision_checkpoint": (checkpoint_stages(theirs, use_reentrant=True), None)}
    x = torch.randn(args.batch, 3, args.size, args.size, dtype=dtype).to(device)
    rows, rows_cl = {}, {}
    for name, (model, memory) in models.items():
        os.environ[stage_recompute.MEMORY_ENV] = memory or "save"
        model = model.to(device, dtype).train()  # (the models share their parameters)
        for layout, table in ((torch.contiguous_format, rows), (torch.channels_last, rows_cl)):
            model, xl = model.to(memory_format=layout), x.contiguous(memory_format=layout)
            table[name] = saved_activation_bytes(model, xl)
            if device.type == "cuda":
                table[name]["cuda_peak_bytes"] = cuda_peak_bytes(model, xl)
    os.environ.pop(stage_recompute.MEMORY_ENV)
    rows["channels_last"] = rows_cl
    result = {"model": "resnet50", "batch": args.batch, "size": args.size, "dtype": args.dtype,
              "torch": torch.__version__, "machine": platform.machine(),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "train_bn": training.train_bn_report(device),
              "extension": extension.status(), "results": rows}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "train_memory.json"), "w") as f:
        json.dump(result, f, indent=2)
    mib = lambda b: f"{b / 2**20:,.1f} MiB"  # noqa: E731
    lines = [f"# Saved activations per training step: resnet50, batch {args.batch}, "
             f"{args.size}x{args.size}, {args.dtype}",
             "",
             f"torch {torch.__version__}; {result['device']}; extension: {result['extension']}",
             "",
             "resnet_fused: $RESNET_FUSED_TRAIN_MEMORY=recompute (stages recompute BN, adds and "
             "ReLUs in the backward pass); resnet_fused, save: the default (torchvision's "
             "saved tensors); torchvision, checkpointed: torch.utils.checkpoint around each of "
             "layer1..layer4. Training BatchNorm: "
             f"{result['train_bn']}.",
             "",
             "| | resnet_fused | resnet_fused, save | torchvision | resnet_fused / torchvision "
             "| torchvision, checkpointed (/ torchvision) |",
             "|---|---:|---:|---:|---:|---:|"]
    rows_of = [("saved by the ops (per save)", "saved_bytes", "saved_tensors"),
               ("held (distinct storages)", "unique_bytes", "unique_storages"),
               ("CUDA peak over a fwd+bwd step", "cuda_peak_bytes", None)]
    for layout, table in (("", rows), ("channels_last: ", rows_cl)):
        for what, key, count in rows_of:
            if key not in table["torchvision"]:
                continue
            cells = [mib(table[n][key]) + (f" ({table[n][count]})" if count else "")
                     for n in ("resnet_fused", "resnet_fused_save", "torchvision")]
            ckpt = table["torchvision_checkpoint"][key]
            lines.append(f"| {layout}{what} | {' | '.join(cells)} | "
                         f"{table['resnet_fused'][key] / table['torchvision'][key]:.3f} | "
                         f"{mib(ckpt)} ({ckpt / table['torchvision'][key]:.3f}) |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "train_memory.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
