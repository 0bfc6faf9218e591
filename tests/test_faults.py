"""Fault injection: a training run stopped by SIGKILL and resumed from its last checkpoint ends where an
uninterrupted run ends. Uses the reusable harness in `tests/fault_injection.py`; the C-SGD, ResRep and LFTL runs are
scripts in `tests/fault_scripts/` (the Consolidator run and the harness's own check are inline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fault_injection import assert_same_tensors, finish, kill_when, start
from safetensors.torch import load_file

COUNTER = r'''
"""A toy job for the harness itself: accumulates a sum over 10 steps, checkpointing after every step."""
import json, sys, time
from pathlib import Path

out, mode = Path(sys.argv[1]), sys.argv[2]
state = json.loads((out / "checkpoint.json").read_text()) if mode == "resume" else {"step": 0, "total": 0}
while state["step"] < 10:
    state = {"step": state["step"] + 1, "total": state["total"] + state["step"] ** 2}
    tmp = out / "checkpoint.tmp"
    tmp.write_text(json.dumps(state))
    tmp.replace(out / "checkpoint.json")  # atomic: a kill never leaves half a checkpoint
    (out / f"saved-{state['step']}").touch()
    time.sleep(0.05 if mode == "resume" else 0.2)
(out / "final.json").write_text(json.dumps(state))
'''


def test_harness_kills_mid_run_and_resume_reaches_the_same_result(tmp_path):
    script = tmp_path / "counter.py"
    script.write_text(COUNTER)
    reference_dir, victim_dir = tmp_path / "reference", tmp_path / "victim"
    reference_dir.mkdir()
    victim_dir.mkdir()
    reference = start(script, [reference_dir, "fresh"])
    victim = start(script, [victim_dir, "fresh"])
    kill_when(victim, victim_dir / "saved-3")
    assert not (victim_dir / "final.json").exists()
    killed_at = json.loads((victim_dir / "checkpoint.json").read_text())["step"]
    assert 3 <= killed_at < 10
    finish(start(script, [victim_dir, "resume"], log=tmp_path / "resume.log"))
    finish(reference)
    assert (json.loads((victim_dir / "final.json").read_text())
            == json.loads((reference_dir / "final.json").read_text()) == {"step": 10, "total": 285})

TRAIN_CONSOLIDATOR = r'''
"""Trainer + Consolidator on generated images: argv = output_dir mode(fresh|resume)."""
import sys, time
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

import peft_effadapt  # noqa: F401
from peft_effadapt import ConsolidatorConfig
from peft_effadapt.testing import tiny_vit

torch.set_num_threads(1)
out, mode = Path(sys.argv[1]), sys.argv[2]
rng = np.random.default_rng(0)
labels = rng.integers(0, 3, 96)
pixels = rng.normal(0, 1, (96, 3, 32, 32)).astype(np.float32)
pixels[np.arange(96), labels] += 0.8
data = Dataset.from_dict({"pixel_values": pixels, "labels": labels}).with_format("torch")


class Progress(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        first = out / "first-step.json"
        if not first.exists():
            first.write_text(json.dumps({"mode": mode, "global_step": state.global_step}))

    def on_step_end(self, args, state, control, **kwargs):
        if mode == "fresh" and state.global_step > 4:
            time.sleep(0.3)  # widen the window between the first checkpoint and the end (no effect on numbers)

    def on_save(self, args, state, control, **kwargs):  # runs after the checkpoint is complete
        (out / f"saved-{state.global_step}").touch()


import json  # noqa: E402

torch.manual_seed(0)
model = get_peft_model(tiny_vit(num_labels=3), ConsolidatorConfig(fc_groups=[16, 8], rep_drop=0.2,
                                                                  modules_to_save=["classifier"]))
args = TrainingArguments(output_dir=str(out), max_steps=12, per_device_train_batch_size=16, learning_rate=1e-2,
                         save_strategy="steps", save_steps=4, report_to=[], use_cpu=True, seed=0, data_seed=0,
                         dataloader_num_workers=0, logging_steps=100, disable_tqdm=True)
Trainer(model=model, args=args, train_dataset=data, callbacks=[Progress()]).train(
    resume_from_checkpoint=True if mode == "resume" else None)
model.save_pretrained(out / "final")
'''


@pytest.mark.slow  # three processes that import transformers: ~20 s of CPU
def test_trainer_killed_after_first_checkpoint_resumes_to_the_same_adapter(tmp_path):
    """Consolidator with two branches and DropPath (rep_drop=0.2) under Trainer, checkpoints every 4 of 12 steps;
    SIGKILL right after the first checkpoint, resume_from_checkpoint=True: the final adapter equals the uninterrupted
    run's within 1e-6 (another process: its kernels may reduce in another order). Checkpoints hold the branches as
    trained, so the resumed run continues from the very same parameters."""
    script = tmp_path / "train_consolidator.py"
    script.write_text(TRAIN_CONSOLIDATOR)
    reference_dir, victim_dir = tmp_path / "reference", tmp_path / "victim"
    reference_dir.mkdir()
    victim_dir.mkdir()
    reference = start(script, [reference_dir, "fresh"])  # the uninterrupted run, alongside the victim
    victim = start(script, [victim_dir, "fresh"])
    kill_when(victim, victim_dir / "saved-4")
    assert not (victim_dir / "final").exists()
    (victim_dir / "first-step.json").unlink()
    finish(start(script, [victim_dir, "resume"], log=tmp_path / "resume.log"))
    finish(reference)
    assert json.loads((victim_dir / "first-step.json").read_text())["global_step"] == 4, "did not resume at step 4"
    compared = assert_same_tensors(reference_dir / "final", victim_dir / "final", atol=1e-6)
    assert compared > 1000


# -- pruning callbacks and the LFTL loop: scripts in tests/fault_scripts/ -------------------------------------------
SCRIPTS = Path(__file__).resolve().parent / "fault_scripts"


def kill_and_resume(script: str, tmp_path: Path, marker: str) -> tuple[Path, Path]:
    """Runs `script` uninterrupted (reference, mode "fresh") and, alongside, a victim (mode "victim": it stalls at a
    fixed point after writing `marker`) SIGKILLed as soon as `<victim>/<marker>` exists; then resumes the victim in
    the same folder (mode "resume"). Scripts write `first-step.json` when their first step starts
    (removed after the kill, so it then tells where the resumed run started) and `final/` at the end. Returns
    (reference folder, victim folder)."""
    reference_dir, victim_dir = tmp_path / "reference", tmp_path / "victim"
    reference_dir.mkdir()
    victim_dir.mkdir()
    reference = start(SCRIPTS / script, [reference_dir, "fresh"])
    victim = start(SCRIPTS / script, [victim_dir, "victim"])
    try:
        kill_when(victim, victim_dir / marker)
        assert not (victim_dir / "final").exists()
        (victim_dir / "first-step.json").unlink(missing_ok=True)  # the resumed run writes its own
        finish(start(SCRIPTS / script, [victim_dir, "resume"], log=tmp_path / "resume.log"))
    finally:
        if victim.process.poll() is None:
            victim.process.kill()
        finish(reference)
    return reference_dir, victim_dir


def read_json(path: Path):
    return json.loads(path.read_text())


def assert_same_plans(a: Path, b: Path) -> dict:
    """Two slimming_plan.json files: identical groups (kept channels, clusters); metadata floats within 1e-6."""
    first, second = read_json(a), read_json(b)
    assert first["groups"] == second["groups"]
    assert first.keys() == second.keys() and first["metadata"].keys() == second["metadata"].keys()
    for key, value in first["metadata"].items():
        assert second["metadata"][key] == (pytest.approx(value, rel=0, abs=1e-6) if isinstance(value, float)
                                           else value), key
    return first


@pytest.mark.slow  # three processes that import transformers: ~15 s of CPU
def test_csgd_trainer_killed_after_first_checkpoint_trims_to_the_same_model(tmp_path):
    """C-SGD on the tiny HF ResNet (k-means clusters), 12 steps, checkpoints every 4: SIGKILL right after checkpoint 4
    (during step 5, whose update is lost), then `resume_from_checkpoint=True` with
    `restore_callback_states_from_checkpoint=True`. The resumed run restarts at step 4 with the stored clusters (not
    re-clustered from the half-trained weights), and its trimmed model and slimming plan equal the uninterrupted run's
    (tensors within 1e-6 - in practice bit for bit -, kept channels and clusters exactly, in the same group order)."""
    reference, victim = kill_and_resume("train_csgd.py", tmp_path, "saved-4")
    assert read_json(victim / "first-step.json") == {"mode": "resume", "global_step": 4}, "did not resume at step 4"
    plan = assert_same_plans(reference / "final" / "slimming_plan.json", victim / "final" / "slimming_plan.json")
    assert plan["method"] == "csgd" and all(g["width"] == g["size"] // 2 for g in plan["groups"])
    compared = assert_same_tensors(reference / "final" / "model.safetensors", victim / "final" / "model.safetensors")
    assert compared > 1000
    ran_reference, ran_victim = read_json(reference / "callback.json"), read_json(victim / "callback.json")
    assert ran_victim["clusters"] == ran_reference["clusters"]
    assert [s for s, _ in ran_victim["deviation_history"]] == [2, 4, 6, 8, 10, 12]  # restored, then continued
    for (_, dv), (_, dr) in zip(ran_victim["deviation_history"], ran_reference["deviation_history"]):
        assert dv == pytest.approx(dr, rel=1e-5, abs=1e-9)


@pytest.mark.slow  # three processes that import transformers: ~15 s of CPU
def test_resrep_trainer_killed_after_first_checkpoint_converts_to_the_same_model(tmp_path):
    """ResRep on the tiny basic-block HF ResNet, masks every 2 steps after step 2, 16 steps, checkpoints every 6:
    SIGKILL right after checkpoint 6 (during step 7; checkpoint 6 already holds masked channels), then plain
    `resume_from_checkpoint=True`. The resumed run restarts at step 6 with the checkpoint's masks and counters, and
    its converted model and plan equal the uninterrupted run's (tensors within 1e-6; kept channels, mask-update count
    and target step exactly)."""
    reference, victim = kill_and_resume("train_resrep.py", tmp_path, "saved-6")
    assert read_json(victim / "first-step.json") == {"mode": "resume", "global_step": 6}, "did not resume at step 6"
    masks = {k: v for k, v in load_file(victim / "checkpoint-6" / "model.safetensors").items() if k.endswith(".mask")}
    assert masks and any((m == 0).any() for m in masks.values())  # masks set before the kill must come back
    plan = assert_same_plans(reference / "slimmed" / "slimming_plan.json", victim / "slimmed" / "slimming_plan.json")
    assert plan["method"] == "resrep" and any(g["width"] < g["size"] for g in plan["groups"])
    compared = assert_same_tensors(reference / "slimmed" / "model.safetensors",
                                   victim / "slimmed" / "model.safetensors")
    assert compared > 1000
    ran_reference, ran_victim = read_json(reference / "callback.json"), read_json(victim / "callback.json")
    assert ran_victim.pop("mask_updates") == ran_reference.pop("mask_updates") == 7  # steps 4, 6, ..., 16
    for key in ("last_update_step", "target_reached_step"):
        assert ran_victim.pop(key) == ran_reference.pop(key) is not None, key
    assert ran_victim == pytest.approx(ran_reference, rel=0, abs=1e-6)


def test_lftl_loop_killed_in_round_2_resumes_without_losing_or_repeating_a_label(tmp_path):
    """ActiveAdaptationLoop, 3 rounds (4 + 4 + 6 labels) on a tiny MLP, oracle = a callable logging every call to a
    file. SIGKILL in the middle of round 2's VPA training (round 1's state saved, round 2's labels stored, its training
    half done), then `run()` again on the same output_dir. The oracle is asked exactly once per round overall (round
    2's stored labels are reused, no id is asked twice), and the labelled ids, every round's labels, the history and the
    final weights (incl. batch-norm statistics) equal the uninterrupted run's exactly."""
    reference, victim = kill_and_resume("lftl_loop.py", tmp_path, "mid-round-2")
    starts = [json.loads(line) for line in (victim / "starts.jsonl").read_text().splitlines()]
    assert starts == [{"mode": "victim", "completed_round": None}, {"mode": "resume", "completed_round": 1}]
    assert (victim / "loop" / "round_002" / "labels.json").is_file()  # stored before the kill, so not asked again

    def oracle_calls(run):
        return [json.loads(line) for line in (run / "oracle.jsonl").read_text().splitlines()]

    calls = oracle_calls(victim)
    asked = [i for ids in calls for i in ids]
    assert [len(ids) for ids in calls] == [4, 4, 6] and len(set(asked)) == len(asked) == 14  # none lost or repeated
    assert calls == oracle_calls(reference)
    state, reference_state = (read_json(run / "loop" / "loop_state.json") for run in (victim, reference))
    assert state["completed_round"] == 3 and sorted(state["labelled_ids"]) == sorted(asked)
    assert state == reference_state  # labelled ids and labels in order, schedule, config, full history
    for r in (1, 2, 3):
        assert (read_json(victim / "loop" / f"round_{r:03d}" / "labels.json")
                == read_json(reference / "loop" / f"round_{r:03d}" / "labels.json"))
    assert read_json(victim / "final" / "history.json") == read_json(reference / "final" / "history.json")
    assert assert_same_tensors(reference / "final" / "model.safetensors", victim / "final" / "model.safetensors",
                               atol=0) > 100
    assert_same_tensors(reference / "loop" / "round_003" / "adapted.safetensors",
                        victim / "loop" / "round_003" / "adapted.safetensors", atol=0)
