"""Progress markers for the fault scripts (imported from the script's own folder): `first-step.json` when the first
step of this process starts, `saved-N` once checkpoint N is complete (`on_save` runs after the checkpoint is
written). In mode "victim" the run stalls at the end of the first step after its first checkpoint, so the harness's
SIGKILL (sent as soon as `saved-N` appears) always lands between that checkpoint and the next one, after the model
has moved past the checkpoint in memory; the stall changes no number."""

import json
import time
from pathlib import Path

from transformers import TrainerCallback


class Progress(TrainerCallback):
    def __init__(self, out: Path, mode: str):
        self.out, self.mode, self.saved = Path(out), mode, False

    def on_step_begin(self, args, state, control, **kwargs):
        first = self.out / "first-step.json"
        if not first.exists():
            first.write_text(json.dumps({"mode": self.mode, "global_step": state.global_step}))

    def on_step_end(self, args, state, control, **kwargs):
        if self.mode == "victim" and self.saved:
            time.sleep(120)  # the harness kills the process here (or during this step)

    def on_save(self, args, state, control, **kwargs):
        (self.out / f"saved-{state.global_step}").touch()
        self.saved = True
