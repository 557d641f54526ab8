"""Train the tiny chat model for a few steps and write the logged losses as JSON.

Run alone (``python distributed_sft.py FOLDER OUT BATCH [MODE]``) or under ``torchrun --nproc_per_node 2`` (gloo on
CPU); used by test_distributed.py. ``MODE``:

* ``ddp`` (default): the engine's ``SFTTrainer`` (DDP when launched with several processes).
* ``fsdp``: the model sharded with :func:`engine.distributed.fully_shard_model` (FSDP2) and trained in a plain
  loop, for LoRA and then QLoRA (accelerate applies FSDP only on GPUs, so the Trainer cannot shard on CPU). Both
  runs' losses and saved adapters are written, and whether the NF4 weights and the LoRA weights were sharded.
"""

from __future__ import annotations

import json
import os
import sys

import torch

ROWS = [
    {"prompt": f"Add {i} and {i * 7 % 13}.", "completion": f"{i} + {i * 7 % 13} = {i + i * 7 % 13}" + " ok" * (i % 5)}
    for i in range(32)
]


def load(folder: str, **kwargs):
    from engine import FastModel

    torch.manual_seed(0)
    model, tokenizer = FastModel.from_pretrained(folder, dtype="float32", verbose=False, **kwargs)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False, random_state=0)
    return model, tokenizer


def train_sft(folder: str, out: str, per_device_batch: int) -> None:
    from engine import SFTConfig, SFTTrainer

    model, tokenizer = load(folder)
    args = SFTConfig(
        output_dir=f"{out}.run",
        max_steps=4,
        per_device_train_batch_size=per_device_batch,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        max_length=64,
        packing=False,
        padding_free=True,
        use_cpu=True,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        disable_tqdm=True,
        dataloader_drop_last=True,
    )
    trainer = SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=ROWS, args=args)
    trainer.train()
    if trainer.is_world_process_zero():
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        with open(out, "w") as fh:
            json.dump({"losses": losses, "world_size": trainer.args.world_size}, fh)


def batches(tokenizer, global_batch: int, rank: int, world: int, steps: int):
    """Per step, this rank's rows of the global batch: right-padded ``input_ids``, ``attention_mask``, ``labels``
    ``[global_batch / world, s]`` and the global number of predicted tokens (the loss's denominator)."""
    ids = [tokenizer(r["prompt"] + " " + r["completion"])["input_ids"][:64] for r in ROWS]
    pad = tokenizer.pad_token_id
    for step in range(steps):
        rows = ids[step * global_batch:(step + 1) * global_batch]
        n_items = sum(len(r) - 1 for r in rows)  # the model predicts tokens 1..n-1 of every row
        mine = rows[rank * global_batch // world:(rank + 1) * global_batch // world]
        s = max(len(r) for r in mine)
        input_ids = torch.tensor([r + [pad] * (s - len(r)) for r in mine])
        mask = torch.tensor([[1] * len(r) + [0] * (s - len(r)) for r in mine])
        labels = input_ids.masked_fill(mask == 0, -100)
        yield input_ids, mask, labels, n_items


def train_fsdp(folder: str, out: str, global_batch: int, load_in_4bit: bool) -> dict:
    """4 AdamW steps; with several ranks the model is FSDP2-sharded and each rank takes ``global_batch / world`` rows."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from engine.distributed import full_state_dict, fully_shard_model

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    model, tokenizer = load(folder, load_in_4bit=load_in_4bit)
    if world > 1:
        fully_shard_model(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for input_ids, mask, labels, n_items in batches(tokenizer, global_batch, rank, world, steps=4):
        loss = model(input_ids, attention_mask=mask, labels=labels, num_items_in_batch=n_items).loss
        (loss * world).backward()  # FSDP2 averages gradients over the ranks; the loss is already a global mean
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        losses.append(total.item())
    nf4 = [b for name, b in model.named_buffers() if "weight_nf4_" in name]
    lora = [p for name, p in model.named_parameters() if "lora_" in name]
    state = full_state_dict(model) if world > 1 else None  # a collective: every rank gathers
    adapter_dir = f"{out}.{'qlora' if load_in_4bit else 'lora'}"
    if rank == 0:
        model.save_pretrained(adapter_dir, state_dict=state)
    return {
        "losses": losses,
        "adapter": adapter_dir,
        "nf4_buffers": len(nf4),
        "nf4_sharded": any(isinstance(b, DTensor) for b in nf4),
        "lora_sharded": bool(lora) and all(isinstance(p, DTensor) for p in lora),
    }


def main(folder: str, out: str, batch: int, mode: str = "ddp") -> None:
    if mode == "ddp":
        return train_sft(folder, out, batch)
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    world = dist.get_world_size() if dist.is_initialized() else 1
    result = {"world_size": world, "lora": train_fsdp(folder, out, batch * world, False),
              "qlora": train_fsdp(folder, out, batch * world, True)}
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(out, "w") as fh:
            json.dump(result, fh)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:])
