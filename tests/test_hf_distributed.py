"""Multi-process training (README "Multi-process training"): torchrun with 2 CPU processes
(gloo), each training a patched model on half of every batch under DDP or FSDP2
(fully_shard), gives the losses and weights of one process training on the whole batch.

This file is also the torchrun worker: `python -m torch.distributed.run --standalone
--nproc_per_node 2 tests/test_hf_distributed.py OUT.json`.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import unigist
from unigist import GistCollator, GistConfig

from _hf_models import VOCAB, tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = GistConfig(ratio=3, window=12, num_sink=2)
ROWS, LENGTH, STEPS = 4, 48, 3


def _batch():
    """The same batch in every process. Rows have equal length (no padding, the same number
    of labels), so the mean of the per-process losses is the loss over the whole batch."""
    g = torch.Generator().manual_seed(1234)
    collate = GistCollator(CFG.replace(gist_token_id=VOCAB))
    return collate([torch.randint(0, VOCAB, (LENGTH,), generator=g) for _ in range(ROWS)])


def train(rank: int = 0, world: int = 1, wrap=None) -> dict:
    """``STEPS`` SGD steps; rank ``rank`` of ``world`` takes its slice of every batch's rows.
    Returns the whole-batch loss of every step and the final weights of one layer."""
    model = tiny_model("llama", seed=7)
    unigist.patch_model(model, None, CFG)
    model.train()
    if wrap is not None:
        model = wrap(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    per = ROWS // world
    part = {k: v[rank * per : (rank + 1) * per] for k, v in _batch().items()}
    losses = []
    for _ in range(STEPS):
        loss = model(**part).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        loss = loss.detach()
        if world > 1:
            torch.distributed.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
    inner = model.module if hasattr(model, "module") else model
    w = inner.model.layers[1].self_attn.q_proj.weight
    w = w.full_tensor() if hasattr(w, "full_tensor") else w  # FSDP2 shards it (a DTensor)
    return {"losses": losses, "q_proj": w.detach().flatten()[:64].tolist()}


def _ddp(model):
    return torch.nn.parallel.DistributedDataParallel(model)


def _fsdp2(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _worker(out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    # Both wrappers in one launch: starting the processes costs more than the training.
    result = {mode: train(rank, world, wrap) for mode, wrap in (("ddp", _ddp), ("fsdp2", _fsdp2))}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def test_two_processes_train_like_one(tmp_path):
    out = tmp_path / "result.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         os.path.abspath(__file__), str(out)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    one = train()
    assert one["losses"][-1] < one["losses"][0] - 0.1  # it trained: later steps compare updated weights
    for mode, got in results.items():
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{mode}: {m}")
        torch.testing.assert_close(torch.tensor(got["q_proj"]), torch.tensor(one["q_proj"]), rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{mode}: {m}")


if __name__ == "__main__":
    _worker(sys.argv[1])
