"""Text-video retrieval with a CLIP model: frames -> video embedding, text -> embedding, symmetric InfoNCE, and the
standard metrics (R@1/5/10, median and mean rank, R-Sum) in both directions.

The plain wrapper is CLIP4Clip's *meanP* baseline: every frame is encoded on its own, the L2-normalised frame
features are averaged (masked) and normalised again. With a TempMe adapter the same wrapper pools the class tokens
TempMe keeps for every frame (`get_image_features` still returns one row per frame), so both compare like for like.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers.utils import ModelOutput

from ..metrics import load_metric
from ..validation.inputs import require
from .classification import projected_features
from .clip import clip_of


@dataclass
class VideoRetrievalOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None  # texts × videos, scaled by CLIP's temperature
    logits_per_video: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    video_embeds: torch.Tensor | None = None



def stack_videos(videos, video_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks a batch of videos and returns ``(pixel_values (B, T, C, H, W), video_mask (B, T))``.

    `videos` is a (B, T, C, H, W) tensor (padded videos: pass `video_mask`, 1 = real frame) or a list of (T, C, H, W)
    tensors of equal length.
    """
    if isinstance(videos, (list, tuple)):
        lengths = {v.shape[0] for v in videos}
        if len(lengths) > 1:
            raise ValueError(
                f"videos of different lengths {sorted(lengths)} in one batch: pad them to the same number of frames "
                "(e.g. repeat the last frame), stack them to (B, T, C, H, W) and pass video_mask (B, T) with 1 for "
                "real frames."
            )
        videos = torch.stack(list(videos))
    if not torch.is_tensor(videos) or videos.ndim != 5:
        shape = tuple(videos.shape) if torch.is_tensor(videos) else type(videos).__name__
        raise ValueError(
            f"expected videos as pixel_values of shape (batch, frames, channels, height, width), got {shape}"
            + (": these look like images; add a frame axis (x[:, None]) or use get_image_features." if
               torch.is_tensor(videos) and videos.ndim == 4 else ".")
        )
    batch, frames = videos.shape[:2]
    if video_mask is None:
        video_mask = torch.ones(batch, frames, dtype=torch.long, device=videos.device)
    video_mask = torch.as_tensor(video_mask, device=videos.device)
    if tuple(video_mask.shape) != (batch, frames):
        raise ValueError(f"video_mask must have shape (batch, frames) = {(batch, frames)}, got "
                         f"{tuple(video_mask.shape)}.")
    # a compile-safe check (no host synchronisation under torch.compile)
    require((video_mask.sum(1) > 0).all(), "every video needs at least one real frame (a row of video_mask is all "
            "zeros).")
    return videos, video_mask


def symmetric_infonce(logits_per_text: torch.Tensor) -> torch.Tensor:
    """Mean of the cross-entropy over rows (text -> video) and over columns (video -> text); pair i is positive.
    Single-process: the official code all-gathers features across GPUs first (with Accelerate/DDP each process
    contrasts against its own batch here)."""
    if logits_per_text.shape[0] != logits_per_text.shape[1]:
        raise ValueError(f"InfoNCE needs as many texts as videos (paired), got {tuple(logits_per_text.shape)}.")
    target = torch.arange(logits_per_text.shape[0], device=logits_per_text.device)
    loss_t2v = nn.functional.cross_entropy(logits_per_text, target)
    loss_v2t = nn.functional.cross_entropy(logits_per_text.T, target)
    return (loss_t2v + loss_v2t) / 2


def retrieval_metrics(similarity) -> dict[str, float]:
    """Text-video retrieval metrics in both directions.

    Args:
        similarity (torch.Tensor): Texts × videos similarity matrix; pair i (row i, column i) is the truth.

    Returns:
        dict[str, float]: R@1/5/10 (%), MdR, MnR and R-Sum = R@1 + R@5 + R@10 for text->video (rows) and
        video->text (columns), keys prefixed `t2v_` / `v2t_` (computed by the package's `evaluate` module
        `text_video_retrieval`).
    """
    sim = similarity.detach().float().cpu().numpy() if torch.is_tensor(similarity) else np.asarray(similarity)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"similarity must be a square texts × videos matrix, got shape {sim.shape}.")
    return load_metric("text_video_retrieval").compute(predictions=sim, references=np.arange(len(sim)))


class CLIPVideoRetrieval(nn.Module):
    """Text-video retrieval around a `CLIPModel` (or a PeftModel around one: LoRA, TempMe, ...).

    `forward(pixel_values (B, T, C, H, W), input_ids, attention_mask=None, video_mask=None)` returns the symmetric
    InfoNCE `loss` with CLIP's own temperature (exp(logit_scale), at most 100) and the logits, so it trains under
    `transformers.Trainer`. `video_features` is meanP (CLIP4Clip): masked mean of the normalised per-frame features,
    normalised again. `evaluate(**encoded_videos)` gives [`retrieval_metrics`].

    Args:
        model (nn.Module): A `CLIPModel`, or a PeftModel around one.

    Example:
        ```python
        from peft_effadapt import CLIPVideoRetrieval
        from peft_effadapt.tasks import encode_video_dataset
        from peft_effadapt.testing import load_tiny_clip, make_video_dataset

        clip, processor = load_tiny_clip()
        videos = encode_video_dataset(make_video_dataset(8, seed=0), processor)
        print(CLIPVideoRetrieval(clip).evaluate(**videos)["t2v_R@1"])  # zero-shot meanP
        ```
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        clip_of(model, "CLIPVideoRetrieval")
        self.model = model

    @property
    def clip(self) -> nn.Module:
        return clip_of(self.model, type(self).__name__)

    def video_features(self, pixel_values, video_mask: torch.Tensor | None = None) -> torch.Tensor:
        videos, mask = stack_videos(pixel_values, video_mask)
        batch, frames = videos.shape[:2]
        per_frame = projected_features(self.model.get_image_features(pixel_values=videos.flatten(0, 1)))
        if per_frame.shape[0] != batch * frames:
            raise ValueError(f"the image encoder returned {per_frame.shape[0]} rows for {batch} videos of {frames} "
                             "frames; expected one row per frame.")
        per_frame = nn.functional.normalize(per_frame, dim=-1).view(batch, frames, -1)
        weights = mask.to(per_frame.dtype)[..., None]
        video = (per_frame * weights).sum(1) / weights.sum(1)
        return nn.functional.normalize(video, dim=-1)

    def video_encoder(self) -> VideoEncoder:
        """A module whose forward is `video_features` (videos -> normalised embeddings), e.g. to encode a video
        collection offline through `peft_effadapt.compile_for_inference(retrieval.video_encoder())`."""
        return VideoEncoder(self)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        feats = projected_features(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))
        return nn.functional.normalize(feats, dim=-1)

    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp().clamp(max=100.0)

    def forward(self, pixel_values, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                video_mask: torch.Tensor | None = None, return_loss: bool = True, **kwargs) -> VideoRetrievalOutput:
        video = self.video_features(pixel_values, video_mask)
        text = self.text_features(input_ids, attention_mask).to(video.dtype)
        logits_per_text = self.logit_scale().to(video.dtype) * text @ video.T
        loss = symmetric_infonce(logits_per_text) if return_loss and text.shape[0] == video.shape[0] else None
        return VideoRetrievalOutput(loss=loss, logits_per_text=logits_per_text, logits_per_video=logits_per_text.T,
                                    text_embeds=text, video_embeds=video)

    @torch.no_grad()
    def evaluate(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 video_mask: torch.Tensor | None = None, batch_size: int = 16) -> dict[str, float]:
        """Encodes all videos and texts (pair i = text i, video i) in batches and returns `retrieval_metrics`."""
        was_training = self.training
        self.eval()
        try:
            videos, mask = stack_videos(pixel_values, video_mask)
            video = torch.cat([self.video_features(videos[i:i + batch_size], mask[i:i + batch_size])
                               for i in range(0, len(videos), batch_size)])
            text = torch.cat([self.text_features(input_ids[i:i + batch_size],
                                                 None if attention_mask is None else attention_mask[i:i + batch_size])
                              for i in range(0, len(input_ids), batch_size)])
            return retrieval_metrics(text @ video.T)
        finally:
            self.train(was_training)


class VideoEncoder(nn.Module):
    """The video tower of a `CLIPVideoRetrieval`: forward(pixel_values (B, T, C, H, W), video_mask=None) -> (B, D)
    normalised video embeddings."""

    def __init__(self, retrieval: CLIPVideoRetrieval) -> None:
        super().__init__()
        self.retrieval = retrieval

    def forward(self, pixel_values: torch.Tensor, video_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.retrieval.video_features(pixel_values, video_mask)


def encode_video_dataset(dataset, processor, frames_column: str = "frames", caption_column: str = "caption",
                         max_length: int | None = None) -> dict[str, torch.Tensor]:
    """A video-text `datasets.Dataset` (uint8 frames (T, H, W, 3) and a caption per row) -> ``pixel_values``
    (V, T, C, H, W), ``input_ids`` and ``attention_mask`` with `processor` (a CLIPProcessor or the testbed's)."""
    frames = np.asarray(dataset.with_format("numpy")[:][frames_column], dtype=np.uint8)
    if frames.ndim != 5:
        raise ValueError(f"column {frames_column!r} must hold videos (frames, height, width, 3), got rows of shape "
                         f"{frames.shape[1:]}.")
    videos, length = frames.shape[:2]
    pixels = processor(images=frames.reshape(videos * length, *frames.shape[2:]), return_tensors="pt")["pixel_values"]
    kwargs = {"truncation": True, "max_length": max_length} if max_length else {}
    text = processor(text=list(dataset[caption_column]), padding=True, return_tensors="pt", **kwargs)
    return {"pixel_values": pixels.view(videos, length, *pixels.shape[1:]), "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"]}


def mean_metrics(results: Sequence[dict[str, float]]) -> dict[str, float]:
    """Average of several metric dicts (e.g. over seeds)."""
    return {k: float(np.mean([r[k] for r in results])) for k in results[0]}
