"""FSDP2 (`fully_shard`, gloo, 2 CPU processes) vs one process: `python tests/fsdp_train.py CASE_ID OUT.json`.

Each process holds half of the global batch; every encoder layer and the root are sharded (parameters become
DTensors); SGD for a few steps; the trained tensors (gathered) are compared with one process on the whole batch.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from peft import get_peft_model
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peft_effadapt.testing import tiny_pixel_values  # noqa: E402

from method_cases import CASES  # noqa: E402

# LR 0.1, not larger: at 0.5 RLP's first step moves rlp_A by more than its own size (1.7 vs 1.3) and each further step
# multiplies the few-ulp difference of the sharded gradient reduction by ~10 (6e-7 -> 1e-5 -> 1e-4 relative over
# three steps, measured), so the fp32 bound below would test the loss landscape's chaos, not FSDP.
STEPS, LR = 3, 0.1


def build(case_id: str):
    case = next(c for c in CASES if c.id == case_id)
    torch.manual_seed(0)
    model = get_peft_model(case.make_model(), case.make_config(init_weights=False)).train()
    inputs = case.make_inputs()
    inputs["pixel_values"] = tiny_pixel_values(batch=4)
    return case, model, inputs


def train(case, model, inputs, part=None):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    if part is not None:
        rank, world = part
        inputs = dict(inputs, pixel_values=inputs["pixel_values"].chunk(world)[rank])
    for _ in range(STEPS):
        case.train_loss(case.output(model(**inputs))).backward()
        opt.step()
        opt.zero_grad()


def trained(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
    return out


def worker(rank, world, case_id, port, queue):
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    case, model, inputs = build(case_id)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layer", "layers"):
            for block in module:
                fully_shard(block)
    # CLIP's logit_scale is a 0-d parameter, which fully_shard cannot shard: left replicated (frozen here)
    scalars = {p for p in model.parameters() if p.dim() == 0}
    assert not any(p.requires_grad for p in scalars)
    fully_shard(model, ignored_params=scalars or None)
    sharded = sum(type(p).__name__ == "DTensor" for p in model.parameters())
    train(case, model, inputs, (rank, world))
    result = trained(model)
    if rank == 0:
        queue.put(({k: v.tolist() for k, v in result.items()}, sharded))
    dist.barrier()
    dist.destroy_process_group()


def main(case_id: str, out: str):
    torch.set_num_threads(1)
    case, model, inputs = build(case_id)
    before = trained(model)
    train(case, model, inputs)
    single = trained(model)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = 29500 + os.getpid() % 500
    procs = [ctx.Process(target=worker, args=(r, 2, case_id, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    sharded_values, sharded_count = queue.get(timeout=600)
    for p in procs:
        p.join(600)
    rows = {}
    for name, ref in single.items():
        got = torch.tensor(sharded_values[name])
        rows[name] = {"max_abs_diff": float((got - ref).abs().max()), "max_abs": float(ref.abs().max()),
                      "moved": float((ref - before[name]).abs().max())}
    Path(out).write_text(json.dumps({"case": case_id, "sharded_params": sharded_count, "steps": STEPS,
                                     "exit_codes": [p.exitcode for p in procs], "rows": rows}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
