"""
torchrun, the one place that knows about ranks: `torchrun --nproc_per_node=N train.py ...` runs one
process per GPU (NCCL) or per CPU process (gloo); docs/multi-gpu.md.
"""
import os

import torch
import torch.distributed as dist

from folders import UserError


class Ranks:
    """One process per GPU (NCCL) or per CPU process (gloo) under torchrun. Each process takes its
    share of every global batch; DistributedDataParallel averages the gradients; rank 0, the lead,
    alone validates, logs and writes files."""

    def __init__(self, cfg: dict):
        self.world, self.rank = int(os.environ.get("WORLD_SIZE", 1)), 0
        if self.world > 1:
            if cfg["device"].startswith("cuda"):
                cfg["device"] = f"cuda:{os.environ['LOCAL_RANK']}"
                torch.cuda.set_device(cfg["device"])
            if cfg["compile"] == "reduce-overhead":
                raise UserError("--compile reduce-overhead (CUDA graphs) with several processes is untested: use "
                                "--compile default with torchrun, or one process")
            dist.init_process_group("nccl" if cfg["device"].startswith("cuda") else "gloo")
            self.rank = dist.get_rank()
        self.lead = self.rank == 0

    def wrap(self, model, device):
        if self.world == 1:
            return model
        ids = [device.index] if device.type == "cuda" else None
        # the frozen weights (13 GB at the real size) are the same file in every process: not broadcast
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        DDP = torch.nn.parallel.DistributedDataParallel
        DDP._set_params_and_buffers_to_ignore_for_model(model, frozen + [n for n, _ in model.named_buffers()])
        return DDP(model, device_ids=ids)

    def gather(self, losses, bad):  # the epoch's figures over every process
        if self.world > 1:
            dist.all_reduce(losses)
            dist.all_reduce(bad, dist.ReduceOp.MAX)
            losses /= self.world
        return losses, bad

    def close(self):
        if self.world > 1:  # together: a process that leaves while another still works aborts gloo
            dist.barrier()
            dist.destroy_process_group()
