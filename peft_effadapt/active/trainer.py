"""`VPATrainer`: one LFTL adaptation round as a `transformers.Trainer` (paired batches, VPA loss, SHOT optimiser).

Per step the trainer takes a shuffled unlabelled batch and the next labelled batch (labelled ids cycle through
reshuffled permutations), runs ONE forward over their concatenation (so batch-norm statistics see both; a choice the
spec leaves open) and minimises CE(labelled) + beta_im * IM(unlabelled) + beta_vpa * L_vpa(unlabelled, anchors).
`AnchorMemoryCallback` refreshes the anchor rows at every epoch start (eval mode, eval preprocessing) and, with
`memory_update="epoch+step"`, `compute_loss` also writes the labelled batch's train-mode features to THEIR pool-id
rows. `LabelledMixupCallback` runs the release's epoch-end mixup pass over the labelled samples used in that epoch.
Optimiser: SGD (momentum 0.9, Nesterov, weight decay 1e-3) with head parameters at lr * head_lr_mult and all other
trainable parameters at lr * backbone_lr_mult; schedule lr0 * (1 + gamma * t / T) ** -power with t from 1.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback

from .config import LFTLConfig
from .features import FeatureCapture, Preprocess, logits_of, model_inputs, predict
from .losses import soft_cross_entropy, vpa_loss
from .memory import AnchorMemory


class PairedStepSampler:
    """Yields, per step, (labelled pool ids, unlabelled pool ids); each `iter()` is one epoch.

    Unlabelled: all of U shuffled (default), or `unlabelled_per_epoch` ids drawn with replacement; a trailing batch
    of size 1 is dropped (the release skips such steps). Labelled: the next `batch_size` ids of a stream of
    reshuffled permutations of L. All draws come from one seeded generator, so a round is reproducible.
    """

    def __init__(self, labelled_ids, unlabelled_ids, batch_size: int, unlabelled_per_epoch: int | None, seed: int):
        self.labelled = torch.as_tensor(list(labelled_ids), dtype=torch.long)
        self.unlabelled = torch.as_tensor(list(unlabelled_ids), dtype=torch.long)
        if self.labelled.numel() + self.unlabelled.numel() < 2:
            raise ValueError("a VPA round needs at least two samples in the pool.")
        self.batch_size, self.per_epoch = batch_size, unlabelled_per_epoch
        self.generator = torch.Generator().manual_seed(seed)
        self.np_rng = np.random.default_rng(seed)
        self._stream: list[int] = []
        self.epoch_labelled: list[int] = []

    def _unlabelled_count(self) -> int:
        return self.per_epoch if self.per_epoch is not None else self.unlabelled.numel()

    def __len__(self) -> int:
        n = self._unlabelled_count() if self.unlabelled.numel() else self.labelled.numel()
        steps = math.ceil(n / self.batch_size)
        return steps - 1 if steps > 1 and n % self.batch_size == 1 else max(steps, 1)

    def _next_labelled(self) -> list[int]:
        if self.labelled.numel() == 0:
            return []
        take = min(self.batch_size, self.labelled.numel())
        while len(self._stream) < take:
            perm = torch.randperm(self.labelled.numel(), generator=self.generator)
            self._stream += self.labelled[perm].tolist()
        out, self._stream = self._stream[:take], self._stream[take:]
        return out

    def __iter__(self):
        if self.unlabelled.numel() == 0:
            order = []
        elif self.per_epoch is None:
            order = self.unlabelled[torch.randperm(self.unlabelled.numel(), generator=self.generator)].tolist()
        else:
            draw = torch.randint(self.unlabelled.numel(), (self.per_epoch,), generator=self.generator)
            order = self.unlabelled[draw].tolist()
        self.epoch_labelled = []
        for step in range(len(self)):
            unl = order[step * self.batch_size:(step + 1) * self.batch_size]
            lab = self._next_labelled()
            self.epoch_labelled += lab
            yield tuple(lab), tuple(unl)


class _PairedBatches(torch.utils.data.Dataset):
    """Builds the nested batch of one step from the pool view (which has no label column)."""

    def __init__(self, pool: Dataset, labels: dict[int, int], preprocess: Preprocess):
        self.pool, self.labels, self.preprocess = pool, labels, preprocess

    def __len__(self):
        return len(self.pool)

    def __getitem__(self, plan):
        lab, unl = plan
        batch = {"labelled_ids": torch.tensor(lab, dtype=torch.long),
                 "unlabelled_ids": torch.tensor(unl, dtype=torch.long)}
        if lab:
            batch["labelled"] = model_inputs(self.pool, lab, self.preprocess, "cpu")
            batch["labelled"]["labels"] = torch.tensor([self.labels[i] for i in lab], dtype=torch.long)
        if unl:
            batch["unlabelled"] = model_inputs(self.pool, unl, self.preprocess, "cpu")
        return batch


class AnchorMemoryCallback(TrainerCallback):
    """Epoch start: M[L] <- (1 - m) M[L] + m f(L), features from the current model in eval mode."""

    def __init__(self, trainer: VPATrainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        t = self.trainer
        if t.labelled_ids.numel():
            _, feats = predict(t.model, t.pool, t.labelled_ids.tolist(), t.eval_preprocess,
                               t.lftl.eval_batch_size, t.lftl.feature_module)
            t.memory.update(t.labelled_ids, feats)


class LabelledMixupCallback(TrainerCallback):
    """Epoch end: one shuffled pass of mixup over the labelled samples used in the epoch (weight lambda_mixup).

    lambda ~ Beta(a, a), lambda = max(lambda, 1 - lambda) per sample; floating-point inputs and one-hot labels are
    mixed with a permuted partner; the optimiser steps at its current lr and the schedule does not advance.
    """

    def __init__(self, trainer: VPATrainer):
        self.trainer = trainer

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        t = self.trainer
        cfg, sampler = t.lftl, t.step_sampler
        ids = torch.tensor(sampler.epoch_labelled, dtype=torch.long)
        if cfg.lambda_mixup == 0 or torch.unique(ids).numel() < 2:
            return
        ids = ids[torch.randperm(ids.numel(), generator=sampler.generator)]
        model = t.model
        model.train()
        for start in range(0, ids.numel(), cfg.batch_size):
            chunk = ids[start:start + cfg.batch_size].tolist()
            if len(chunk) < 2:
                continue
            inputs = model_inputs(t.pool, chunk, t.train_preprocess, args.device)
            onehot = F.one_hot(torch.tensor([t.labels[i] for i in chunk]), t.num_classes).float().to(args.device)
            perm = torch.randperm(len(chunk), generator=sampler.generator).to(args.device)
            lam = sampler.np_rng.beta(cfg.mixup_alpha, cfg.mixup_alpha, size=len(chunk))
            lam = torch.tensor(np.maximum(lam, 1 - lam), dtype=torch.float32, device=args.device)
            for key, x in inputs.items():
                if torch.is_tensor(x) and x.is_floating_point():
                    lx = lam.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
                    inputs[key] = lx * x + (1 - lx) * x[perm]
            target = lam[:, None] * onehot + (1 - lam[:, None]) * onehot[perm]
            loss = cfg.lambda_mixup * soft_cross_entropy(logits_of(model(**inputs)), target)
            loss.backward()
            t.optimizer.step()
            t.optimizer.zero_grad()


class VPATrainer(Trainer):
    """A `Trainer` for one VPA round over `pool` (a dataset WITHOUT the label column).

    The loss is cross-entropy on the labelled anchors + SHOT's information maximisation on the unlabelled rows + the
    entropy of cosine similarities to the anchor memory. [`ActiveAdaptationLoop`] builds one per round.

    Args:
        model: The model being adapted (as for `Trainer`).
        args (TrainingArguments): As for `Trainer`.
        pool (datasets.Dataset): The pool view given to `preprocess` (label column removed).
        labels (dict[int, int]): `{pool id: label}` of the labelled anchors; the unlabelled ids are all other rows
            (or `unlabelled_ids`).
        memory (AnchorMemory): The persistent anchor memory.
        lftl_config (LFTLConfig): Loss weights, optimiser, batch size, memory update mode.
        train_preprocess: Batch -> model inputs for training (may augment).
        eval_preprocess: Batch -> model inputs for evaluation (deterministic; default: `train_preprocess`).
        num_classes (int): Class count.
        unlabelled_ids (optional): The unlabelled pool ids (default: every id without a label).
        total_budget (int | None): B, for `unlabelled_per_epoch="efficient"`.
        **kwargs: Passed on to `Trainer`.
    """

    def __init__(self, model, args, *, pool: Dataset, labels: dict[int, int], memory: AnchorMemory,
                 lftl_config: LFTLConfig, train_preprocess: Preprocess, eval_preprocess: Preprocess | None = None,
                 num_classes: int, unlabelled_ids=None, total_budget: int | None = None, **kwargs):
        self.pool, self.labels, self.memory, self.lftl = pool, dict(labels), memory, lftl_config
        self.train_preprocess, self.eval_preprocess = train_preprocess, eval_preprocess or train_preprocess
        self.num_classes = num_classes
        self.labelled_ids = torch.tensor(sorted(self.labels), dtype=torch.long)
        if unlabelled_ids is None:
            unlabelled_ids = sorted(set(range(len(pool))) - set(self.labels))
        per_epoch = lftl_config.unlabelled_per_epoch
        if per_epoch == "efficient":
            n_lab = max(len(self.labels), 1)
            per_epoch = n_lab * max(math.ceil(2 * (total_budget or n_lab) / n_lab) - 1, 1)
        self.step_sampler = PairedStepSampler(self.labelled_ids.tolist(), unlabelled_ids, lftl_config.batch_size,
                                              per_epoch, args.seed)
        super().__init__(model=model, args=args, train_dataset=pool, **kwargs)
        self.capture = FeatureCapture(self.model, lftl_config.feature_module)
        self.add_callback(AnchorMemoryCallback(self))
        self.add_callback(LabelledMixupCallback(self))
        self.loss_parts: dict[str, float] = {}

    def get_train_dataloader(self) -> DataLoader:
        return DataLoader(_PairedBatches(self.pool, self.labels, self.train_preprocess), sampler=self.step_sampler,
                          batch_size=None, num_workers=0)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        lab, unl = inputs.get("labelled"), inputs.get("unlabelled")
        lab_ids = inputs["labelled_ids"]
        labels = lab.pop("labels") if lab else torch.zeros(0, dtype=torch.long, device=self.args.device)
        parts = [p for p in (lab, unl) if p]
        merged = {k: torch.cat([p[k] for p in parts]) if torch.is_tensor(parts[0][k]) else parts[0][k]
                  for k in parts[0]}
        with self.capture.active():
            outputs = model(**merged)
        logits, feats = logits_of(outputs), self.capture.features
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"the model gives {logits.shape[1]} logits per sample but the task has "
                             f"{self.num_classes} classes.")
        n_lab = lab_ids.numel()
        anchors = self.memory.rows(self.labelled_ids).to(feats.device)
        loss, self.loss_parts = vpa_loss(logits[:n_lab], labels, logits[n_lab:], feats[n_lab:], anchors,
                                         self.lftl.beta_im, self.lftl.beta_vpa, self.lftl.vpa_temperature)
        if self.lftl.memory_update == "epoch+step" and n_lab:
            self.memory.update(lab_ids.cpu(), feats[:n_lab].detach())
        return (loss, outputs) if return_outputs else loss

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            cfg = self.lftl
            head, backbone = [], []
            for name, p in (model or self.model).named_parameters():
                if p.requires_grad:
                    (head if set(name.split(".")) & set(cfg.head_modules) else backbone).append(p)
            groups = [{"params": g, "lr": cfg.lr * mult} for g, mult in
                      ((backbone, cfg.backbone_lr_mult), (head, cfg.head_lr_mult)) if g]
            if not groups:
                raise ValueError("the model has no trainable parameters to adapt.")
            self.optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                             weight_decay=cfg.weight_decay)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            gamma, power, total = self.lftl.lr_gamma, self.lftl.lr_power, max(num_training_steps, 1)
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer or self.optimizer, lambda s: (1 + gamma * (s + 1) / total) ** -power)
        return self.lr_scheduler
