# Copyright (c) MONAI generative bundles contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""The VAE-GAN trainer: MONAI's ``AdversarialTrainer`` with the KL and perceptual terms a KL autoencoder needs."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines import AdversarialTrainer, IterationEvents
from monai.utils import AdversarialIterationEvents, AdversarialKeys, CommonKeys

from .checkpoint import unwrap_module
from .losses import kl_divergence

KL_LOSS = "kl_loss"
PERCEPTUAL_LOSS = "perceptual_loss"


class VAEGANTrainer(AdversarialTrainer):
    """
    ``AdversarialTrainer`` for a variational autoencoder whose forward returns ``(reconstruction, z_mu, z_sigma)``.

    One iteration:

    1. generator step: ``recon_loss + kl_weight * KL + perceptual_weight * perceptual + adv_weight * g_adv``,
       where the discriminator is evaluated with frozen parameters (no discriminator gradients are
       computed or all-reduced during this step);
    2. discriminator step: ``adv_weight * d_loss_function(real_logits, fake_logits)`` on the detached
       reconstruction.

    The losses and gradients are those of the model-zoo ``VaeGanTrainer`` (which also computes discriminator
    weight gradients in step 1 and then discards them).

    Events: like ``SupervisedTrainer``, the iteration fires MONAI's ``IterationEvents`` for the generator
    (``state.g_network``), which plays the part of ``SupervisedTrainer``'s network:
    ``FORWARD_COMPLETED`` after the autoencoder forward, ``LOSS_COMPLETED`` once the generator loss is
    complete (``state.output["loss"]``), ``BACKWARD_COMPLETED`` after its backward and before its optimizer
    step (where gradient clipping or AMP-scaler hooks act), and ``MODEL_COMPLETED`` at the end of the
    iteration, after both updates. It also fires ``AdversarialIterationEvents`` at the points where
    ``AdversarialTrainer`` fires them, so handlers written for either trainer run. ``state.output`` is
    the same dict throughout the iteration, filled as the values become available.

    The discriminator is expected to return a list of feature maps whose last entry is the logits
    (``monai.networks.nets.PatchDiscriminator``). ``g_loss_function(fake_logits)`` and
    ``d_loss_function(real_logits, fake_logits)`` are the adversarial terms (see ``scripts.losses``).
    The engine output carries the usual ``AdversarialKeys`` plus ``kl_loss`` and ``perceptual_loss``.

    Parameters
    ----------
    kl_weight
        weight of the KL divergence.
    perceptual_loss
        a frozen perceptual loss module, or ``None`` to skip the term.
    perceptual_weight
        weight of the perceptual term.
    adv_weight
        weight of the adversarial terms; 0 disables both the generator's adversarial term and
        the discriminator update.
    kwargs
        the arguments of ``monai.engines.AdversarialTrainer``. ``decollate`` defaults to ``False`` here:
        the logging handlers read the loss terms from the output dict (``loss_terms``), and a decollated
        output (a list of per-slice dicts) would only repeat the batch's scalar losses per slice.
    """

    def __init__(
        self,
        kl_weight: float,
        perceptual_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
        perceptual_weight: float,
        adv_weight: float,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("decollate", False)
        super().__init__(**kwargs)
        self.kl_weight = kl_weight
        self.perceptual_loss = perceptual_loss
        self.perceptual_weight = perceptual_weight
        self.adv_weight = adv_weight

    def _autocast(self) -> torch.autocast:
        device_type = torch.device(self.state.device).type
        return torch.autocast(device_type=device_type, enabled=self.amp, **self.amp_kwargs)

    def _fire(self, *events: Any) -> None:
        for event in events:
            self.fire_event(event)

    @staticmethod
    def _backward(loss: torch.Tensor, scaler: Any) -> None:
        (loss if scaler is None else scaler.scale(loss)).backward()

    @staticmethod
    def _optimizer_step(optimizer: torch.optim.Optimizer, scaler: Any) -> None:
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()

    def _generator_loss(self, inputs: torch.Tensor, targets: torch.Tensor, output: dict) -> torch.Tensor:
        """Forward the autoencoder and compute the generator loss, filling ``output`` (events fired on the way)."""
        state = self.state
        reconstruction, z_mu, z_sigma = state.g_network(inputs)
        output.update({AdversarialKeys.FAKES: reconstruction, CommonKeys.PRED: reconstruction})
        self._fire(IterationEvents.FORWARD_COMPLETED, AdversarialIterationEvents.GENERATOR_FORWARD_COMPLETED)
        recon_loss = state.recon_loss_function(reconstruction.float(), targets.float()).mean()
        output[AdversarialKeys.RECONSTRUCTION_LOSS] = recon_loss.detach()
        self.fire_event(AdversarialIterationEvents.RECONSTRUCTION_LOSS_COMPLETED)
        kl_loss = kl_divergence(z_mu, z_sigma)
        loss = recon_loss + self.kl_weight * kl_loss
        perceptual = torch.zeros((), device=inputs.device)
        if self.perceptual_loss is not None and self.perceptual_weight > 0:
            perceptual = self.perceptual_loss(reconstruction.float(), targets.float())
            loss = loss + self.perceptual_weight * perceptual
        generator_adv = torch.zeros((), device=inputs.device)
        if self.adv_weight > 0:
            fake_logits = unwrap_module(state.d_network)(reconstruction.float().contiguous())[-1]
            self.fire_event(AdversarialIterationEvents.GENERATOR_DISCRIMINATOR_FORWARD_COMPLETED)
            generator_adv = state.g_loss_function(fake_logits)
            loss = loss + self.adv_weight * generator_adv
        output.update(
            {
                KL_LOSS: kl_loss.detach(),
                PERCEPTUAL_LOSS: perceptual.detach(),
                AdversarialKeys.GENERATOR_LOSS: generator_adv.detach(),
                CommonKeys.LOSS: loss.detach(),
            }
        )
        self._fire(IterationEvents.LOSS_COMPLETED, AdversarialIterationEvents.GENERATOR_LOSS_COMPLETED)
        return loss

    def _generator_step(self, inputs: torch.Tensor, targets: torch.Tensor, output: dict) -> torch.Tensor:
        state = self.state
        discriminator = unwrap_module(state.d_network)
        state.g_network.train()
        state.g_optimizer.zero_grad(set_to_none=self.optim_set_to_none)
        discriminator.requires_grad_(False)
        try:
            with self._autocast():
                loss = self._generator_loss(inputs, targets, output)
            self._backward(loss, state.g_scaler)
        finally:
            discriminator.requires_grad_(True)
        self._fire(IterationEvents.BACKWARD_COMPLETED, AdversarialIterationEvents.GENERATOR_BACKWARD_COMPLETED)
        self._optimizer_step(state.g_optimizer, state.g_scaler)
        self.fire_event(AdversarialIterationEvents.GENERATOR_MODEL_COMPLETED)
        return output[AdversarialKeys.FAKES]

    def _discriminator_step(self, inputs: torch.Tensor, reconstruction: torch.Tensor, output: dict) -> None:
        state = self.state
        if self.adv_weight <= 0:
            output[AdversarialKeys.DISCRIMINATOR_LOSS] = torch.zeros((), device=inputs.device)
            return
        state.d_network.train()
        state.d_optimizer.zero_grad(set_to_none=self.optim_set_to_none)
        with self._autocast():
            fake_logits = state.d_network(reconstruction.detach().float().contiguous())[-1]
            self.fire_event(AdversarialIterationEvents.DISCRIMINATOR_FAKES_FORWARD_COMPLETED)
            real_logits = state.d_network(inputs.float().contiguous())[-1]
            self.fire_event(AdversarialIterationEvents.DISCRIMINATOR_REALS_FORWARD_COMPLETED)
            d_loss = self.adv_weight * state.d_loss_function(real_logits, fake_logits)
        output.update(
            {
                AdversarialKeys.REAL_LOGITS: real_logits.detach(),
                AdversarialKeys.FAKE_LOGITS: fake_logits.detach(),
                AdversarialKeys.DISCRIMINATOR_LOSS: d_loss.detach(),
            }
        )
        self.fire_event(AdversarialIterationEvents.DISCRIMINATOR_LOSS_COMPLETED)
        self._backward(d_loss, state.d_scaler)
        self.fire_event(AdversarialIterationEvents.DISCRIMINATOR_BACKWARD_COMPLETED)
        self._optimizer_step(state.d_optimizer, state.d_scaler)
        self.fire_event(AdversarialIterationEvents.DISCRIMINATOR_MODEL_COMPLETED)

    def _iteration(self, engine: VAEGANTrainer, batchdata: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Run one generator step and one discriminator step on ``batchdata``."""
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        inputs = batch[0]
        targets = inputs if batch[1] is None else batch[1]
        output: dict[str, Any] = {CommonKeys.IMAGE: inputs, CommonKeys.LABEL: targets, AdversarialKeys.REALS: inputs}
        engine.state.output = output
        reconstruction = engine._generator_step(inputs, targets, output)
        engine._discriminator_step(inputs, reconstruction, output)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


def loss_terms(output: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """
    Pick the scalar loss terms of an engine output for logging (VAE-GAN and diffusion trainers alike).

    A decollated output (a list of per-item dicts, ``decollate=True``) repeats the batch's losses in every
    item; the first item's are taken.
    """
    if isinstance(output, Sequence):
        output = output[0]
    names = (
        CommonKeys.LOSS,
        AdversarialKeys.RECONSTRUCTION_LOSS,
        KL_LOSS,
        PERCEPTUAL_LOSS,
        AdversarialKeys.GENERATOR_LOSS,
        AdversarialKeys.DISCRIMINATOR_LOSS,
    )
    return {name: float(output[name]) for name in names if name in output}


def every_n_iterations(interval: int) -> Callable[[Any, int], bool]:
    """Event filter for ``StatsHandler(iteration_log=...)``: log every ``interval`` iterations."""
    if interval < 1:
        raise ValueError(f"log_every_n_iterations={interval} is not allowed; it must be an integer >= 1.")
    return lambda engine, event: event % interval == 0


class TerminateOnNan:
    """
    Stop training as soon as a loss is NaN or infinite, and fail loudly.

    Unlike ``ignite.handlers.TerminateOnNan`` (which ends the run normally, so the ``COMPLETED`` handlers
    would checkpoint and export the broken weights), this raises ``FloatingPointError`` on
    ``ITERATION_COMPLETED``: the exported model and ``checkpoint_last.pt`` keep the last good state.

    Parameters
    ----------
    output_transform
        extracts the loss from ``engine.state.output``: a tensor/number, or a mapping of named loss terms
        (e.g. ``loss_terms``), all of which are checked. Default: the ``"loss"`` entry.
    """

    def __init__(self, output_transform: Callable[[Any], Any] | None = None) -> None:
        self.output_transform = output_transform or (lambda output: output[CommonKeys.LOSS])

    def attach(self, engine: Engine) -> None:
        """Check the loss after every iteration."""
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        value = self.output_transform(engine.state.output)
        terms = value if isinstance(value, Mapping) else {"loss": value}
        bad = {}
        for name, term in terms.items():
            term = torch.as_tensor(term).detach()
            if not bool(torch.isfinite(term).all()):
                bad[name] = term.cpu().reshape(-1).tolist()
        if bad:
            shown = ", ".join(f"{name} is {values}" for name, values in bad.items())
            raise FloatingPointError(
                f"the training {shown} at epoch {engine.state.epoch}, iteration {engine.state.iteration}; "
                "stopped without exporting. Lower lr, or set amp=false."
            )


class _DiscardingWriter:
    """Stands in for a ``SummaryWriter`` on ranks other than 0: every method accepts anything and does nothing."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def rank_zero_summary_writer(log_dir: str) -> Any:
    """
    A TensorBoard ``SummaryWriter`` on rank 0 (or without ``torch.distributed``), a discarding stand-in elsewhere.

    ``SummaryWriter`` creates its event file as soon as it is built, so building it on every rank of a
    ``torchrun`` job would leave one empty event file per extra rank next to rank 0's logs.

    Parameters
    ----------
    log_dir
        TensorBoard folder (config id ``tensorboard_dir``).

    Returns
    -------
    Any
        ``torch.utils.tensorboard.SummaryWriter(log_dir)`` on rank 0, otherwise an object whose methods
        (``add_scalar``, ``add_image``, ``flush``, ``close``, ...) do nothing.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return _DiscardingWriter()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=log_dir)
