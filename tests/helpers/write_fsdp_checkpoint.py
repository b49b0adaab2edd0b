"""Write a verl FSDP checkpoint of a model the way verl's actor does: the model sharded with
FSDP2 over WORLD ranks (gloo, CPU processes), saved by verl's own FSDPCheckpointManager.

    python write_fsdp_checkpoint.py MODEL_DIR OUT_DIR WORLD PORT
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def save(rank: int, world: int, model_dir: str, out_dir: str, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from omegaconf import OmegaConf
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from verl.utils.checkpoint.fsdp_checkpoint_manager import FSDPCheckpointManager

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # the mesh verl.workers.engine.fsdp.utils.create_device_mesh builds for the actor (fsdp_size -1), on
    # the CPU (that function asks verl for the device name, which is "cuda" even without a GPU)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=["fsdp"])
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    manager = FSDPCheckpointManager(model=model, optimizer=optimizer, lr_scheduler=None,
                                    processing_class=AutoTokenizer.from_pretrained(model_dir),
                                    checkpoint_config=OmegaConf.create({"save_contents": ["model", "optimizer"],
                                                                        "load_contents": ["model", "optimizer"]}))
    manager.save_checkpoint(local_path=out_dir, global_step=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    model_dir, out_dir, world, port = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    mp.spawn(save, args=(world, model_dir, out_dir, port), nprocs=world, join=True)
