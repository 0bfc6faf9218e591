"""Text-video retrieval task: metrics, symmetric InfoNCE, meanP pooling and input checks (issue 7)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from peft_effadapt import CLIPVideoRetrieval, retrieval_metrics
from peft_effadapt.tasks import stack_videos, symmetric_infonce
from peft_effadapt.tasks.classification import projected_features
from peft_effadapt.testing import tiny_clip, tiny_text_inputs


def test_metrics_on_a_known_matrix():
    # text i's true video is i; ranks t2v (rows): 1, 2, 3, 1; v2t (columns): 1, 2, 1, 1
    sim = torch.tensor([[0.9, 0.1, 0.0, 0.0],
                        [0.8, 0.5, 0.1, 0.0],
                        [0.7, 0.6, 0.2, 0.1],
                        [0.0, 0.0, 0.0, 0.3]])
    m = retrieval_metrics(sim)
    assert m["t2v_R@1"] == 50.0 and m["t2v_R@5"] == 100.0 and m["t2v_R@10"] == 100.0
    assert m["t2v_MdR"] == 1.5 and m["t2v_MnR"] == pytest.approx(7 / 4)
    assert m["t2v_R-Sum"] == 250.0
    assert m["v2t_R@1"] == 75.0 and m["v2t_MnR"] == pytest.approx(5 / 4) and m["v2t_MdR"] == 1.0
    with pytest.raises(ValueError, match="square"):
        retrieval_metrics(np.zeros((2, 3)))


def test_symmetric_infonce_is_the_mean_of_both_directions():
    logits = torch.randn(5, 5, generator=torch.Generator().manual_seed(0))
    target = torch.arange(5)
    expected = (torch.nn.functional.cross_entropy(logits, target)
                + torch.nn.functional.cross_entropy(logits.T, target)) / 2
    torch.testing.assert_close(symmetric_infonce(logits), expected)
    with pytest.raises(ValueError, match="paired"):
        symmetric_infonce(torch.zeros(2, 3))


def _videos(batch=3, frames=4, seed=0):
    return torch.randn(batch, frames, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_meanp_is_the_mean_of_normalised_frame_features():
    clip = tiny_clip(seed=0)
    retrieval = CLIPVideoRetrieval(clip).eval()
    videos = _videos()
    with torch.no_grad():
        frames = projected_features(clip.get_image_features(pixel_values=videos.flatten(0, 1)))
        frames = torch.nn.functional.normalize(frames, dim=-1).view(3, 4, -1)
        expected = torch.nn.functional.normalize(frames.mean(1), dim=-1)
        torch.testing.assert_close(retrieval.video_features(videos), expected)
        # masked frames do not count: video 0 with only its first two frames
        mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
        masked = retrieval.video_features(videos, mask)
        torch.testing.assert_close(masked[0], torch.nn.functional.normalize(frames[0, :2].mean(0), dim=-1))
        torch.testing.assert_close(masked[1:], expected[1:])


def test_forward_gives_loss_and_logits_and_trains():
    clip = tiny_clip(seed=0)
    retrieval = CLIPVideoRetrieval(clip)
    out = retrieval(_videos(), **tiny_text_inputs(batch=3))
    assert out.logits_per_text.shape == (3, 3) and out.logits_per_video.shape == (3, 3)
    assert out.video_embeds.shape == (3, 16) and torch.isfinite(out.loss)
    out.loss.backward()
    assert clip.visual_projection.weight.grad is not None and clip.text_projection.weight.grad is not None
    scale = clip.logit_scale.exp().clamp(max=100)
    torch.testing.assert_close(out.logits_per_text, scale * out.text_embeds @ out.video_embeds.T)


def test_evaluate_returns_both_directions():
    metrics = CLIPVideoRetrieval(tiny_clip(seed=0)).evaluate(_videos(batch=4), **tiny_text_inputs(batch=4),
                                                            batch_size=3)
    assert {"t2v_R@1", "t2v_R@5", "t2v_R@10", "t2v_MdR", "t2v_MnR", "t2v_R-Sum", "v2t_R@1", "v2t_R-Sum"} <= set(metrics)


def test_bad_inputs_say_what_was_expected():
    retrieval = CLIPVideoRetrieval(tiny_clip(seed=0))
    with pytest.raises(ValueError, match=r"look like images.*frame axis"):
        retrieval.video_features(torch.randn(4, 3, 32, 32))
    with pytest.raises(ValueError, match="different lengths.*video_mask"):
        retrieval.video_features([torch.randn(4, 3, 32, 32), torch.randn(3, 3, 32, 32)])
    with pytest.raises(ValueError, match=r"video_mask must have shape"):
        retrieval.video_features(_videos(), torch.ones(3, 5))
    with pytest.raises(ValueError, match="at least one real frame"):
        retrieval.video_features(_videos(), torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]))
    with pytest.raises(TypeError, match="CLIPModel"):
        CLIPVideoRetrieval(torch.nn.Linear(2, 2))
    same_length = stack_videos([torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)])
    assert same_length[0].shape == (2, 4, 3, 8, 8) and same_length[1].sum() == 8
