"""A save killed half-way (SIGKILL after N bytes of the new save are written) leaves the previous save intact and
loadable, and a trainer resumes from the last complete checkpoint after such a kill; a resume never unpickles code.

The kill runs in a child process: its ``safetensors`` writer is replaced (in the child only) by one that writes the
first N bytes of the real file and then sends SIGKILL to its own process, so the process dies in the middle of
writing, as with the OOM killer or a pre-empted machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

from engine import FastModel
from engine.files import PARTIAL_MARK, StagedFolder, write_text
from engine.training.base import last_complete_checkpoint

ROOT = Path(__file__).resolve().parents[1]

#: Prepended to every child script: after ``KILL_AT`` bytes of a file whose path contains ``KILL_IN``, SIGKILL.
_KILLER = """
import os, signal, safetensors.torch as st
_real_save = st.save
def _dying_save_file(tensors, filename, metadata=None):
    data = _real_save(tensors, metadata=metadata)
    if os.environ["KILL_IN"] in str(filename):
        with open(filename, "wb") as f:
            f.write(data[: int(os.environ["KILL_AT"])])
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    with open(filename, "wb") as f:
        f.write(data)
import engine.saving
engine.saving.save_file = _dying_save_file
"""


def _run_child(script: str, kill_in: str, kill_at: int = 100) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KILL_IN": kill_in, "KILL_AT": str(kill_at), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _KILLER + textwrap.dedent(script)], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300,
    )
    return proc.returncode, proc.stderr


def _lora_model(folder):
    model, tok = FastModel.from_pretrained(str(folder), dtype="float32", max_seq_length=64, verbose=False)
    return FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False, random_state=0), tok


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and PARTIAL_MARK not in p.name}


def test_staged_folder_replaces_all_files_or_none(tmp_path):
    write_text(tmp_path / "a.txt", "old a")
    with pytest.raises(RuntimeError):
        with StagedFolder(tmp_path) as stage:
            stage.write_text("a.txt", "new a")
            stage.write_text("b.txt", "new b")
            raise RuntimeError("killed")
    assert (tmp_path / "a.txt").read_text() == "old a" and not (tmp_path / "b.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    with StagedFolder(tmp_path) as stage:
        stage.write_text("a.txt", "new a")
    assert (tmp_path / "a.txt").read_text() == "new a"


def test_killed_adapter_save_keeps_the_previous_adapter(hf_folders, tmp_path):
    folder = hf_folders["llama"]
    model, _ = _lora_model(folder)
    out = tmp_path / "adapter"
    model.save_pretrained(out)
    before = _bytes(out)

    code, err = _run_child(f"""
        import torch
        from engine import FastModel
        model, _ = FastModel.from_pretrained({str(folder)!r}, dtype="float32", max_seq_length=64, verbose=False)
        model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False, random_state=1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.fill_(0.5)
        model.save_pretrained({str(out)!r})
    """, kill_in="adapter_model.safetensors", kill_at=200)
    assert code == -signal.SIGKILL, err
    assert any(PARTIAL_MARK in p.name for p in out.iterdir()), "the child died before writing anything"
    assert _bytes(out) == before  # the previous adapter, byte for byte

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    loaded = peft.PeftModel.from_pretrained(hf, out)  # loads: PEFT sees the complete previous save
    assert sum(1 for n, _ in loaded.named_parameters() if "lora_A" in n) > 0
    model.save_pretrained(out)  # the next save clears the leftovers
    assert not any(PARTIAL_MARK in p.name for p in out.iterdir())


def test_killed_merged_save_keeps_the_previous_model(hf_folders, tmp_path):
    folder = hf_folders["llama"]
    model, _ = _lora_model(folder)
    out = tmp_path / "merged"
    model.save_pretrained_merged(out, save_method="merged_32bit")
    before = _bytes(out)

    code, err = _run_child(f"""
        from engine import FastModel
        model, _ = FastModel.from_pretrained({str(folder)!r}, dtype="float32", max_seq_length=64, verbose=False)
        model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False, random_state=1)
        model.save_pretrained_merged({str(out)!r}, save_method="merged_32bit", max_shard_size="20KB")
    """, kill_in=".shard-00002", kill_at=1000)
    assert code == -signal.SIGKILL, err
    assert _bytes(out) == before
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    expected = load_file(str(out / "model.safetensors"))
    for name, tensor in reloaded.state_dict().items():
        if name in expected:
            torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)


def test_resume_after_a_kill_uses_the_last_complete_checkpoint(tiny_chat_folder, tmp_path):
    out = tmp_path / "run"
    script = f"""
        from engine import FastModel, SFTConfig, SFTTrainer
        model, tok = FastModel.from_pretrained({str(tiny_chat_folder)!r}, dtype="float32", max_seq_length=64, verbose=False)
        model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False, random_state=0)
        rows = [{{"prompt": f"What is {{i}} plus 1?", "completion": f"{{i + 1}}."}} for i in range(24)]
        args = SFTConfig(output_dir={str(out)!r}, max_steps=3, per_device_train_batch_size=4, learning_rate=5e-3,
                         logging_steps=1, save_strategy="steps", save_steps=1, seed=0, max_length=64, use_cpu=True,
                         report_to=[])
        SFTTrainer(model=model, tokenizer=tok, train_dataset=rows, args=args).train()
    """
    code, err = _run_child(script, kill_in="checkpoint-3", kill_at=300)
    assert code == -signal.SIGKILL, err
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert not (out / "checkpoint-3" / "adapter_model.safetensors").exists()
    assert last_complete_checkpoint(out) == str(out / "checkpoint-2")

    from engine import SFTConfig, SFTTrainer

    model, tok = _lora_model(tiny_chat_folder)
    rows = [{"prompt": f"What is {i} plus 1?", "completion": f"{i + 1}."} for i in range(24)]
    args = SFTConfig(output_dir=str(out), max_steps=3, per_device_train_batch_size=4, learning_rate=5e-3,
                     logging_steps=1, save_strategy="no", seed=0, max_length=64, use_cpu=True, report_to=[])
    trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=rows, args=args)
    with pytest.warns(UserWarning, match="checkpoint-3 is incomplete"):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 3
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2

    # Nothing a resume loads is unpickled: an optimizer.pt whose pickle would run code is refused, unrun.
    marker = tmp_path / "payload-ran"

    class _Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state": _Payload()}, out / "checkpoint-2" / "optimizer.pt")
    model, tok = _lora_model(tiny_chat_folder)
    trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=rows, args=args)
    with pytest.raises(Exception, match="Weights only load failed"):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert not marker.exists()
