# %% [markdown]
# # LFTL: source-free active domain adaptation
#
# A classifier trained on a source domain meets a shifted target domain. There is no source data, but an annotator
# may label a small budget of target samples, spent over a few rounds. LFTL ("Learn from the Learnt", ECCV 2024)
# picks the samples whose predictions *changed least informatively* between the previous and the current model
# (contrastive active sampling) and adapts with cross-entropy on the labelled anchors, SHOT's information
# maximisation, and an entropy that pulls unlabelled features towards an EMA memory of anchor features kept across
# rounds (visual persistence). This notebook runs on the bundled testbed: a tiny ResNet trained on plain/striped
# shapes in four colours, adapted to dotted/checkered shapes in four other colours.

# %%
import json
import tempfile
from pathlib import Path

import torch

import peft_effadapt  # noqa: F401  (registers the PEFT types; LFTL itself is a sampler + Trainer loop)
from peft_effadapt import ActiveAdaptationLoop, ContrastiveActiveSampler, ImagePreprocess, LFTLConfig
from peft_effadapt.testing import load_source_classifier, make_domain_dataset

torch.set_num_threads(1)
model, processor = load_source_classifier()  # with a real model: AutoModelForImageClassification + its processor
pool = make_domain_dataset("target", "train", n_per_class=16)  # the unlabelled target pool (labels = simulated oracle)
test = make_domain_dataset("target", "test", n_per_class=32)
print(pool)

# %% [markdown]
# ## Three rounds of query-and-adapt
# `LFTLConfig` holds the official hyper-parameters (Office README row); we shorten the rounds for a CPU. The oracle
# here reads the pool's `label` column; pass `oracle=callable(ids) -> labels` to have a person label instead.

# %%
config = LFTLConfig(num_rounds=3, ratio_per_round=0.03, epochs_per_round=2, lr=0.01, seed=0)
sampler = ContrastiveActiveSampler(config.cd_ratio, config.class_balance_lambda, config.class_balance_topk)
asked = []


def oracle(ids):  # stands in for a person: here it reads the hidden labels
    asked.extend(ids)
    return [pool[int(i)]["label"] for i in ids]


out = Path(tempfile.mkdtemp())
loop = ActiveAdaptationLoop(model, pool, out, config=config, sampler=sampler, oracle=oracle,
                            preprocess=ImagePreprocess(processor),
                            train_preprocess=ImagePreprocess(processor, hflip=True), eval_dataset=test,
                            show_progress=False)
print("labels per round:", loop.schedule)
history = loop.run()
for h in history:
    print(f"round {h['round']}: {h['num_labelled']:2d} labels, accuracy {h['accuracy']:.3f}, "
          f"mean per-class {h['mean_class_accuracy']:.3f}")

# %% [markdown]
# ## What was saved, and resuming
# Each round folder holds the query, the labels, the sampler's cached probabilities, the anchor memory and the
# adapted weights (safetensors + JSON, written atomically). Rerunning a finished or interrupted run continues from
# there and never asks the oracle for a label it already gave.

# %%
print(sorted(p.name for p in (out / "round_001").iterdir()))
print("round 2 query:", json.loads((out / "round_002" / "query.json").read_text())["pool_ids"])
model2, _ = load_source_classifier()
again = ActiveAdaptationLoop(model2, pool, out, config=config, oracle=oracle, preprocess=ImagePreprocess(processor),
                             eval_dataset=test, show_progress=False).run()
print("labels asked in all:", len(asked), "| same history after resuming:", again == history)
