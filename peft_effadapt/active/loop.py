"""`ActiveAdaptationLoop`: LFTL's query-and-adapt rounds over a `datasets.Dataset` pool with a `Trainer`."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from datasets import ClassLabel, Dataset
from torch import nn
from transformers import PrinterCallback, TrainingArguments, set_seed
from transformers.utils import logging

from .budget import budget_schedule
from .config import LFTLConfig
from .features import Preprocess, default_preprocess, predict
from .memory import AnchorMemory
from .metrics import classification_metrics
from .oracle import DatasetOracle, ask
from .samplers import SAMPLERS, ActiveSampler, ContrastiveActiveSampler
from .state import adapted_state, load_adapted_state, read_json, read_tensors, write_dir, write_json, write_tensors
from .trainer import VPATrainer

logger = logging.get_logger(__name__)
STATE_FILE = "loop_state.json"


def _round_dir(root: Path, r: int) -> Path:
    return root / f"round_{r:03d}"


class ActiveAdaptationLoop:
    """Source-free active domain adaptation (LFTL) of `model` on the unlabelled `pool`.

    Round 0 evaluates the source model. Each round r = 1..R then scores the unlabelled rows with the current model,
    queries `budget_schedule(...)[r-1]` of them with `sampler`, asks the oracle for their labels, and trains one VPA
    round ([`VPATrainer`], a fresh optimiser and schedule, the model continuing from the previous round) before
    evaluating overall and mean per-class accuracy (computed directly; `evaluate.load` would need the Hub).

    The adapted parameters are whatever is trainable in `model`: a peft model (LoRA, Consolidator, ...; its adapter
    is also saved per round with `save_pretrained`) or a plain model for full fine-tuning. Features for the anchor
    memory are the input of `config.feature_module` (the classifier head).

    State under `output_dir`, every file written atomically: `round_XXX/query.json` + `sampler.safetensors` right
    after the query, `labels.json` right after the oracle answers, and after training `adapted.safetensors`
    (trainable tensors + buffers), `memory.safetensors`, `metrics.json` (+ `adapter/`), then `loop_state.json`
    (completed round, labels, history). `run()` resumes from there: a stored query is never redone and a stored
    label never asked again; a round that failed restarts from the last completed round's weights and memory.

    Args:
        model: classifier returning `.logits` (B, C) (or a logits tensor).
        pool: unlabelled target data; `preprocess(batch)` maps a numpy batch of its columns to model inputs.
        output_dir: where round states go (resumed if it already holds a run).
        config: [`LFTLConfig`].
        sampler: an [`ActiveSampler`] or one of 'contrastive', 'entropy', 'margin', 'random'.
        label_column: column the default oracle reads; it is removed from every training view.
        oracle: callable(list of pool ids) -> labels, e.g. a person; default reads `label_column`.
        preprocess: batch -> model inputs for scoring and evaluation (deterministic).
        train_preprocess: batch -> model inputs for training (may augment; default: `preprocess`).
        eval_dataset: labelled evaluation set; default: the pool itself (transductive, as in the paper) when it
            has `label_column`, else no evaluation.
        num_classes: class count (default: the ClassLabel of `label_column`, else `model.config.num_labels`).
        training_args: extra `TrainingArguments` keyword arguments for every round.
        show_progress: a progress bar over rounds and the Trainer's bar within each round.
    """

    def __init__(self, model: nn.Module, pool: Dataset, output_dir: str | os.PathLike, *,
                 config: LFTLConfig | None = None, sampler: ActiveSampler | str | None = None,
                 label_column: str = "label", oracle: Callable[[list[int]], Sequence[int]] | None = None,
                 preprocess: Preprocess | None = None, train_preprocess: Preprocess | None = None,
                 eval_dataset: Dataset | None = None, num_classes: int | None = None,
                 training_args: dict | None = None, show_progress: bool = True):
        if not isinstance(pool, Dataset):
            raise TypeError(f"pool must be a datasets.Dataset, got {type(pool).__name__}.")
        if len(pool) < 2:
            raise ValueError(f"the pool needs at least 2 samples, got {len(pool)}.")
        self.config = config or LFTLConfig()
        self.model, self.output_dir = model, Path(output_dir)
        self.label_column, self.show_progress = label_column, show_progress
        self.training_args = dict(training_args or {})
        self.oracle = oracle if oracle is not None else DatasetOracle(pool, label_column)
        self.num_classes = self._num_classes(pool, eval_dataset, num_classes)
        self.pool = pool.remove_columns([label_column]) if label_column in pool.column_names else pool
        self.pool = self.pool.with_format("numpy")
        self.pool_labels = pool[label_column] if label_column in pool.column_names else None
        if eval_dataset is not None and label_column not in eval_dataset.column_names:
            raise ValueError(f"eval_dataset has no label column {label_column!r}.")
        self.eval_dataset = eval_dataset
        self.preprocess = preprocess or default_preprocess
        self.train_preprocess = train_preprocess or self.preprocess
        self.sampler = self._make_sampler(sampler)
        cfg = self.config
        self.schedule = budget_schedule(len(pool), cfg.num_rounds, cfg.ratio_per_round, cfg.total_budget)
        self.total_budget = sum(self.schedule)
        predict(model, self.pool, [0, 1], self.preprocess, 2, cfg.feature_module, self.num_classes)
        self.memory = AnchorMemory(len(pool), cfg.memory_momentum)
        self.labels: dict[int, int] = {}
        self.history: list[dict] = []
        self.completed_round = -1

    def _num_classes(self, pool: Dataset, eval_dataset: Dataset | None, num_classes: int | None) -> int:
        if num_classes is None:
            for ds in (pool, eval_dataset):
                feature = ds.features.get(self.label_column) if ds is not None else None
                if isinstance(feature, ClassLabel):
                    num_classes = feature.num_classes
                    break
        if num_classes is None:
            num_classes = getattr(getattr(self.model, "config", None), "num_labels", None)
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"cannot tell the number of classes (got {num_classes!r}); pass num_classes.")
        return num_classes

    def _make_sampler(self, sampler) -> ActiveSampler:
        cfg = self.config
        if sampler is None or sampler == "contrastive":
            return ContrastiveActiveSampler(cfg.cd_ratio, cfg.class_balance_lambda, cfg.class_balance_topk,
                                            cfg.contrast_space)
        if isinstance(sampler, str):
            if sampler not in SAMPLERS:
                raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}.")
            return SAMPLERS[sampler]()
        if not isinstance(sampler, ActiveSampler):
            raise TypeError(f"sampler must be an ActiveSampler or a name, got {type(sampler).__name__}.")
        return sampler

    # ---------------------------------------------------------------- evaluation and scoring
    def evaluate(self) -> dict[str, float]:
        """Overall and mean per-class accuracy on the evaluation set (empty dict when there is none)."""
        if self.eval_dataset is not None:
            data = self.eval_dataset.remove_columns([self.label_column]).with_format("numpy")
            labels = self.eval_dataset[self.label_column]
        elif self.pool_labels is not None:
            data, labels = self.pool, self.pool_labels
        else:
            return {}
        logits, _ = predict(self.model, data, range(len(data)), self.preprocess, self.config.eval_batch_size,
                            None, self.num_classes)
        return classification_metrics(logits.argmax(1).numpy(), labels, self.num_classes)

    def unlabelled_ids(self) -> list[int]:
        return [i for i in range(len(self.pool)) if i not in self.labels]

    # ---------------------------------------------------------------- state
    def _save_round(self, r: int, metrics: dict) -> None:
        d = _round_dir(self.output_dir, r)
        write_tensors(d / "adapted.safetensors", adapted_state(self.model))
        write_tensors(d / "memory.safetensors", self.memory.state_dict())
        if r == 0:
            write_tensors(d / "sampler.safetensors", self.sampler.state_dict())
        if hasattr(self.model, "peft_config") and hasattr(self.model, "save_pretrained"):
            write_dir(d / "adapter", lambda tmp: self.model.save_pretrained(str(tmp)))
        record = {"round": r, "num_labelled": len(self.labels), "queried": self.schedule[r - 1] if r else 0,
                  **metrics}
        write_json(d / "metrics.json", record)
        self.history.append(record)
        write_json(self.output_dir / STATE_FILE, {
            "completed_round": r, "num_rounds": self.config.num_rounds, "schedule": self.schedule,
            "sampler": getattr(self.sampler, "name", type(self.sampler).__name__), "config": self.config.to_dict(),
            "labelled_ids": list(self.labels), "labels": list(self.labels.values()), "history": self.history})
        self.completed_round = r

    def _restore(self) -> None:
        state = read_json(self.output_dir / STATE_FILE)
        if state["schedule"] != self.schedule:
            raise ValueError(f"{self.output_dir} holds a run with budget schedule {state['schedule']}, this loop "
                             f"has {self.schedule}; use another output_dir.")
        r = state["completed_round"]
        d = _round_dir(self.output_dir, r)
        load_adapted_state(self.model, read_tensors(d / "adapted.safetensors"))
        self.memory.load_state_dict(read_tensors(d / "memory.safetensors"))
        self.sampler.load_state_dict(read_tensors(d / "sampler.safetensors"))
        self.labels = dict(zip(state["labelled_ids"], state["labels"]))
        self.history, self.completed_round = state["history"], r

    # ---------------------------------------------------------------- one round
    def _query(self, r: int) -> list[int]:
        d = _round_dir(self.output_dir, r)
        if (d / "query.json").is_file():  # stored query: never re-selected
            self.sampler.load_state_dict(read_tensors(d / "sampler.safetensors"))
            return read_json(d / "query.json")["pool_ids"]
        unlabelled = self.unlabelled_ids()
        n = self.schedule[r - 1]
        if n > len(unlabelled):
            raise ValueError(f"round {r} must query {n} samples but only {len(unlabelled)} are unlabelled.")
        logits, _ = predict(self.model, self.pool, unlabelled, self.preprocess, self.config.eval_batch_size,
                            None, self.num_classes)
        selection = self.sampler.select(torch.tensor(unlabelled), torch.softmax(logits, 1), n, round_idx=r,
                                        seed=self.config.seed)
        ids = [int(i) for i in selection.pool_ids]
        if len(set(ids)) != n or set(ids) & set(self.labels):
            raise RuntimeError(f"sampler {type(self.sampler).__name__} returned repeated or labelled ids.")
        write_tensors(d / "sampler.safetensors", self.sampler.state_dict())
        write_json(d / "query.json", {"round": r, "pool_ids": ids, "scores": selection.scores,
                                      "extras": selection.extras})
        return ids

    def _label(self, r: int, ids: list[int]) -> dict[int, int]:
        path = _round_dir(self.output_dir, r) / "labels.json"
        if path.is_file():  # stored labels: the oracle is never asked again
            stored = read_json(path)
            return dict(zip(stored["pool_ids"], stored["labels"]))
        labels = ask(self.oracle, ids, self.num_classes)
        write_json(path, {"round": r, "pool_ids": ids, "labels": labels})
        return dict(zip(ids, labels))

    def _train(self, r: int) -> None:
        cfg = self.config
        kwargs = dict(output_dir=str(_round_dir(self.output_dir, r) / "trainer"), num_train_epochs=cfg.epochs_per_round,
                      per_device_train_batch_size=cfg.batch_size, learning_rate=cfg.lr, max_grad_norm=0.0,
                      seed=cfg.seed + r, save_strategy="no", report_to="none", logging_strategy="no",
                      remove_unused_columns=False, disable_tqdm=not self.show_progress,
                      dataloader_pin_memory=False)
        kwargs.update(self.training_args)
        trainer = VPATrainer(self.model, TrainingArguments(**kwargs), pool=self.pool, labels=self.labels,
                             memory=self.memory, lftl_config=cfg, train_preprocess=self.train_preprocess,
                             eval_preprocess=self.preprocess, num_classes=self.num_classes,
                             total_budget=self.total_budget)
        if not self.show_progress:
            trainer.remove_callback(PrinterCallback)
        trainer.train()
        with contextlib.suppress(OSError):  # the Trainer's folder stays empty (no mid-round checkpoints)
            os.rmdir(kwargs["output_dir"])

    def run(self) -> list[dict]:
        """Runs (or resumes) all rounds; returns the per-round records (round 0 = source model)."""
        set_seed(self.config.seed)
        if (self.output_dir / STATE_FILE).is_file():
            self._restore()
        else:
            self._save_round(0, self.evaluate())
        rounds = range(self.completed_round + 1, self.config.num_rounds + 1)
        bar = logging.tqdm(rounds, desc="LFTL rounds", disable=not self.show_progress)
        for r in bar:
            try:
                set_seed(self.config.seed + r)
                ids = self._query(r)
                new = self._label(r, ids)
                self.labels.update(new)
                self._train(r)
                self._save_round(r, self.evaluate())
            except BaseException:
                self._restore()  # the in-memory model/memory/labels return to the last completed round
                raise
            bar.set_postfix({k: round(v, 4) for k, v in self.history[-1].items() if isinstance(v, float)})
        return self.history
