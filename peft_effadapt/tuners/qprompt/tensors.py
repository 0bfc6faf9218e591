"""The latent tensors of one QPrompt adapter, their quantisers, and their stored form (packed indices + codebook)."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from ...quantization import (
    GaussianNoise,
    Identity,
    KMeansQuantizer,
    UniformQuantizer,
    pack_indices,
    packed_length,
    straight_through,
    unpack_indices,
)
from .config import QPromptConfig

INDICES, CODEBOOK = "_indices", "_codebook"


def make_quantizer(config: QPromptConfig):
    if config.quantizer == "kmeans":
        return KMeansQuantizer(config.bits, normalize=config.normalize, refit=config.refit, t_min=config.t_min,
                               kl_threshold=config.kl_threshold, eps=config.kl_eps, max_iter=config.kmeans_max_iter,
                               tol=config.kmeans_tol)
    if config.quantizer == "uniform":
        return UniformQuantizer(config.bits)
    if config.quantizer == "noise":
        return GaussianNoise(config.noise_std)
    return Identity()


def select_tensors(patterns: list[str], names: list[str], host: str, strict: bool = True) -> list[str]:
    """Tensor names matched by the patterns ('*' wildcards); raises when the selection is empty or (`strict`, for
    user-given patterns) when one pattern matches nothing."""
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    unmatched = [p for p in patterns if strict and not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if not chosen or unmatched:
        raise ValueError(
            f"quantize_tensors={patterns!r} selects {'nothing' if not chosen else 'no tensor for ' + repr(unmatched)}: "
            f"the {host} prompt has the tensors {names}."
        )
    return chosen


@dataclass
class Pin:
    """Values loaded from a file: used as long as the latent still equals `latent` (exact reload)."""

    latent: torch.Tensor
    values: torch.Tensor
    indices: torch.Tensor
    codebook: torch.Tensor


class QuantizedTensors(nn.Module):
    """Named fp32 latent parameters (flat names, e.g. 'ctx', 'B', 'deep_text_3'); the selected ones are quantised in
    every forward (train and eval) with a straight-through gradient to the latent.

    Each quantised tensor also owns two persistent buffers, its stored form: '<name>_indices' (packed uint8) and
    '<name>_codebook' (fp16, +inf until something is loaded into it). They are written by the save path (with the
    current quantisation) and read back lazily: whenever a loader (peft or transformers) has put a new stored form
    into them, the latent is set to the dequantised values (unless the latents were saved too) and those exact
    values are used as long as the latent stays unchanged.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], config: QPromptConfig, host: str) -> None:
        super().__init__()
        for name, value in tensors.items():
            self.register_parameter(name, nn.Parameter(value.float().contiguous()))
        self.names = list(tensors)
        self.quantize = select_tensors(config.tensor_patterns, self.names, host, strict=config.quantize_tensors is not None)
        self.codebook_form = config.quantized
        self.bits = config.bits if config.quantized else None
        self.save_latents = bool(config.save_latents)
        self.quantizers = {name: make_quantizer(config) for name in self.quantize}
        self.pins: dict[str, Pin] = {}
        self._decoded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._last: dict[str, tuple[bool, torch.Tensor, torch.Tensor]] = {}  # (training, latent, values) per tensor
        self._frozen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # (latent, eval value): freeze_for_inference
        if self.codebook_form:
            for name in self.quantize:
                numel = getattr(self, name).numel()
                self.register_buffer(name + INDICES, torch.zeros(packed_length(numel, self.bits), dtype=torch.uint8))
                self.register_buffer(name + CODEBOOK, torch.full((2**self.bits,), float("inf"), dtype=torch.float16))

    # -- loaded stored form -----------------------------------------------------------------------------------------
    def _sync_loaded(self, name: str) -> None:
        """Decodes '<name>_indices'/'<name>_codebook' if a loader wrote a new stored form into them."""
        if not self.codebook_form or name not in self.quantizers:
            return
        packed, codebook = getattr(self, name + INDICES), getattr(self, name + CODEBOOK)
        if not bool(torch.isfinite(codebook).all()):
            return  # nothing loaded
        seen = self._decoded.get(name)
        if seen is not None and torch.equal(seen[0], packed.cpu()) and torch.equal(seen[1], codebook.cpu()):
            return
        latent = getattr(self, name)
        indices = unpack_indices(packed.cpu(), self.bits, latent.numel()).reshape(latent.shape).to(latent.device)
        values = codebook.float().to(latent.device)[indices]
        if not self.save_latents:
            with torch.no_grad():
                latent.copy_(values)
        self.pins[name] = Pin(latent.detach().clone(), values, indices, codebook.detach().clone())
        self._last.pop(name, None)
        quantizer = self.quantizers[name]
        if isinstance(quantizer, KMeansQuantizer):
            quantizer.set_codebook(codebook.float(), latent.detach())
        self._decoded[name] = (packed.detach().cpu().clone(), codebook.detach().cpu().clone())

    def _pinned(self, name: str) -> Pin | None:
        self._sync_loaded(name)
        pin = self.pins.get(name)
        latent = getattr(self, name)
        if pin is not None and pin.latent.shape == latent.shape and torch.equal(
                pin.latent.to(latent.device), latent.detach()):
            return pin
        self.pins.pop(name, None)  # the latent moved on (training): quantise it from now on
        return None

    # -- forward ------------------------------------------------------------------------------------------------
    def value(self, name: str, training: bool) -> torch.Tensor:
        """The tensor as used in the forward pass: quantised (STE) if selected, else the latent itself. In eval mode
        after `freeze_for_inference`, the frozen quantised values (no quantiser runs: a compiled forward is one
        graph)."""
        latent = getattr(self, name)
        if name not in self.quantizers:
            return latent
        frozen = None if training else self._frozen.get(name)
        if frozen is not None and frozen[0].device == latent.device and (
                torch.compiler.is_compiling() or torch.equal(frozen[0], latent.detach())):
            return straight_through(latent, frozen[1])
        return self._live_value(name, training)

    def freeze_for_inference(self) -> None:
        """Computes the eval-mode value of every quantised tensor once, as deployed; `value` returns it in eval mode
        until `train()` (eager forwards also re-quantise a latent changed since; a compiled graph trusts the frozen
        values: compile again after changing the adapter). Called by `peft_effadapt.compile_for_inference`."""
        with torch.no_grad():
            self._frozen = {name: (getattr(self, name).detach().clone(), self._live_value(name, False).detach())
                            for name in self.quantizers}

    def train(self, mode: bool = True):
        if mode:
            self._frozen = {}
        return super().train(mode)

    @torch.compiler.disable
    def _live_value(self, name: str, training: bool) -> torch.Tensor:
        """The quantised value computed now (see `value`).

        Runs eagerly under torch.compile: the quantiser's control flow reads tensor values (loaded-form detection,
        cached quantisations, K-means to a tolerance, the refit schedule), and traced by inductor it trained to other
        values than eager (second-step loss off by 2e-5 relative; likely the fp16 round trip of the stored codebook,
        which inductor need not round inside a fused kernel)."""
        latent = getattr(self, name)
        if name not in self.quantizers:
            return latent
        pin = self._pinned(name)
        if pin is not None:
            return straight_through(latent, pin.values.to(latent.device))
        quantizer = self.quantizers[name]
        if not isinstance(quantizer, KMeansQuantizer):
            return straight_through(latent, quantizer(latent, training).values)
        # One CAC step per new latent value: a tensor read twice in one forward (MaPLe's ctx and deep prompts feed
        # both towers) or re-read without an optimizer step reuses its quantisation instead of advancing the schedule.
        last = self._last.get(name)
        if (last is not None and last[0] == training and last[1].device == latent.device
                and torch.equal(last[1], latent.detach())):  # a model moved to another device quantises afresh
            return straight_through(latent, last[2])
        values = quantizer(latent, training).values
        self._last[name] = (training, latent.detach().clone(), values)
        return straight_through(latent, values)

    def refits(self) -> dict[str, int]:
        return {n: q.refits for n, q in self.quantizers.items() if isinstance(q, KMeansQuantizer)}

    # -- storage ------------------------------------------------------------------------------------------------
    def encode(self, save_latents: bool) -> dict[str, torch.Tensor]:
        """The stored form: '<name>_indices' (uint8, packed) and '<name>_codebook' (fp16) per quantised tensor, the
        latent for every other tensor (and for all with `save_latents`)."""
        out = {}
        for name in self.names:
            latent = getattr(self, name).detach()
            if self.codebook_form and name in self.quantizers:
                pin = self._pinned(name)
                if pin is not None:
                    indices, codebook = pin.indices, pin.codebook
                else:
                    result = self.quantizers[name](latent, training=False)
                    indices, codebook = result.indices, result.codebook
                out[name + INDICES] = pack_indices(indices, self.bits)
                out[name + CODEBOOK] = codebook.detach().to(torch.float16).cpu().contiguous()
                if save_latents:
                    out[name] = latent.contiguous()
            else:
                out[name] = latent.contiguous()
        return out

    def expected_keys(self) -> dict[str, tuple]:
        """Stored tensor name -> shape, for the required tensors of a file (latents of quantised ones are optional)."""
        keys = {}
        for name in self.names:
            shape = tuple(getattr(self, name).shape)
            if self.codebook_form and name in self.quantizers:
                keys[name + INDICES] = (packed_length(int(torch.Size(shape).numel()), self.bits),)
                keys[name + CODEBOOK] = (2**self.bits,)
            else:
                keys[name] = shape
        return keys

    def decoded_latents(self, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """For each quantised tensor stored without its latent (`save_latents=False`, the default): the latent as
        codebook[indices], the value the layer pins at its first use anyway, so that loading sees no missing key."""
        out = {}
        for name in self.quantizers if self.codebook_form else ():
            if name in stored or name + INDICES not in stored:
                continue
            latent = getattr(self, name)
            indices = unpack_indices(stored[name + INDICES].cpu(), self.bits, latent.numel()).reshape(latent.shape)
            out[name] = stored[name + CODEBOOK].float().cpu()[indices].to(latent.dtype)
        return out

    def check_stored(self, stored: dict[str, torch.Tensor], where: str) -> None:
        """Raises ValueError naming the first missing, unexpected, mis-shaped or invalid stored tensor (keys without
        the layer prefix); touches nothing."""
        expected = self.expected_keys()
        optional = {n: tuple(getattr(self, n).shape) for n in self.quantize if self.codebook_form}
        missing = sorted(set(expected) - set(stored))
        extra = sorted(set(stored) - set(expected) - set(optional))
        if missing or extra:
            raise ValueError(
                f"The QPrompt adapter file does not match '{where}': missing tensors {missing or 'none'}, unexpected "
                f"tensors {extra or 'none'}. The file is damaged or its adapter_config.json does not describe it."
            )
        for key, tensor in stored.items():
            shape = expected.get(key, optional.get(key))
            if tuple(tensor.shape) != shape:
                raise ValueError(
                    f"{key} of '{where}' has shape {tuple(tensor.shape)} in the QPrompt adapter file, but the adapter "
                    f"config needs {shape} (bits={self.bits}): the packed length and the config disagree, or the "
                    "file targets another model."
                )
            if not key.endswith(INDICES) and not tensor.is_floating_point():
                raise ValueError(
                    f"{key} of '{where}' is stored as {tensor.dtype} in the QPrompt adapter file, but it holds "
                    "floating-point values: the file is damaged or was not written by this method."
                )
            if key.endswith(INDICES) and tensor.dtype != torch.uint8:
                raise ValueError(f"{key} of '{where}' must hold packed uint8 indices, got {tensor.dtype}.")
            if key.endswith(CODEBOOK) and not bool(torch.isfinite(tensor.float()).all()):
                raise ValueError(f"{key} of '{where}' holds non-finite values: invalid codebook.")
