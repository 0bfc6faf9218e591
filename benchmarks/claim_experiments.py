"""The experiments behind benchmarks/claims.py: one function per experiment, `run(arm, seed, size) -> metrics`.

Each reuses the recipe of the method's own benchmark (imported, not copied): rlp.py / qprompt.py for the prompt
methods, pyra.py for PYRA and the LoRA/ViT training loop, tempme.py for retrieval, lftl.py for active learning and
pruning.py / pruning_csgd.py for structured pruning. `size` is "full" (the claims table) or "small" (a cut-down run
for the CI test: few steps, small sets; its numbers mean nothing). Every arm of an experiment sees the same data,
splits, steps and seed; only the method changes.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from lftl_ablation import ABLATION_ARMS, BUDGET_ARMS, POOL_ARMS, QUERY_ARMS, VISDA_RATIO, domain_data, run_round1_query
from maple_recipe import MAPLE_VARIANTS, run_maple_variant
from peft import get_peft_model
from pyra_modulation import PYRA_LR_FACTORS, run_pyra_modulation

FULL, SMALL = "full", "small"


@dataclass
class Experiment:
    """A family of arms trained and evaluated alike. `settings[size]` are the knobs shown in claims.json."""

    name: str
    arms: tuple[str, ...]
    run: object  # (arm, seed, settings) -> dict of metrics
    settings: dict = field(default_factory=dict)
    description: str = ""
    prepare: object = None  # (settings, seeds) -> None: builds the data once before worker processes fork


# -- prompt learning on the tiny CLIP (CoOp protocol, base-to-novel) ---------------------------------------------------
@functools.lru_cache(maxsize=1)
def _clip():
    from rlp import load_model

    model, tokenizer, to_pixels = load_model(False)
    return model, {k: v.clone() for k, v in model.state_dict().items()}, tokenizer, to_pixels


def _fresh_clip():
    model, state, _, _ = _clip()
    fresh = type(model)(model.config)
    fresh.load_state_dict(state)
    return fresh.eval()


@functools.lru_cache(maxsize=8)
def _prompt_data(name: str, test_per_class: int, shots: int, seed: int):
    from peft_effadapt.testing import base_novel_split, few_shot_split, make_classification_dataset

    base_train, _ = base_novel_split(few_shot_split(make_classification_dataset(name, "train"), shots=shots,
                                                    seed=seed))
    return (base_train, *base_novel_split(make_classification_dataset(name, "test", n_per_class=test_per_class)))


@functools.lru_cache(maxsize=4)
def equal_noise_std(bits: int) -> float:
    """RMS error of `bits`-bit K-means quantisation (QPrompt's quantiser) of CoOp's initial context: the std of the
    noise-CoOp arm that perturbs the context as much as QCoOp at that bit width does."""
    from peft_effadapt import CoOpConfig
    from peft_effadapt.quantization.quantizers import KMeansQuantizer

    _, _, tokenizer, _ = _clip()
    model = get_peft_model(_fresh_clip(), CoOpConfig(ctx_init="a photo of a").resolve_tokens(tokenizer))
    ctx = next(p for n, p in model.named_parameters() if p.requires_grad).detach().float()
    values = KMeansQuantizer(bits=bits, codebook_dtype=torch.float32)(ctx).values
    return float((values - ctx).pow(2).mean().sqrt())


def text_layers() -> int:
    return _clip()[0].config.text_config.num_hidden_layers


def prompt_config(arm: str, maple_depth: int | None = None):
    """Config factory of a prompt arm. CoCoOp and MaPLe take their papers' layouts (CoCoOp: CoOp's context + the
    meta-net; MaPLe: the first 2 of "a photo of a" learned, prompts in every layer of the tiny CLIP, depth <= 9,
    or `maple_depth`)."""
    from peft_effadapt import CoCoOpConfig, CoOpConfig, MaPLeConfig, QPromptConfig, RLPConfig

    _, _, tokenizer, _ = _clip()
    init = "a photo of a"
    if arm == "CoOp":
        return CoOpConfig(ctx_init=init).resolve_tokens(tokenizer)
    if arm == "CoCoOp":
        return CoCoOpConfig(ctx_init=init).resolve_tokens(tokenizer)
    if arm == "MaPLe":
        depth = maple_depth or min(9, text_layers())
        return MaPLeConfig(ctx_init=init, prompt_depth=depth).resolve_tokens(tokenizer)
    if arm == "RLP r=1":
        return RLPConfig(ctx_init=init, rank=1).resolve_tokens(tokenizer)
    if arm.startswith("QCoOp "):  # the runs so far used the former fixed CAC threshold: kept, so they stay valid
        return QPromptConfig(ctx_init=init, host="coop", bits=int(arm.split()[1][:-1]),
                             kl_threshold=0.02).resolve_tokens(tokenizer)
    if arm.startswith("noise-CoOp "):
        bits = int(arm.split()[1][:-1])
        return QPromptConfig(ctx_init=init, host="coop", quantizer="noise",
                             noise_std=equal_noise_std(bits)).resolve_tokens(tokenizer)
    raise ValueError(f"unknown prompt arm {arm!r}")


PROMPT_ARMS = ("CoOp", "RLP r=1", "QCoOp 1b", "QCoOp 2b", "noise-CoOp 1b", "noise-CoOp 2b", "CoCoOp", "MaPLe")


def run_prompt(arm: str, seed: int, s: dict, recipe: dict | None = None) -> dict:
    """One prompt arm on the shared recipe of `s` or, given `recipe` (a `prompt_recipes.scaled` dict), on that."""
    from prompt_recipes import train_by_epochs
    from rlp import TEMPLATE, train

    from peft_effadapt import CLIPZeroShotClassifier
    from peft_effadapt.tasks import average_base_to_novel, evaluate_base_to_novel

    _, _, tokenizer, to_pixels = _clip()
    per_set = {}
    for name in s["sets"]:
        base_train, base_test, novel_test = _prompt_data(name, s["test_per_class"], s["shots"], seed)
        torch.manual_seed(seed)
        config = prompt_config(arm, maple_depth=recipe and recipe["depth"])
        if recipe is not None and _context_length(config) != recipe["n_ctx"]:
            raise ValueError(f"{arm}: its config learns {_context_length(config)} context tokens, its paper "
                             f"recipe {recipe['n_ctx']}")
        model = get_peft_model(_fresh_clip(), config)
        clf = CLIPZeroShotClassifier(model, tokenizer, template=TEMPLATE)
        if recipe is None:
            train(clf, base_train, to_pixels, s["steps"], s["lr"], s["batch"], seed)
        else:
            train_by_epochs(clf, base_train, to_pixels, recipe, seed)
        per_set[name] = evaluate_base_to_novel(clf, base_test, novel_test, to_pixels)
    out = average_base_to_novel(list(per_set.values()))
    from qprompt import payload

    out["params"] = model.get_nb_trainable_parameters()[0]
    out["bytes"], out["bytes_fp16"] = payload(model)
    out["test_images"] = sum(len(d[1]) + len(d[2]) for d in (
        _prompt_data(n, s["test_per_class"], s["shots"], seed) for n in s["sets"]))
    return {**out, "per_set": per_set}


def _context_length(config) -> int:
    maple = type(config).__name__ == "MaPLeConfig" or getattr(config, "host", None) == "maple"
    return config.maple_n_ctx if maple else config.n_ctx


def own_recipe_settings(base: dict, epochs_cap: int | None = None) -> dict:
    """`base` (the shared prompt settings: data, shots) + each arm's paper recipe and the scaling knobs (JSON)."""
    from dataclasses import asdict

    from prompt_recipes import ARM_RECIPE, LR_SCALE, RECIPES

    return {**{k: base[k] for k in ("sets", "shots", "test_per_class")}, "recipes": dict(ARM_RECIPE),
            "papers": {name: asdict(recipe) for name, recipe in RECIPES.items()}, "lr_scale": LR_SCALE,
            "epochs_cap": epochs_cap}


def run_prompt_own(arm: str, seed: int, s: dict, epochs: int | None = None) -> dict:
    """`arm` on its own paper's recipe (for `epochs` instead of the paper's, if given), scaled to the testbed
    (`prompt_recipes.scaled`); the scaled recipe is kept with the metrics."""
    from prompt_recipes import Recipe, scaled

    paper = s["papers"][s["recipes"][arm]]
    epochs = epochs or paper["epochs"]
    if s["epochs_cap"]:  # cut-down CI runs only
        epochs = min(epochs, s["epochs_cap"])
    n_train = len(_prompt_data(s["sets"][0], s["test_per_class"], s["shots"], seed)[0])
    recipe = scaled(Recipe(**{**paper, "epochs": epochs}), n_train, text_layers(), s["lr_scale"])
    return {**run_prompt(arm, seed, s, recipe), "recipe": {"paper": s["recipes"][arm], **recipe}}


# -- image classification with a ViT / CLIP vision tower (PYRA, Consolidator) ------------------------------------------
@functools.lru_cache(maxsize=4)
def _image_data(backbone: str, task: str, train_per_class: int, test_per_class: int):
    from pyra import clip_backbone, tensors

    from peft_effadapt.testing import load_tiny_vit

    processor = load_tiny_vit()[1] if backbone == "vit" else clip_backbone()[2]
    return (tensors(task, "train", processor, n_per_class=train_per_class),
            tensors(task, "test", processor, n_per_class=test_per_class))


def _backbone(kind: str):
    from pyra import clip_backbone

    from peft_effadapt.testing import load_tiny_vit

    return load_tiny_vit()[0] if kind == "vit" else clip_backbone()[1]


PYRA_ARMS = ("LoRA+ToMe low", "PYRA low", "LoRA+ToMe high", "PYRA high")


def run_pyra(backbone: str):
    def run(arm: str, seed: int, s: dict) -> dict:
        from pyra import METHODS, adapt, with_new_head

        from peft_effadapt.testing import CLASSIFICATION_SETS

        method = METHODS[{"LoRA+ToMe low": "lora+tome-low", "PYRA low": "pyra-low", "LoRA+ToMe high":
                          "lora+tome-high", "PYRA high": "pyra-high"}[arm]]
        data = _image_data(backbone, s["task"], s["train_per_class"], s["test_per_class"])
        base = with_new_head(_backbone(backbone), len(CLASSIFICATION_SETS[s["task"]].class_names), seed)
        args = SimpleNamespace(rank=s["rank"], lr=s["lr"], batch=s["batch"], epochs=s["epochs"], pyra_lr=s.get("pyra_lr"))
        res = adapt(base, method, data, args, seed)
        return {"accuracy": 100 * res["accuracy_merged"], "accuracy_unmerged": 100 * res["accuracy"],
                "gflops": res["gflops"], "trainable": res["trainable"], "test_images": len(data[1][1])}

    return run


CONSOLIDATOR_ARMS = ("Consolidator", "LoRA (equal params)")


def _train_classifier(model, data, s: dict, seed: int) -> None:
    """AdamW, 10 % warm-up then cosine, the schedule of pyra.adapt (same for both arms)."""
    (x, y), _ = data
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s["lr"], weight_decay=1e-4)
    total = s["epochs"] * math.ceil(len(y) / s["batch"])
    warmup = max(1, total // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: (t + 1) / warmup if t < warmup else 0.5 * (
        1 + math.cos(math.pi * (t - warmup) / max(total - warmup, 1))))
    generator = torch.Generator().manual_seed(seed)
    for _ in range(s["epochs"]):
        model.train()
        for idx in torch.randperm(len(y), generator=generator).split(s["batch"]):
            torch.nn.functional.cross_entropy(model(pixel_values=x[idx]).logits, y[idx]).backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_rank_matching(base, target: int, modules: list[str]) -> int:
    """The LoRA rank on `modules` (+ trained head) whose trainable count is closest to `target`."""
    from peft import LoraConfig

    best = None
    for r in range(1, 65):
        n = _trainable(get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=2 * r, target_modules=modules,
                                                                      modules_to_save=["classifier"])))
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (r, n)
        if n > target:
            break
    return best[0]


def run_consolidator(arm: str, seed: int, s: dict) -> dict:
    from peft import LoraConfig
    from pyra import accuracy, with_new_head

    from peft_effadapt import ConsolidatorConfig
    from peft_effadapt.testing import CLASSIFICATION_SETS

    data = _image_data("vit", s["task"], s["train_per_class"], s["test_per_class"])
    base = with_new_head(_backbone("vit"), len(CLASSIFICATION_SETS[s["task"]].class_names), seed)
    consolidator = ConsolidatorConfig(modules_to_save=["classifier"])
    if arm == "Consolidator":
        config = consolidator
    else:
        modules = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]
        target = _trainable(get_peft_model(copy.deepcopy(base), copy.deepcopy(consolidator)))
        r = lora_rank_matching(base, target, modules)
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=modules, modules_to_save=["classifier"])
    torch.manual_seed(seed)
    model = get_peft_model(base, config)
    trainable = _trainable(model)
    _train_classifier(model, data, s, seed)
    return {"accuracy": 100 * accuracy(model.merge_and_unload(), *data[1]), "trainable": trainable,
            "test_images": len(data[1][1])}


# -- text-video retrieval (TempMe) ------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _video_data(train_videos: int, test_videos: int):
    from peft_effadapt.tasks import encode_video_dataset
    from peft_effadapt.testing import load_tiny_clip, make_video_dataset

    _, processor = load_tiny_clip()
    return (encode_video_dataset(make_video_dataset(train_videos, seed=0), processor),
            encode_video_dataset(make_video_dataset(test_videos, seed=1), processor))


TEMPME_ARMS = ("meanP+LoRA", "TempMe+LoRA")


def run_tempme(arm: str, seed: int, s: dict) -> dict:
    from tempme import METHODS, gmacs, make_config, train

    from peft_effadapt import CLIPVideoRetrieval
    from peft_effadapt.testing import load_tiny_clip

    clip, _ = load_tiny_clip()
    train_data, test_data = _video_data(s["train_videos"], s["test_videos"])
    torch.manual_seed(seed)
    retrieval = CLIPVideoRetrieval(get_peft_model(copy.deepcopy(clip), make_config(METHODS[arm])))
    train(retrieval, train_data, s["steps"], s["batch"], s["lr"], seed)
    metrics = retrieval.evaluate(**test_data)
    vision = copy.deepcopy(clip.vision_model)
    vision.config._attn_implementation = "eager"
    deployed = get_peft_model(vision, make_config({**METHODS[arm], "lora_r": 0}))
    return {**metrics, "gmacs_per_video": gmacs(deployed, test_data["pixel_values"][0]),
            "test_videos": len(test_data["input_ids"])}


# -- active learning (LFTL) -------------------------------------------------------------------------------------------
LFTL_ARMS = ("contrastive", "entropy", "margin", "random")


def run_lftl(arm: str, seed: int, s: dict) -> dict:
    from lftl_ablation import run_variant

    return run_variant(arm, seed, s)


# -- structured pruning (ResRep, C-SGD vs L1 + fine-tune) ---------------------------------------------------------------
PRUNING_ARMS = ("ResRep", "C-SGD", "L1+fine-tune")


@functools.lru_cache(maxsize=2)
def _pruning_data(train_per_class: int, test_per_class: int):
    from peft_effadapt.testing import dataset_images, load_tiny_resnet, make_domain_dataset

    _, processor = load_tiny_resnet()

    def pair(split, n):
        data = make_domain_dataset("source", split, n_per_class=n)
        return processor.to_pixel_values(dataset_images(data)), torch.tensor(data["label"])

    return pair("train", train_per_class), pair("test", test_per_class)


def run_pruning(arm: str, seed: int, s: dict) -> dict:
    """Through pruning.py's rows (the public callbacks); any failure is reported as the run's error, not hidden."""
    import pruning

    train, test = _pruning_data(s["train_per_class"], s["test_per_class"])
    torch.manual_seed(seed)
    if arm == "ResRep":
        row = pruning.resrep_row(train, test, s["flops_target"], s["steps"], seed=seed)
    elif arm == "C-SGD":
        row = pruning.csgd_row(train, test, s["flops_target"], s["steps"], seed=seed)
    else:
        row = pruning.l1_row(train, test, s["flops_target"], s["steps"], seed=seed)
    if row is None or row.get("accuracy") is None:
        raise RuntimeError(f"{arm} gave no accuracy: {row and row.get('error')}")
    return {"accuracy": 100 * row["accuracy"], "flops_ratio": row["flops_ratio"], "test_images": len(test[1])}


def _prepare_prompts(s: dict, seeds: list[int]) -> None:
    _clip()
    for bits in (1, 2):
        equal_noise_std(bits)
    for seed in seeds:
        for name in s["sets"]:
            _prompt_data(name, s["test_per_class"], s["shots"], seed)


def _prepare_image(backbone: str):
    return lambda s, seeds: _image_data(backbone, s["task"], s["train_per_class"], s["test_per_class"])


def _prepare_lftl(s: dict, seeds: list[int]) -> None:
    for seed in seeds if s.get("pool_seed") == "run" else [0]:
        domain_data(s["pool_per_class"], s["test_per_class"], seed)


# -- the registry ----------------------------------------------------------------------------------------------------
_LFTL_FULL = dict(pool_per_class=64, test_per_class=256, rounds=5, ratio=0.02, epochs=3, lr=0.01)
_LFTL_SMALL = dict(pool_per_class=4, test_per_class=2, rounds=1, ratio=0.25, epochs=1, lr=0.01)
_IMAGE_FULL = dict(task="clutter", train_per_class=64, test_per_class=256, epochs=15, batch=32, lr=3e-3, rank=8)
_IMAGE_SMALL = dict(task="clutter", train_per_class=4, test_per_class=4, epochs=1, batch=16, lr=3e-3, rank=8)

_PROMPTS_FULL = dict(sets=["clutter"], shots=16, test_per_class=256, steps=300, lr=0.1, batch=32)
_PROMPTS_SMALL = dict(sets=["shapes"], shots=2, test_per_class=2, steps=2, lr=0.1, batch=8)

EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (
    Experiment("prompts", PROMPT_ARMS, run_prompt, {FULL: _PROMPTS_FULL, SMALL: _PROMPTS_SMALL},
               "bundled tiny CLIP, base-to-novel (CoOp protocol) on `clutter` (where CoOp loses novel accuracy "
               "against zero-shot CLIP: the forgetting these methods address; one set for the CPU budget), 16 shots "
               "drawn with the run's seed; every arm on one shared recipe (300 SGD steps, lr 0.1, batch 32)",
               _prepare_prompts),
    Experiment("prompts_own", PROMPT_ARMS, run_prompt_own, {
        FULL: own_recipe_settings(_PROMPTS_FULL), SMALL: own_recipe_settings(_PROMPTS_SMALL, epochs_cap=1)},
        "as `prompts`, each arm on its own paper's recipe (lr, batch, epochs, warm-up + cosine, context length, "
        "depth), scaled to the testbed by one rule (benchmarks/prompt_recipes.py)",
        _prepare_prompts),
    Experiment("pyra_vit", PYRA_ARMS, run_pyra("vit"), {FULL: _IMAGE_FULL, SMALL: _IMAGE_SMALL},
               "bundled tiny ViT adapted to `clutter` (pyra.py recipe), accuracy of the merged model",
               _prepare_image("vit")),
    Experiment("pyra_clip", PYRA_ARMS, run_pyra("clip"), {FULL: _IMAGE_FULL, SMALL: _IMAGE_SMALL},
               "bundled tiny CLIP vision tower + linear head adapted to `clutter` (pyra.py recipe)",
               _prepare_image("clip")),
    Experiment("pyra_modulation", tuple(PYRA_LR_FACTORS), run_pyra_modulation, {FULL: _IMAGE_FULL, SMALL: _IMAGE_SMALL},
               "PYRA high on `pyra_vit`'s data, its modulation trained at a tenth and a hundredth of the lr",
               _prepare_image("vit")),
    Experiment("maple_recipe", tuple(MAPLE_VARIANTS), run_maple_variant, {
        FULL: {**_PROMPTS_FULL, **own_recipe_settings(_PROMPTS_FULL)},
        SMALL: {**_PROMPTS_SMALL, **own_recipe_settings(_PROMPTS_SMALL, epochs_cap=1)}},
        "MaPLe on `prompts`' data, its own recipe trained longer and the shared recipe shortened or at a lower lr",
        _prepare_prompts),
    Experiment("consolidator", CONSOLIDATOR_ARMS, run_consolidator, {
        FULL: dict(_IMAGE_FULL, lr=1e-3), SMALL: _IMAGE_SMALL},
        "bundled tiny ViT adapted to `clutter`; LoRA on the same block Linears at the closest trainable count",
        _prepare_image("vit")),
    Experiment("tempme", TEMPME_ARMS, run_tempme, {
        FULL: dict(train_videos=256, test_videos=512, steps=60, batch=16, lr=1e-3),
        SMALL: dict(train_videos=4, test_videos=4, steps=2, batch=2, lr=1e-3)},
        "bundled tiny CLIP fine-tuned for text-video retrieval (tempme.py recipe)",
        lambda s, seeds: _video_data(s["train_videos"], s["test_videos"])),
    Experiment("lftl", LFTL_ARMS, run_lftl, {FULL: _LFTL_FULL, SMALL: _LFTL_SMALL},
               "source-trained tiny ResNet adapted to the target domain with LFTL rounds (lftl.py recipe)",
               _prepare_lftl),
    Experiment("lftl_ablation", ABLATION_ARMS, run_lftl, {FULL: _LFTL_FULL, SMALL: _LFTL_SMALL},
               "LFTL's sampler one component at a time (lftl_ablation.py), on the `lftl` settings", _prepare_lftl),
    Experiment("lftl_pools", POOL_ARMS, run_lftl, {
        FULL: dict(_LFTL_FULL, pool_seed="run"), SMALL: dict(_LFTL_SMALL, pool_seed="run")},
        "as `lftl`, the target pool drawn with the run's seed (so the round-1 query differs between seeds)",
        _prepare_lftl),
    Experiment("lftl_queries", QUERY_ARMS, run_round1_query, {
        FULL: dict(_LFTL_FULL, pool_seed="run"), SMALL: dict(_LFTL_SMALL, pool_seed="run")},
        "the round-1 query alone (source model, no training) on a pool drawn per seed: classes it covers",
        _prepare_lftl),
    Experiment("lftl_budget", BUDGET_ARMS, run_lftl, {
        FULL: dict(_LFTL_FULL, pool_seed="run", ratio=VISDA_RATIO, rounds=3),
        SMALL: dict(_LFTL_SMALL, pool_seed="run")},
        "as `lftl_pools`, buying VisDA-C's labels per class and round (37 a round, 3 rounds)", _prepare_lftl),
    Experiment("pruning", PRUNING_ARMS, run_pruning, {
        FULL: dict(train_per_class=128, test_per_class=256, flops_target=0.5, steps=600),
        SMALL: dict(train_per_class=2, test_per_class=2, flops_target=0.5, steps=2)},
        "bundled tiny ResNet (source domain) slimmed to 0.5 FLOPs (pruning.py rows)",
        lambda s, seeds: _pruning_data(s["train_per_class"], s["test_per_class"])),
)}
