"""Pretrain the bundled tiny CLIP from scratch on generated captioned shapes, then print zero-shot metrics.

    python benchmarks/testbed/train_tiny_clip.py            # ~25 min with 1 thread on a laptop-class CPU

Writes peft_effadapt/testing/checkpoints/tiny_clip/ (config.json, model.safetensors, tokenizer files,
preprocessor_config.json) and benchmarks/results/testbed_tiny_clip.json (metrics, wall time, threads).
Captions name random subsets of attributes, so several images in a batch may fit one caption: the loss uses
every matching pair as a positive (targets = normalised match matrix), not only the diagonal.
"""

from __future__ import annotations  # noqa: I001 - `common` puts the repo on sys.path first

import argparse
import json
import math
import sys
import time

import numpy as np
import torch
from common import REPO, set_seed, write_results
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPModel

from peft_effadapt.testing.captions import random_caption
from peft_effadapt.testing.checkpoints import load_tiny_clip
from peft_effadapt.testing.data import CLASSIFICATION_SETS, make_caption_dataset, make_classification_dataset
from peft_effadapt.testing.evaluation import clip_video_retrieval, clip_zero_shot_accuracy
from peft_effadapt.testing.processing import ShapesImageProcessor, ShapesProcessor, dataset_images
from peft_effadapt.testing.shapes import ShapeSpec
from peft_effadapt.testing.tokenizer import train_caption_tokenizer
from peft_effadapt.testing.video import make_video_dataset

ATTRS = ("shape", "color", "size", "position", "texture", "background")


def build_model(vocab_size: int, bos: int, eos: int, pad: int, patch_size: int = 4) -> CLIPModel:
    text = dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=64, bos_token_id=bos, eos_token_id=eos,
                pad_token_id=pad)
    vision = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                  image_size=32, patch_size=patch_size)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=64))


def evaluate(model: CLIPModel, processor: ShapesProcessor, seed: int) -> dict[str, float]:
    """Zero-shot accuracy on every downstream set and text-to-video retrieval; prints and returns them."""
    model.eval()
    metrics = {}
    for name in CLASSIFICATION_SETS:
        acc = clip_zero_shot_accuracy(model, processor, make_classification_dataset(name, "test", seed=seed))
        metrics[f"zero_shot/{name}"] = acc
        print(f"zero-shot {name:9s} ({len(CLASSIFICATION_SETS[name].class_names):2d} classes): {acc:.3f}")
    retrieval = clip_video_retrieval(model, processor, make_video_dataset(256, seed=seed))
    metrics.update({f"video_t2v/{k}": v for k, v in retrieval.items()})
    print("text-to-video retrieval (256 videos, mean of frame features):", retrieval)
    return metrics


def evaluate_saved(args: argparse.Namespace) -> None:
    """--eval-only: re-measure a saved checkpoint and refresh the metrics in its results file."""
    model, processor = load_tiny_clip(args.out)
    metrics = evaluate(model, processor, args.seed)
    path = REPO / "benchmarks" / "results" / "testbed_tiny_clip.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    evaluated_by = "python " + " ".join(sys.argv)
    write_results("testbed_tiny_clip", {**previous, "metrics": metrics, "metrics_from": evaluated_by})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--images", type=int, default=30000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--patch-size", type=int, default=4, help="4: 65 tokens per image (patch 8 loses shape detail)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "peft_effadapt/testing/checkpoints/tiny_clip"))
    ap.add_argument("--eval-only", action="store_true", help="re-evaluate the checkpoint in --out, no training")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.eval_only:
        return evaluate_saved(args)
    set_seed(args.seed)
    start = time.time()

    tokenizer = train_caption_tokenizer(args.out)
    image_processor = ShapesImageProcessor()
    processor = ShapesProcessor(tokenizer, image_processor)
    data = make_caption_dataset(args.images, seed=args.seed)
    pixels = image_processor.to_pixel_values(dataset_images(data))
    names = {a: data.features[a].names for a in ATTRS}
    attrs = np.stack([np.asarray(data[a]) for a in ATTRS], 1)  # (N, 6) attribute ids

    model = build_model(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                        args.patch_size)
    print(f"tiny CLIP: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"{len(data)} images, vocab {len(tokenizer)}")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98))
    warmup = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    rng = np.random.default_rng(args.seed)
    model.train()
    bar = tqdm(range(args.steps), desc="tiny CLIP", mininterval=5)
    for step in bar:
        idx = rng.choice(len(data), args.batch_size, replace=False)
        texts, masks = [], []
        for i in idx:
            a = {k: names[k][v] for k, v in zip(ATTRS, attrs[i])}
            spec = ShapeSpec(a["shape"], a["color"], a["size"], a["position"], a["texture"])
            text, mentions = random_caption(spec, a["background"], rng, return_mentions=True)
            texts.append(text)
            masks.append([mentions[k] for k in ATTRS])
        masks_t = torch.tensor(masks)  # (B, 6): which attributes caption i names
        batch_attrs = torch.as_tensor(attrs[idx])
        agree = batch_attrs[:, None, :] == batch_attrs[None, :, :]  # (B caption, B image, 6)
        match = (agree | ~masks_t[:, None, :]).all(-1).float()  # caption i fits image j
        tok = tokenizer(texts, padding=True, return_tensors="pt")
        out = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=pixels[idx])
        logits_t2i = out.logits_per_text
        loss_t2i = -(torch.log_softmax(logits_t2i, 1) * match / match.sum(1, keepdim=True)).sum(1).mean()
        loss_i2t = -(torch.log_softmax(logits_t2i.T, 1) * match.T / match.T.sum(1, keepdim=True)).sum(1).mean()
        loss = (loss_t2i + loss_i2t) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    train_time = time.time() - start

    metrics = evaluate(model, processor, args.seed)

    model.save_pretrained(args.out)
    image_processor.save_pretrained(args.out, "CLIPImageProcessor")
    wall = time.time() - start
    write_results("testbed_tiny_clip", {
        "metrics": metrics, "train_seconds": round(train_time, 1), "wall_seconds": round(wall, 1),
        "threads": args.threads, "params": sum(p.numel() for p in model.parameters()), "args": vars(args),
    })
    print(f"done in {wall / 60:.1f} min with {args.threads} thread(s); saved to {args.out}")


if __name__ == "__main__":
    main()
