"""ActiveAdaptationLoop (LFTL) on the tiny MLP pool of tests/test_active_loop.py: argv = output_dir
mode(fresh|victim|resume).

90 samples, 3 classes, 3 rounds querying 4, 4 and 6 labels. The oracle is a callable that appends every call (the
queried pool ids) to `<output_dir>/oracle.jsonl` before answering from the hidden labels, so the test can count the
labels asked for. `victim` is a fresh run that, in round 2, touches `<output_dir>/mid-round-2` once VPA training has
taken two batches (after round 1's state was saved and round 2's labels were stored) and then stalls there for the
kill. Every process appends `{mode, completed_round found on disk}` to `starts.jsonl`; the returned history and the
final model state go to `final/`.
"""

import json
import sys
import time
from pathlib import Path

import torch
from datasets import ClassLabel, Dataset, Features, Sequence, Value
from safetensors.torch import save_file
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from peft_effadapt.active import ActiveAdaptationLoop, LFTLConfig, default_preprocess

torch.set_num_threads(1)
out, mode = Path(sys.argv[1]), sys.argv[2]
C = 3


class TinyClassifier(nn.Module):
    def __init__(self, dim=8, classes=C):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.classifier = nn.Linear(16, classes)

    def forward(self, x):
        return SequenceClassifierOutput(logits=self.classifier(self.body(x)))


gen = torch.Generator().manual_seed(0)
y = torch.randint(0, C, (90,), generator=gen)
x = torch.randn(90, 8, generator=gen) + 2 * nn.functional.one_hot(y, 8).float()
pool = Dataset.from_dict({"x": x.numpy(), "label": y.tolist()},
                         features=Features({"x": Sequence(Value("float32")), "label": ClassLabel(num_classes=C)}))
hidden = pool["label"]


def oracle(ids):
    with (out / "oracle.jsonl").open("a") as log:
        log.write(json.dumps([int(i) for i in ids]) + "\n")
        log.flush()
    return [hidden[int(i)] for i in ids]


current_round, batches = [0], [0]


class Loop(ActiveAdaptationLoop):
    def _train(self, r):
        current_round[0] = r
        return super()._train(r)


def train_preprocess(batch):
    if mode == "victim" and current_round[0] == 2:
        batches[0] += 1
        if batches[0] == 2:
            (out / "mid-round-2").touch()
            time.sleep(120)  # the harness kills the process here
    return default_preprocess(batch)


state_file = out / "loop" / "loop_state.json"
found = json.loads(state_file.read_text())["completed_round"] if state_file.is_file() else None
with (out / "starts.jsonl").open("a") as log:
    log.write(json.dumps({"mode": mode, "completed_round": found}) + "\n")

torch.manual_seed(0)
config = LFTLConfig(num_rounds=3, ratio_per_round=0.05, epochs_per_round=1, batch_size=16, class_balance_topk=20,
                    lr=0.05)
loop = Loop(TinyClassifier(), pool, out / "loop", config=config, oracle=oracle, train_preprocess=train_preprocess,
            show_progress=False)
history = loop.run()
(out / "final").mkdir()
(out / "final" / "history.json").write_text(json.dumps(history))
save_file({k: v.detach().contiguous() for k, v in loop.model.state_dict().items()},
          str(out / "final" / "model.safetensors"))
