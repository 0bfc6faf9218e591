"""CLIP / SigLIP zero-shot and prompt-learned image classification: class names and a template in, logits out."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.utils import ModelOutput

from ..metrics import load_metric
from ..prompting import (
    CLIP_TEXT,
    SIGLIP_TEXT,
    ContextPromptLayer,
    active_prompt_config,
    placeholder_prompt_ids,
    template_prompt_ids,
    token_prompt_ids,
)
from ..prompting.text import PromptBatch
from .clip import dual_encoder_of, is_siglip


@dataclass
class CLIPClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


def projected_features(output) -> torch.Tensor:
    """`get_text_features`/`get_image_features` return a ModelOutput in transformers 5.x: take `pooler_output`."""
    return output if torch.is_tensor(output) else output.pooler_output


def sigmoid_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """SigLIP's loss on one-hot labels: -sum_c log sigmoid(z_ic * logits_ic), z = +1 for the label and -1 for every
    other class, averaged over images (the formula of `SiglipModel(return_loss=True)`, images x classes)."""
    signs = 2.0 * nn.functional.one_hot(labels, logits.shape[-1]).to(logits.dtype) - 1.0
    return -nn.functional.logsigmoid(signs * logits).sum(dim=-1).mean()


class CLIPZeroShotClassifier(nn.Module):
    """Classifies images against a list of class names with a CLIP or SigLIP model.

    - plain `CLIPModel` (or a PeftModel with its adapter disabled / of another method): prompts are
      `template.format(name)` (zero-shot CLIP);
    - PeftModel with an active prompt adapter (CoOp, RLP, QPrompt, MaPLe, CoCoOp): prompts are
      "[BOS] X*n {name}{suffix} [EOS]" and the adapter writes its context at the placeholders (CoCoOp: per image,
      through the adapted model's forward).

    `forward(pixel_values, labels=None)` returns `loss` (cross-entropy) and `logits` = exp(logit_scale) * cos, so the
    classifier trains under `transformers.Trainer`. On a `SiglipModel` the head is SigLIP's own: `logits` =
    exp(logit_scale) * cos + logit_bias and `loss` is its sigmoid loss on one-hot labels (`sigmoid_loss`); prompts
    follow SigLIP's layout (no BOS, "X*n {name}{suffix} </s>" padded to max_length, no attention mask). Text features
    are cached in eval mode and recomputed whenever the class names, any text-tower or adapter parameter (in-place
    updates, loads), the active adapter, the disabled state or the merge state change.
    `set_class_names(names)` switches to other classes (e.g. the novel ones).

    Args:
        model (nn.Module): A `CLIPModel` / `SiglipModel`, or a PeftModel around one.
        tokenizer (optional): The model's tokenizer; not needed with the token-id arguments below.
        class_names (Sequence[str] | None): The classes, in label order.
        template (str): The zero-shot prompt, used without an active prompt adapter.
        class_token_ids (list[list[int]] | None): Tokenizer-free use (tests, custom vocabularies): ids of
            "{name}{suffix}" per class.
        template_token_ids (list[int] | None): Ids of the template's words before the class (zero-shot prompts).
        special_token_ids (tuple[int, int, int] | None): `(bos, eos, pad)`; SigLIP: bos is ignored, give None.

    Raises:
        TypeError: The model is not a CLIP or SigLIP model (e.g. a ViT).
        ValueError: Neither a tokenizer nor token ids.

    Example:
        ```python
        import torch
        from peft_effadapt import CLIPZeroShotClassifier
        from peft_effadapt.testing import load_tiny_clip

        clip, processor = load_tiny_clip()
        classifier = CLIPZeroShotClassifier(clip, processor.tokenizer, ["circle", "square", "star"])
        print(classifier(torch.randn(2, 3, 32, 32)).logits.shape)  # (2, 3)
        ```
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer=None,
        class_names: Sequence[str] | None = None,
        template: str = "a photo of a {}.",
        *,
        class_token_ids: list[list[int]] | None = None,
        template_token_ids: list[int] | None = None,
        special_token_ids: tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__()
        dual_encoder_of(model, "CLIPZeroShotClassifier")
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.template_token_ids = template_token_ids
        self.special_token_ids = special_token_ids
        self.class_names: list[str] = []
        self.class_token_ids = None
        self._cache: tuple[tuple, torch.Tensor, list] | None = None
        if class_names is not None or class_token_ids is not None:
            self.set_class_names(class_names, class_token_ids=class_token_ids)

    # -- class names ----------------------------------------------------------------------------------------------
    def set_class_names(self, class_names: Sequence[str] | None = None, template: str | None = None, *,
                        class_token_ids: list[list[int]] | None = None) -> None:
        if class_token_ids is None and self.tokenizer is None:
            raise ValueError("give a tokenizer, or class_token_ids for tokenizer-free use.")
        if class_names is None:
            if class_token_ids is None:
                raise ValueError("class_names (or class_token_ids) are required.")
            class_names = [f"class_{i}" for i in range(len(class_token_ids))]
        names = [str(n).replace("_", " ") for n in class_names]
        if not names:
            raise ValueError("at least one class name is needed.")
        if class_token_ids is not None and len(class_token_ids) != len(names):
            raise ValueError(f"{len(class_token_ids)} class_token_ids rows for {len(names)} class names.")
        config = active_prompt_config(self.model)
        if config is not None and config.csc and len(names) != config.num_classes:
            raise ValueError(
                f"the adapter has a class-specific context for {config.num_classes} classes and cannot classify "
                f"{len(names)} other classes (novel classes need a unified context, csc=False)."
            )
        self.class_names = names
        self.class_token_ids = class_token_ids
        if template is not None:
            self.template = template
        self.prompts()  # validates that every class fits the text context now, not at the first forward
        self.clear_cache()

    def clear_cache(self) -> None:
        self._cache = None

    @property
    def clip(self) -> nn.Module:
        """The CLIPModel or SiglipModel (the base model of a PeftModel)."""
        return dual_encoder_of(self.model, type(self).__name__)

    @property
    def max_length(self) -> int:
        return self.clip.config.text_config.max_position_embeddings

    @property
    def family(self):
        return SIGLIP_TEXT if is_siglip(self.clip) else CLIP_TEXT

    def _prompt_layer_active(self) -> bool:
        layers = [m for m in self.model.modules() if isinstance(m, ContextPromptLayer)]
        return bool(layers) and not any(m.disable_adapters for m in layers)

    def prompts(self) -> PromptBatch:
        """The tokenised prompts of the current class names (placeholder format if a prompt adapter is active)."""
        if not self.class_names:
            raise ValueError("no class names set: call set_class_names(names) first.")
        config = active_prompt_config(self.model)
        if config is not None and self._prompt_layer_active():
            if self.tokenizer is not None and self.class_token_ids is None:
                return placeholder_prompt_ids(self.class_names, config.n_ctx, config.placeholder_token_id,
                                              tokenizer=self.tokenizer, suffix=config.class_template_suffix,
                                              max_length=self.max_length, family=self.family)
            bos, eos, pad = self._special()
            return placeholder_prompt_ids(self.class_names, config.n_ctx, config.placeholder_token_id,
                                          class_token_ids=self.class_token_ids, bos_id=bos, eos_id=eos, pad_id=pad,
                                          max_length=self.max_length, family=self.family)
        if self.tokenizer is not None and self.class_token_ids is None:
            return template_prompt_ids(self.class_names, self.template, self.tokenizer, self.max_length, self.family)
        return token_prompt_ids(self.class_names, self.class_token_ids, list(self.template_token_ids or []),
                                self._special(), self.max_length, self.family)

    def _special(self) -> tuple[int, int, int]:
        if self.special_token_ids is None:
            raise ValueError("tokenizer-free use needs special_token_ids=(bos, eos, pad).")
        return tuple(self.special_token_ids)

    # -- features -------------------------------------------------------------------------------------------------
    def _text_params(self) -> list[torch.Tensor]:
        """Text tower and projection (SigLIP's projection, `text_model.head`, is inside the text tower)."""
        clip = self.clip
        projection = getattr(clip, "text_projection", None)
        return list(clip.text_model.parameters()) + (list(projection.parameters()) if projection is not None else [])

    def _state_key(self) -> tuple:
        params = tuple((id(p), p._version) for p in self._text_params())
        layers = tuple(
            (m.disable_adapters, tuple(m.active_adapters), tuple(m.merged_adapters))
            for m in self.model.modules() if isinstance(m, BaseTunerLayer)
        )
        return params, layers, id(self.class_token_ids), tuple(self.class_names), self.template

    def _trainable_text_params(self) -> list[torch.Tensor]:
        return [p for p in self._text_params() if p.requires_grad]

    def _cache_valid(self, key: tuple) -> bool:
        if self._cache is None or self._cache[0] != key:
            return False
        # Version counters miss some in-place updates (e.g. fused optimizers), so trainable tensors (small for
        # prompt methods) are compared by value as well.
        snapshot = self._cache[2]
        params = self._trainable_text_params()
        return len(snapshot) == len(params) and all(torch.equal(a, b) for a, b in zip(snapshot, params))

    def text_features(self) -> torch.Tensor:
        """Normalised class text features (C x D); cached in eval mode."""
        use_cache = not self.training
        key = self._state_key() if use_cache else None
        if use_cache and self._cache_valid(key):
            return self._cache[1]
        batch = self.prompts()
        device = self._text_params()[-1].device
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.training):
            feats = projected_features(self.model.get_text_features(input_ids=batch.input_ids.to(device),
                                                           attention_mask=batch.attention_mask.to(device)))
            feats = nn.functional.normalize(feats, dim=-1)
        if use_cache:
            feats = feats.detach()
            self._cache = (key, feats, [p.detach().clone() for p in self._trainable_text_params()])
        return feats

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        feats = projected_features(self.model.get_image_features(pixel_values=pixel_values))
        return nn.functional.normalize(feats, dim=-1)

    def _image_conditioned(self) -> bool:
        """True when the active prompt adapter shifts the context per image (CoCoOp): text features are then computed
        per image by the adapted model's own forward, never cached."""
        return self._prompt_layer_active() and any(
            getattr(m, "image_conditioned", False) and m.conditioned_adapter() is not None
            for m in self.model.modules() if isinstance(m, ContextPromptLayer))

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs) -> CLIPClassifierOutput:
        if self._image_conditioned():
            logits = self.conditioned_logits(pixel_values, *self._prompt_tensors())
        else:
            logits = self.logits(pixel_values, self.text_features())
        return self.output(logits, labels)

    def _prompt_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.prompts()
        device = self._text_params()[-1].device
        return batch.input_ids.to(device), batch.attention_mask.to(device)

    def logits(self, pixel_values: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """exp(logit_scale) * cos(image, class text features `text`) (+ SigLIP's logit_bias)."""
        clip = self.clip
        image = self.image_features(pixel_values)
        logits = clip.logit_scale.exp().to(image.dtype) * image @ text.to(image.dtype).T
        return logits + clip.logit_bias.to(image.dtype) if is_siglip(clip) else logits

    def conditioned_logits(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                           attention_mask: torch.Tensor) -> torch.Tensor:
        """The adapted model's own image-text logits for image-conditioned prompts (CoCoOp)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          pixel_values=pixel_values).logits_per_image

    def output(self, logits: torch.Tensor, labels: torch.Tensor | None) -> CLIPClassifierOutput:
        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            loss = sigmoid_loss(logits, labels) if is_siglip(self.clip) else nn.functional.cross_entropy(logits, labels)
        return CLIPClassifierOutput(loss=loss, logits=logits)

    def inference_module(self) -> nn.Module:
        """The classifier as deployed, what `peft_effadapt.compile_for_inference` compiles: the class text features
        computed once now (for CoOp, RLP, QPrompt and MaPLe the prompt's whole text-side effect) and kept as a
        constant, so a forward runs the image tower and one matmul; CoCoOp conditions its prompts on the image, so
        its deployed form keeps the tokenised prompts and runs the adapted model. Build it again after changing
        class names or the adapter."""
        self.eval()
        with torch.no_grad():
            if self._image_conditioned():
                return ConditionedPromptClassifier(self, *self._prompt_tensors())
            return CachedTextClassifier(self, self.text_features())

    @torch.no_grad()
    def predict(self, pixel_values: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        was_training = self.training
        self.eval()
        try:
            return torch.cat([self(pixel_values[i:i + batch_size]).logits.argmax(-1)
                              for i in range(0, len(pixel_values), batch_size)])
        finally:
            self.train(was_training)


class CachedTextClassifier(nn.Module):
    """`CLIPZeroShotClassifier` with its class text features fixed (a non-persistent buffer): forward(pixel_values,
    labels=None) -> CLIPClassifierOutput."""

    def __init__(self, classifier: CLIPZeroShotClassifier, text_features: torch.Tensor) -> None:
        super().__init__()
        self.classifier = classifier
        self.register_buffer("text_features", text_features.detach().clone(), persistent=False)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs) -> CLIPClassifierOutput:
        return self.classifier.output(self.classifier.logits(pixel_values, self.text_features), labels)


class ConditionedPromptClassifier(nn.Module):
    """`CLIPZeroShotClassifier` with image-conditioned prompts (CoCoOp) and its tokenised class prompts fixed
    (non-persistent buffers): forward(pixel_values, labels=None) -> CLIPClassifierOutput."""

    def __init__(self, classifier: CLIPZeroShotClassifier, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor) -> None:
        super().__init__()
        self.classifier = classifier
        self.register_buffer("input_ids", input_ids, persistent=False)
        self.register_buffer("attention_mask", attention_mask, persistent=False)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs) -> CLIPClassifierOutput:
        logits = self.classifier.conditioned_logits(pixel_values, self.input_ids, self.attention_mask)
        return self.classifier.output(logits, labels)


# -- CoOp-protocol evaluation -----------------------------------------------------------------------------------------
def accuracy(predictions, references) -> float:
    """Top-1 accuracy in percent, by the package's `evaluate` module `top1_accuracy` (offline)."""
    predictions, references = np.asarray(predictions), np.asarray(references)
    if predictions.shape != references.shape:
        raise ValueError(f"{predictions.shape[0]} predictions for {references.shape[0]} references.")
    return load_metric("top1_accuracy").compute(predictions=predictions, references=references)["accuracy"]


def harmonic_mean(base: float, novel: float) -> float:
    return 0.0 if base + novel == 0 else 2.0 * base * novel / (base + novel)


def _dataset_class_names(dataset, label_column: str) -> list[str]:
    feature = dataset.features[label_column]
    names = getattr(feature, "names", None)
    if not names:
        raise ValueError(f"column {label_column!r} has no class names (expected a ClassLabel feature).")
    return list(names)


def _dataset_predictions(classifier: CLIPZeroShotClassifier, dataset, to_pixel_values: Callable, label_column: str,
                         image_column: str, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    classifier.set_class_names(_dataset_class_names(dataset, label_column))
    images = dataset.with_format("numpy")[:][image_column]
    labels = np.asarray(dataset[label_column])
    preds = []
    for start in range(0, len(labels), batch_size):
        preds.append(classifier.predict(to_pixel_values(images[start:start + batch_size])).cpu().numpy())
    return (np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)), labels


def dataset_accuracy(classifier: CLIPZeroShotClassifier, dataset, to_pixel_values: Callable, *,
                     label_column: str = "label", image_column: str = "image", batch_size: int = 256) -> float:
    """Accuracy (%) of `classifier` on a datasets.Dataset, with the dataset's own ClassLabel names as classes."""
    return accuracy(*_dataset_predictions(classifier, dataset, to_pixel_values, label_column, image_column,
                                          batch_size))


def evaluate_base_to_novel(classifier: CLIPZeroShotClassifier, base_test, novel_test, to_pixel_values: Callable, *,
                           label_column: str = "label", image_column: str = "image",
                           batch_size: int = 256) -> dict[str, float]:
    """CoOp's base-to-novel protocol.

    Accuracy on the base test split with only the base class names, on the novel test split with only the novel class
    names (two separate problems), and their harmonic mean, by the package's `evaluate` module `base_to_novel`.

    Args:
        classifier (CLIPZeroShotClassifier): The classifier to evaluate (its class names are set per split).
        base_test (datasets.Dataset): The base classes' test split (a `ClassLabel` label column names the classes).
        novel_test (datasets.Dataset): The novel classes' test split.
        to_pixel_values (Callable): Images -> `pixel_values` (e.g. the processor's).
        label_column (str): The label column.
        image_column (str): The image column.
        batch_size (int): Images per forward.

    Returns:
        dict[str, float]: `base`, `novel` and `hm` accuracies, in %.
    """
    args = (to_pixel_values, label_column, image_column, batch_size)
    (base_pred, base_ref), (novel_pred, novel_ref) = (_dataset_predictions(classifier, split, *args)
                                                      for split in (base_test, novel_test))
    return load_metric("base_to_novel").compute(
        predictions=np.concatenate([base_pred, novel_pred]), references=np.concatenate([base_ref, novel_ref]),
        novel=np.concatenate([np.zeros(len(base_ref), bool), np.ones(len(novel_ref), bool)]))


def average_base_to_novel(results: Sequence[dict[str, float]]) -> dict[str, float]:
    """Summary row over datasets: mean base, mean novel, and HM of those means (not the mean of the HMs)."""
    if not results:
        raise ValueError("no results to average.")
    base = float(np.mean([r["base"] for r in results]))
    novel = float(np.mean([r["novel"] for r in results]))
    return {"base": base, "novel": novel, "hm": harmonic_mean(base, novel)}
