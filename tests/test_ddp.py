"""DistributedDataParallel (2 processes, gloo, CPU): training steps with the fused model end with
the same parameters and buffers as torchvision under DDP; SyncBatchNorm conversion still works.

This file is also the worker: `python tests/test_ddp.py RANK WORLD STORE OUT`.
"""
from __future__ import annotations

import os
import subprocess
import sys

import torch

import components

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STEPS = 3


def worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist
    import torchvision
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    sys.path.insert(0, HERE)
    import resnet_fused
    from resnet_fused import training
    from numerics import randomize_bn

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    calls = [0]
    original = training.batch_norm_act_factors  # a BN training step through bn_act_train

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)
    training.batch_norm_act_factors = counted

    models = []
    for build in (resnet_fused.resnet18, torchvision.models.resnet18):
        torch.manual_seed(0)
        m = randomize_bn(build(num_classes=10), seed=1).double().train()
        models.append(m)
    ddp = [DDP(m) for m in models]
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in ddp]
    losses = []
    for step in range(STEPS):
        g = torch.Generator().manual_seed(100 * step + rank)  # each rank its own shard
        x = torch.randn(2, 3, 33, 33, generator=g, dtype=torch.float64)
        target = torch.randint(0, 10, (2,), generator=g)
        row = []
        for model, opt in zip(ddp, opts):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), target)
            loss.backward()
            opt.step()
            row.append(loss.item())
        losses.append(row)
    fused_calls = calls[0]

    # SyncBatchNorm on our model: the conversion works, BN falls back to stock SyncBatchNorm
    # (no fused call), the eval path matches torchvision's, and train mode behaves as
    # torchvision's (on CPU with a process group, both refuse: SyncBatchNorm needs a GPU).
    sync = [nn.SyncBatchNorm.convert_sync_batchnorm(m) for m in models]
    assert all(type(m.bn1) is nn.SyncBatchNorm for m in sync)
    x = torch.randn(2, 3, 33, 33, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    calls[0] = 0
    with torch.no_grad():
        eval_out = [m.eval()(x) for m in sync]
    errors = []
    for m in sync:
        try:
            m.train()(x)
            errors.append(None)
        except ValueError as e:
            errors.append(str(e))
    torch.save({"ours": models[0].state_dict(), "theirs": models[1].state_dict(),
                "losses": losses, "fused_calls": fused_calls, "sync_calls": calls[0],
                "sync_eval": eval_out, "sync_train_errors": errors}, out)
    dist.destroy_process_group()


def test_ddp_training_matches_torchvision(tmp_path):
    from resnet_fused import extension, training
    if not extension.available("cpu"):
        components.require("extension", extension.unavailable_reason("cpu"))
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        components.require("gloo", "torch.distributed with gloo is not available")
    world = 2
    store = str(tmp_path / "store")
    outs = [str(tmp_path / f"rank{r}.pt") for r in range(world)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    env[training.TRAIN_BN_ENV] = "fused"  # the kernels under DDP, whatever the size policy says
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(r), str(world),
                               store, outs[r]], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(world)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    results = [torch.load(o, weights_only=False) for o in outs]

    n_bn = 20  # resnet18's BatchNorm2d layers
    for r in results:
        assert r["fused_calls"] == STEPS * n_bn  # every BN of ours ran fused under DDP
        assert r["sync_calls"] == 0              # SyncBatchNorm: stock path
        assert r["sync_train_errors"][0] == r["sync_train_errors"][1]
        ref = r["sync_eval"][1]
        assert (r["sync_eval"][0] - ref).abs().max() <= 1e-10 * ref.abs().max()
        for (l_ours, l_theirs) in r["losses"]:
            assert abs(l_ours - l_theirs) <= 1e-10 * abs(l_theirs)
        for key, theirs in r["theirs"].items():
            ours = r["ours"][key]
            if theirs.dtype == torch.long:
                assert torch.equal(ours, theirs), key
            else:
                scale = max(theirs.abs().max().item(), 1e-30)
                assert (ours - theirs).abs().max().item() <= 1e-10 * scale, key
    # DDP keeps the parameters of both ranks identical (buffers hold each rank's last batch)
    for key, v in results[0]["ours"].items():
        if not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(v, results[1]["ours"][key]), key


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
