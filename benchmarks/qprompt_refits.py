"""QPrompt's CAC refit rule: codebook refits per bit width (1-8) during QCoOp training, at several KL thresholds.

    python benchmarks/qprompt_refits.py [--set shapes] [--steps 300] [--thresholds 0.02 0.005 0.001 0.0002 0.00005]

One QCoOp training per bit width (the qprompt.py recipe: tiny CLIP, 16 base-class shots, SGD lr 0.1, cosine, batch
32) at the default threshold records (a) its refits, (b) the KL drift KL(current || cached) at every step where the
rule was eligible (>= t_min steps after the last fit) and how far a refit there would have moved the centroids
(max |C_new - C| in units of the weights' std), (c) the latent context after every step. The rule is then
replayed on that latent trajectory with a fresh `KMeansQuantizer` per threshold (the trajectory is the default
run's; a run at another threshold would move a little differently). Writes benchmarks/results/qprompt_refits.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peft import get_peft_model  # noqa: E402
from rlp import TEMPLATE, load_model, train  # noqa: E402

from peft_effadapt import CLIPZeroShotClassifier, QPromptConfig  # noqa: E402
from peft_effadapt.quantization.kmeans import kmeans_1d  # noqa: E402
from peft_effadapt.quantization.quantizers import KMeansQuantizer  # noqa: E402
from peft_effadapt.testing import base_novel_split, few_shot_split, make_classification_dataset  # noqa: E402

from common import write_result  # noqa: E402


def kmeans_quantizer(model) -> KMeansQuantizer:
    layer = model.base_model.prompt_layer()
    tensors = layer.tensors(layer._active_prompt_adapter())
    return next(q for q in tensors.quantizers.values() if isinstance(q, KMeansQuantizer))


def record(bits: int, model, tokenizer, to_pixels, data, args) -> dict:
    """Trains QCoOp at the default CAC settings, logging every eligible drift and the latent after each step."""
    config = QPromptConfig(ctx_init="a photo of a", host="coop", bits=bits).resolve_tokens(tokenizer)
    peft_model = get_peft_model(model, config)
    quantizer = kmeans_quantizer(peft_model)
    schedule, latents, drifts, shifts = quantizer.schedule, [], [], []
    original = schedule.should_refit

    def logged(z, codebook):
        if schedule.reference is not None and schedule.step - schedule.last_fit >= schedule.t_min:
            drifts.append(schedule.drift(z, codebook))
            # how far a refit now would move the centroids (z units: the weights' std)
            shifts.append(float((kmeans_1d(z.float(), codebook.numel(), init=codebook) - codebook).abs().max()))
        return original(z, codebook)

    schedule.should_refit = logged  # instance attribute: the quantiser calls this one
    ctx = next(p for n, p in peft_model.named_parameters() if p.requires_grad)
    hook = ctx.register_hook(lambda grad: latents.append(ctx.detach().clone()))  # before each step's update
    clf = CLIPZeroShotClassifier(peft_model, tokenizer, template=TEMPLATE)
    train(clf, data, to_pixels, args.steps, args.lr, 32, args.seed)
    hook.remove()
    return {"refits": quantizer.refits, "t_min": schedule.t_min, "kl_threshold": schedule.kl_threshold,
            "drift": {"eligible_checks": len(drifts), "median": float(np.median(drifts)) if drifts else None,
                      "max": float(max(drifts)) if drifts else None},
            "centroid_shift_if_refit": {"median": float(np.median(shifts)) if shifts else None,
                                        "max": float(max(shifts)) if shifts else None},
            "latents": latents}


def replay(bits: int, latents: list[torch.Tensor], threshold: float, t_min: int) -> int:
    quantizer = KMeansQuantizer(bits, t_min=t_min, kl_threshold=threshold)
    for latent in latents:
        quantizer(latent, training=True)
    return quantizer.refits


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", default="shapes")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bits", type=int, nargs="+", default=list(range(1, 9)))
    parser.add_argument("--name", default="qprompt_refits", help="result file benchmarks/results/<name>.json")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.02, 0.005, 0.001, 0.0002, 0.00005])
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer, to_pixels = load_model(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    data, _ = base_novel_split(few_shot_split(make_classification_dataset(args.set, "train"), shots=16, seed=0))
    rows = {}
    for bits in args.bits:
        torch.manual_seed(args.seed)
        run = record(bits, _fresh(model, state), tokenizer, to_pixels, data, args)
        latents = run.pop("latents")
        run["replayed_refits"] = {str(t): replay(bits, latents, t, run["t_min"]) for t in args.thresholds}
        rows[str(bits)] = run
        print(bits, run, flush=True)
        # written after every bit width, so an interrupted run keeps what it measured
        write_result(args.name, {"args": vars(args), "per_bits": rows, "note": NOTE})


NOTE = ("refits = codebook refits after the initial fit in --steps training steps at the default CAC settings; "
        "replayed_refits = the CAC rule replayed on that run's latent trajectory at each threshold (t_min unchanged)")


def _fresh(model, state):
    fresh = type(model)(model.config)
    fresh.load_state_dict(state)
    return fresh.eval()


if __name__ == "__main__":
    main()
