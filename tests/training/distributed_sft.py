"""Train the tiny chat model for a few steps and write the logged losses as JSON.

Run alone (``python distributed_sft.py FOLDER OUT BATCH``) or under
``torchrun --nproc_per_node 2`` (gloo on CPU); used by test_distributed.py.
"""

from __future__ import annotations

import json
import os
import sys

import torch


def main(folder: str, out: str, per_device_batch: int) -> None:
    from engine import FastModel, SFTConfig, SFTTrainer

    torch.manual_seed(0)
    model, tokenizer = FastModel.from_pretrained(folder, dtype="float32", verbose=False)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False, random_state=0)
    rows = [
        {"prompt": f"Add {i} and {i * 7 % 13}.", "completion": f"{i} + {i * 7 % 13} = {i + i * 7 % 13}" + " ok" * (i % 5)}
        for i in range(32)
    ]
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
    trainer = SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=rows, args=args)
    trainer.train()
    if trainer.is_world_process_zero():
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        with open(out, "w") as fh:
            json.dump({"losses": losses, "world_size": trainer.args.world_size}, fh)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
