"""C-SGD: cluster formation, the centripetal gradient edit, lossless trim, save/reload, Trainer and accelerate launch."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import ResNetForImageClassification, Trainer, TrainingArguments

from peft_effadapt.pruning import (
    CentripetalSGDCallback,
    FlopsModel,
    count_flops,
    csgd_param_groups,
    find_channel_groups,
    save_slimmed,
    widths_for_flops,
)
from peft_effadapt.pruning.csgd.clusters import (
    averaging_matrix,
    biased_clusters,
    clusters_to_labels,
    even_clusters,
    kmeans_clusters,
)
from peft_effadapt.pruning.csgd.update import centripetal_gradient, cluster_means
from peft_effadapt.testing import randomize_batchnorm, tiny_resnet, tiny_vit

from fp32 import assert_fp32_close

REPO = Path(__file__).resolve().parents[1]


def plain_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(48, 5)).eval()


@torch.no_grad()
def project_onto_cluster_means(callback):
    """Stand-in for convergence (spec T1): every member of a cluster set to the cluster mean, incl. BN stats."""
    for entry in callback._entries:
        counts = torch.bincount(entry.labels)
        for t in [e.param for e in entry.tensors] + [b for _, b in entry.buffers]:
            t.copy_(cluster_means(t, entry.labels, counts))


def random_images(n, seed, size=16, classes=5):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    pixels = rng.normal(0, 1, (n, 3, size, size)).astype(np.float32)
    pixels[np.arange(n), labels % 3] += 1.0
    return Dataset.from_dict({"pixel_values": pixels, "labels": labels}).with_format("torch")


def sgd_args(tmp_path, steps, **kw):
    base = dict(output_dir=str(tmp_path / "run"), max_steps=steps, per_device_train_batch_size=8, learning_rate=0.05,
                optim="sgd", optim_args="momentum=0.9,nesterov=True", max_grad_norm=0, report_to=[],
                save_strategy="no", logging_steps=50, use_cpu=True, lr_scheduler_type="constant", seed=0,
                disable_tqdm=True, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


# ------------------------------------------------------------------------------------------------ clusters
def test_cluster_methods():
    torch.manual_seed(0)
    centres = torch.randn(4, 12) * 10
    rows = torch.cat([centres[i] + 0.01 * torch.randn(3, 12) for i in (2, 0, 3, 1)])
    rows = rows[torch.randperm(12, generator=torch.Generator().manual_seed(1))]
    found = kmeans_clusters(rows, 4, seed=0)
    truth = {tuple(sorted(((rows - c).norm(dim=1) < 1).nonzero().flatten().tolist())) for c in centres}
    assert {tuple(c) for c in found} == truth
    assert kmeans_clusters(rows, 4, seed=0) == found  # seeded: identical on every call (and rank)
    assert len(kmeans_clusters(torch.zeros(6, 3), 3)) == 3  # coincident rows still give k non-empty clusters
    assert even_clusters(10, 3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert biased_clusters(6, 3) == [[0, 1, 2, 3], [4], [5]]
    with pytest.raises(ValueError, match="must be <= the channel count"):
        kmeans_clusters(rows, 13)
    with pytest.raises(ValueError, match="positive int"):
        even_clusters(4, 0)


# ------------------------------------------------------------------------------------------------ the edit
def test_gradient_edit_matches_the_formula():
    torch.manual_seed(0)
    clusters, n = [[0, 3, 5], [1], [2, 4]], 6
    a, eye = averaging_matrix(clusters, n), torch.eye(n)
    p, g = torch.randn(n, 2, 3, 3), torch.randn(n, 2, 3, 3)
    eps, eta = 0.3, 1e-4
    got = centripetal_gradient(p, g, clusters_to_labels(clusters, n), eps, eta)
    want = a @ g.reshape(n, -1) + (eta * eye + eps * (eye - a)) @ p.reshape(n, -1)
    assert_fp32_close(got.reshape(n, -1), want)
    assert_fp32_close(got[1], g[1] + eta * p[1])  # singleton: plain L2-regularised SGD
    # hand example: cluster {0, 1}, p = (1, 3), g = (2, 4): g' = 3 + eps * (p - 2)
    hand = centripetal_gradient(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 4.0]), torch.tensor([0, 0]), 0.5)
    assert hand.tolist() == [2.5, 3.5]


def test_callback_edit_vectors_use_tenth_strength_and_decay_is_not_doubled():
    model = tiny_resnet()
    cb = CentripetalSGDCallback(keep_ratio=0.5, centripetal_strength=0.2, weight_decay=1e-3)
    cb.prepare(model)
    lam, lr = 5e-3, 0.1  # the optimizer gives every parameter coupled decay lam; the edit must replace it by eta
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=lam)
    cb.check_optimizer(opt)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    entry = next(e for e in cb._entries if e.group.name == "stage0")  # residual group: 3 producers, 3 BNs
    assert [t.name.rsplit(".", 2)[-2] for t in entry.tensors].count("convolution") == 3
    before = {t.name: (t.param.detach().clone(), t.param.grad.clone()) for t in entry.tensors}
    cb.edit_gradients(opt)
    opt.step()
    a = averaging_matrix(entry.clusters, entry.group.size)
    eye = torch.eye(entry.group.size)
    for t in entry.tensors:
        p0, g0 = before[t.name]
        kernel = t.name.endswith("convolution.weight")
        eps, eta = (0.2, 1e-3) if kernel else (0.02, 0.0)
        step = a @ g0.reshape(len(a), -1) + (eta * eye + eps * (eye - a)) @ p0.reshape(len(a), -1)
        assert_fp32_close(t.param.detach().reshape(len(a), -1), p0.reshape(len(a), -1) - lr * step)


def test_deviation_vanishes_under_the_edit():
    """Spec T4: eps 0.3, lr 0.1, momentum 0.9 -> members identical to float precision, loss still decreasing."""
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    cb = CentripetalSGDCallback(keep_ratio=0.5, centripetal_strength=0.3)
    cb.prepare(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    losses = []
    for _ in range(500):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        cb.edit_gradients(opt)
        opt.step()
        losses.append(loss.item())
    assert cb.deviation() < 1e-10
    assert losses[-1] < losses[0]


# ------------------------------------------------------------------------------------------------ trim
@pytest.mark.parametrize("make", [lambda: tiny_resnet("bottleneck"), lambda: tiny_resnet("basic", embedding_size=16),
                                  plain_cnn], ids=["bottleneck", "basic-no-projection", "sequential"])
def test_trim_is_lossless_once_clusters_are_identical(make):
    model = make()
    randomize_batchnorm(model)
    cb = CentripetalSGDCallback(keep_ratio=0.5)
    cb.prepare(model)
    project_onto_cluster_means(cb)
    x = torch.randn(2, 3, 32, 32)
    flops_model = FlopsModel.measure(model, x, find_channel_groups(model))
    in_dims = {p: m.weight.shape[1] for p, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    with torch.no_grad():
        wide = model(x)
        wide = getattr(wide, "logits", wide)
    plan = cb.slim(model, inputs=x)
    with torch.no_grad():
        slim = model(x)
        slim = getattr(slim, "logits", slim)
    assert_fp32_close(slim, wide)
    report = cb.slim_report
    assert report["max_abs_output_diff"] <= 1e-5 * max(1.0, report["max_abs_output"])
    assert count_flops(model, x) == flops_model.flops(plan.widths) < flops_model.baseline
    for gp in plan.groups:  # residual groups stay consistent: all producers and consumers at the plan's width
        assert [c[0] for c in gp.clusters] == gp.keep
        for path, _ in gp.group.producers:
            module = model.get_submodule(path)
            assert getattr(module, "out_channels", getattr(module, "out_features", None)) == gp.width
        for path in gp.group.consumers:  # a Linear after a flatten keeps its features per channel
            assert model.get_submodule(path).weight.shape[1] == in_dims[path] // gp.group.size * gp.width
    if isinstance(model, ResNetForImageClassification):
        assert any(gp.group.residual and len(gp.group.producers) > 1 for gp in plan.groups)


def test_residual_followers_share_the_pacesetter_clusters():
    model = tiny_resnet()
    cb = CentripetalSGDCallback(keep_ratio=0.5)
    cb.prepare(model)
    entry = next(e for e in cb._entries if e.group.name == "stage1")
    pace = model.get_submodule(entry.group.pacesetter).weight
    assert entry.group.pacesetter.endswith("shortcut.convolution")
    assert entry.clusters == kmeans_clusters(pace, entry.group.size // 2, seed=0)


@pytest.mark.parametrize("family", ["internal", "streams"])
def test_group_families_select_and_slim_exactly(family):
    """`groups=` picks a family: "streams" clusters only the residual streams and the stem, "internal" only the
    layers inside blocks; either slims exactly once the clusters are identical."""
    model = tiny_resnet()
    randomize_batchnorm(model)
    x = torch.randn(2, 3, 32, 32)
    cb = CentripetalSGDCallback(keep_ratio=0.5, groups=family)
    cb.prepare(model)
    residual = {e.group.name: e.group.residual or e.group.meta.get("role") == "stem" for e in cb._entries}
    assert residual and all(v == (family == "streams") for v in residual.values())
    with torch.no_grad():
        project_onto_cluster_means(cb)
        before = model(x).logits
    cb.slim(model, inputs=x)
    with torch.no_grad():
        after = model(x).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5 * max(1.0, float(before.abs().max())))


def test_slimmed_model_reloads_identically_in_a_fresh_process(tmp_path):
    model = tiny_resnet()
    randomize_batchnorm(model)
    cb = CentripetalSGDCallback(keep_ratio=0.5)
    cb.prepare(model)
    project_onto_cluster_means(cb)
    cb.slim(model, inputs=torch.randn(2, 3, 32, 32))
    save_slimmed(model, None, tmp_path / "slim")
    x = torch.randn(3, 3, 32, 32)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    code = textwrap.dedent(f"""
        import torch
        from safetensors.torch import load_file, save_file
        from peft_effadapt.pruning import load_slimmed
        m = load_slimmed({str(tmp_path / 'slim')!r})
        with torch.no_grad():
            out = m(load_file({str(tmp_path / 'x.safetensors')!r})["x"]).logits
        save_file({{"out": out.contiguous()}}, {str(tmp_path / 'out.safetensors')!r})
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        assert torch.equal(load_file(str(tmp_path / "out.safetensors"))["out"], model(x).logits)


def test_train_wide_then_squeeze_to_the_original_width():
    narrow = tiny_resnet(embedding_size=8, hidden_sizes=(16, 32), seed=1)
    wide = tiny_resnet(embedding_size=16, hidden_sizes=(32, 64), seed=2)
    randomize_batchnorm(wide)
    cb = CentripetalSGDCallback.squeeze_to(narrow)
    cb.prepare(wide)
    project_onto_cluster_means(cb)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = wide(x).logits
    cb.slim(wide, inputs=x)
    narrow.load_state_dict(wide.state_dict(), strict=True)  # the trimmed wide net *is* the original architecture
    with torch.no_grad():
        assert_fp32_close(narrow(x).logits, before)


# ------------------------------------------------------------------------------------------------ Trainer
def test_trainer_run_converges_and_trims_losslessly(tmp_path):
    model = tiny_resnet()
    x = torch.randn(4, 3, 16, 16)
    cb = CentripetalSGDCallback(keep_ratio=0.5, centripetal_strength=0.3, slim_on_train_end=False)
    Trainer(model=model, args=sgd_args(tmp_path, 360, weight_decay=1e-4), train_dataset=random_images(64, 0),
            callbacks=[cb]).train()
    assert cb.deviation_history[-1][1] < 1e-9 < cb.deviation_history[0][1]
    model.eval()
    with torch.no_grad():
        wide = model(x).logits
    cb.slim(model, inputs={"pixel_values": x})
    with torch.no_grad():
        assert_fp32_close(model(x).logits, wide)
    assert cb.plan.method == "csgd" and all(gp.width == gp.group.size // 2 for gp in cb.plan.groups)


def test_unconverged_trim_refuses_and_leaves_the_model_untouched(tmp_path):
    model = tiny_resnet()
    cb = CentripetalSGDCallback(keep_ratio=0.5, check_inputs={"pixel_values": torch.randn(2, 3, 16, 16)})
    state = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model=model, args=sgd_args(tmp_path, 3), train_dataset=random_images(32, 0), callbacks=[cb])
    with pytest.raises(RuntimeError, match="have not converged"):
        trainer.train()
    assert all(model.state_dict()[k].shape == v.shape for k, v in state.items())


def vit_dataset(n, seed):
    return random_images(n, seed, size=32)


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    """Spec T7 on a BN-free model (tiny ViT MLP groups): GA 2 x 8 = one batch of 16."""
    states = []
    for bs, ga in ((16, 1), (8, 2)):
        model = tiny_vit(num_labels=5)
        cb = CentripetalSGDCallback(keep_ratio=0.5, centripetal_strength=0.1, slim_on_train_end=False)
        Trainer(model=model, args=sgd_args(tmp_path, 4, per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                                           learning_rate=0.05), train_dataset=vit_dataset(64, 0),
                callbacks=[cb]).train()
        states.append(model.state_dict())
    for k in states[0]:
        assert_fp32_close(states[0][k], states[1][k])


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_give_clear_errors(tmp_path):
    model = tiny_resnet()
    with pytest.raises(ValueError, match="cannot keep 99 clusters"):
        CentripetalSGDCallback(keep_ratio={"stem": 99}).prepare(model)
    with pytest.raises(ValueError, match="nothing to prune"):
        CentripetalSGDCallback(keep_ratio=1.0).prepare(model)
    with pytest.raises(ValueError, match="No prunable channel groups"):
        CentripetalSGDCallback().prepare(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="match no selected channel group"):
        CentripetalSGDCallback(keep_ratio={"stage9*": 0.5}).prepare(model)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        CentripetalSGDCallback(keep_ratio=1.5)
    with pytest.raises(ValueError, match="cluster_method"):
        CentripetalSGDCallback(cluster_method="random")
    with pytest.raises(ValueError, match="not a multiple of round_to"):
        CentripetalSGDCallback(keep_ratio={"stem": 3}, round_to=4).prepare(model)
    frozen = tiny_resnet()
    frozen.resnet.embedder.embedder.convolution.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        CentripetalSGDCallback(keep_ratio=0.5).prepare(frozen)
    cb = CentripetalSGDCallback(keep_ratio=0.5)
    cb.prepare(model)
    with pytest.raises(ValueError, match="needs torch.optim.SGD.*centripetal contraction"):
        cb.check_optimizer(torch.optim.Adam(model.parameters()))
    cb.config.allow_adaptive_optimizer = True
    with pytest.warns(UserWarning, match="needs torch.optim.SGD"), pytest.raises(ValueError, match="applies weight decay"):
        cb.check_optimizer(torch.optim.AdamW(model.parameters(), weight_decay=0.01))
    with pytest.warns(UserWarning, match="needs torch.optim.SGD"):
        cb.check_optimizer(torch.optim.AdamW(model.parameters(), weight_decay=0.0))
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    args.fsdp = ["full_shard"]  # what TrainingArguments(fsdp=...) sets; building it for real needs a launcher
    with pytest.raises(ValueError, match="FSDP"):
        CentripetalSGDCallback().on_train_begin(args, None, None, model=model, optimizer=None)


def test_widths_for_flops_and_optimizer_helper():
    model = tiny_resnet()
    x = torch.randn(1, 3, 32, 32)
    widths = widths_for_flops(model, x, 0.5)
    fm = FlopsModel.measure(model, x, find_channel_groups(model))
    assert 0.4 < fm.ratio(widths) <= 0.5
    opt = torch.optim.SGD(csgd_param_groups(model, lr=0.1), lr=0.1, momentum=0.9, nesterov=True)
    assert opt.defaults["nesterov"] and {g["weight_decay"] for g in opt.param_groups} == {1e-4, 0.0}
    assert max(g["lr"] for g in opt.param_groups) == pytest.approx(0.2)


# ------------------------------------------------------------------------------------------------ accelerate launch
DDP_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from safetensors.torch import save_file
from transformers import Trainer, TrainingArguments
from peft_effadapt.pruning.csgd import CentripetalSGDCallback
from peft_effadapt.testing import tiny_vit
sys.path.insert(0, {tests!r})
from test_csgd import vit_dataset
bs, out = int(sys.argv[1]), sys.argv[2]
model = tiny_vit(num_labels=5)
cb = CentripetalSGDCallback(keep_ratio=0.5, centripetal_strength=0.1, check_equivalence=False)  # 6 steps
args = TrainingArguments(output_dir=out + "_run", max_steps=6, per_device_train_batch_size=bs, learning_rate=0.05,
                         optim="sgd", optim_args="momentum=0.9", max_grad_norm=0, report_to=[], save_strategy="no",
                         use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)
Trainer(model=model, args=args, train_dataset=vit_dataset(96, 0), callbacks=[cb]).train()
assert args.world_size == (2 if bs == 8 else 1), args.world_size
if args.process_index == 0:
    save_file({{k: v.contiguous() for k, v in model.state_dict().items()}}, out)
"""


@pytest.mark.slow
def test_two_process_gloo_run_gives_the_same_slimmed_model(tmp_path):
    """2 CPU processes x batch 8 under `accelerate launch` = 1 process x batch 16: same clusters, same slimmed model.
    (BN-free tiny ViT: with BN, per-process batch statistics legitimately differ from full-batch ones.)"""
    script = tmp_path / "ddp_csgd.py"
    script.write_text(DDP_SCRIPT.format(tests=str(REPO / "tests")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # `--cpu --num_processes 2` would start ONE process (accelerate's simple launcher); `--multi_gpu` goes through
    # torchrun and, with TrainingArguments(use_cpu=True), gives 2 CPU processes on gloo (checked: world_size 2)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]
    runs = {"ddp": launch + ["--num_processes", "2", str(script), "8"],
            "single": [sys.executable, str(script), "16"]}
    for name, cmd in runs.items():
        result = subprocess.run(cmd + [str(tmp_path / f"{name}.safetensors")], capture_output=True, text=True,
                                env=env, cwd=tmp_path, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
    ddp, single = load_file(str(tmp_path / "ddp.safetensors")), load_file(str(tmp_path / "single.safetensors"))
    assert ddp.keys() == single.keys()
    assert ddp["vit.layers.0.mlp.fc1.weight"].shape[0] == 32  # slimmed from 64
    for k in ddp:
        assert_fp32_close(ddp[k], single[k])


def test_bf16_autocast_training_still_trims(tmp_path):
    model = tiny_vit(num_labels=5)
    cb = CentripetalSGDCallback(keep_ratio=0.5, centripetal_strength=0.5, check_equivalence=False)
    Trainer(model=model, args=sgd_args(tmp_path, 5, bf16=True), train_dataset=vit_dataset(32, 0),
            callbacks=[cb]).train()
    assert model.vit.layers[0].mlp.fc1.out_features == 32 and model.vit.layers[0].mlp.fc1.weight.dtype == torch.float32
    assert copy.deepcopy(cb.plan).widths == {"vit.layers.0.mlp": 32, "vit.layers.1.mlp": 32}


def test_resume_from_checkpoint_restores_the_clusters(tmp_path):
    data = random_images(32, 0)
    first = CentripetalSGDCallback(keep_ratio=0.5, cluster_method="kmeans", slim_on_train_end=False)
    args = sgd_args(tmp_path, 4, save_strategy="steps", save_steps=2)
    Trainer(model=tiny_resnet(), args=args, train_dataset=data, callbacks=[first]).train()
    other = CentripetalSGDCallback(keep_ratio=0.5, slim_on_train_end=False, kmeans_seed=123)
    trainer = Trainer(model=tiny_resnet(seed=5), args=sgd_args(tmp_path, 6), train_dataset=data, callbacks=[other])
    # the shared Trainer core restores the schedule state from the checkpoint itself (no Trainer flag needed)
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    assert other.clusters == first.clusters  # not re-clustered from the resumed weights with the other seed
    other = CentripetalSGDCallback(keep_ratio=0.5, slim_on_train_end=False, kmeans_seed=123)
    trainer = Trainer(model=tiny_resnet(seed=5), args=sgd_args(tmp_path, 6, restore_callback_states_from_checkpoint=True),
                      train_dataset=data, callbacks=[other])
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    restored = next(c for c in trainer.callback_handler.callbacks if isinstance(c, CentripetalSGDCallback))
    assert restored.clusters == first.clusters  # not re-clustered from the resumed weights


def test_fp16_loss_scale_is_applied_to_the_pull():
    """Gradients still multiplied by a GradScaler's scale get the regularising terms scaled alike."""
    import types

    model = plain_cnn()
    cb = CentripetalSGDCallback(keep_ratio=0.5, centripetal_strength=0.2, weight_decay=0.0)
    cb.prepare(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    loss = model(torch.randn(4, 3, 8, 8)).square().mean()
    scaler.scale(loss).backward()
    t = cb._entries[0].tensors[0]
    raw = t.param.grad / 1024.0
    cb.edit_gradients(types.SimpleNamespace(optimizer=opt, scaler=scaler))
    scaler.unscale_(opt)
    want = centripetal_gradient(t.param, raw, cb._entries[0].labels, 0.2)
    torch.testing.assert_close(t.param.grad, want, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_example_prunes_saves_and_reloads(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "examples/csgd_resnet.py"), "--steps", "200", "--batch-size", "16", "--lr", "0.01",
           "--strength", "3", "--train-per-class", "16", "--output-dir", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "identical logits = True" in result.stdout
    assert (tmp_path / "slimmed" / "slimming_plan.json").exists()


def test_state_round_trips_through_json_with_explicit_groups():
    import json

    model = tiny_resnet()
    groups = [g for g in find_channel_groups(model) if g.internal]
    cb = CentripetalSGDCallback(keep_ratio=0.5, groups=groups)
    cb.prepare(model)
    state = json.loads(json.dumps(cb.state()))  # what the Trainer writes into trainer_state.json
    again = CentripetalSGDCallback(**state["args"])
    for key, value in state["attributes"].items():
        setattr(again, key, value)
    assert again.groups == groups and again.prepare(tiny_resnet(seed=3)) == cb.clusters


def test_bf16_parameters_are_edited_in_float32_and_trim():
    model = plain_cnn().to(torch.bfloat16)
    cb = CentripetalSGDCallback(keep_ratio=0.5, centripetal_strength=0.2)
    cb.prepare(model)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    t = cb._entries[0].tensors[0]
    want = centripetal_gradient(t.param.float(), t.param.grad.float(), cb._entries[0].labels, 0.2, 1e-4)
    cb.edit_gradients()
    assert t.param.grad.dtype == torch.bfloat16
    torch.testing.assert_close(t.param.grad.float(), want, rtol=1e-2, atol=1e-2)
    project_onto_cluster_means(cb)
    x = torch.randn(2, 3, 8, 8, dtype=torch.bfloat16)
    cb.slim(model, inputs=x)  # the equivalence check runs on a float32 copy
    assert model[0].out_channels == 4 and model[0].weight.dtype == torch.bfloat16
