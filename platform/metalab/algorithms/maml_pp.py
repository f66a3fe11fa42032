"""MAML++: MAML with the training fixes of "How to train your MAML".

Reference: Antoniou, Edwards & Storkey, "How to train your MAML", ICLR 2019 (arXiv:1810.09502); the
authors' code, github.com/AntreasAntoniou/HowToTrainYourMAMLPytorch (``few_shot_learning_system.py``,
``inner_loop_optimizers.py``, ``meta_neural_network_architectures.py``), settles what the text leaves open.

The inner loop is functional (``torch.func.functional_call`` over the network's named parameters, on a
per-task shallow copy of its module tree, so that tasks adapted at once on threads do not share module
objects), so that step k can put its own learning rates, batch-norm weights and running statistics into the
network. Each
component has its own switch, all on by default:

- LSLR (``per_step_lr``): one learned rate per parameter tensor per inner step, initialised at ``inner_lr``.
  Off: every step uses the fixed ``inner_lr`` (MAML).
- BNWB (``per_step_bn_weights``): step k normalises with its own meta-learned batch-norm weight and bias
  (step 0 with the network's own, so ``model(x)`` is the unadapted predictor); as in the authors' code they
  are not adapted in the inner loop. Off: one batch-norm weight and bias, adapted like every other
  parameter (MAML, learn2learn).
- BNRS (``per_step_bn_statistics``): step k updates its own running mean and variance (buffers, in the
  checkpoint). Normalisation always uses the batch's statistics while batch norm is in train mode, which is
  how metalab evaluates (transductively: the learner puts batch norm in train mode) and how the authors'
  code evaluates (``F.batch_norm(..., training=True)`` everywhere; it backs up the running statistics before
  each evaluation task and restores them after). So, there as here, BNRS changes no prediction of the
  evaluation; evaluation never updates the statistics, and a network whose batch norm is put in eval mode
  normalises step k with step k's running statistics. Off: the layers' own running statistics (MAML).
- MSL (``multi_step_loss``): the task's meta-objective is Σ_k w_k · L_query(after step k), w annealed from
  uniform to the final step over ``multi_step_loss_epochs`` epochs (:func:`multi_step_loss_weights`); then,
  and with MSL off, the final step's query loss alone (MAML).
- DA (``first_order_epochs``): first-order meta-gradients (no graph of the inner gradients) while the
  meta-iteration ``context.step < first_order_epochs * steps_per_epoch``, second order after. 0: second
  order throughout (MAML).
- CA, the cosine-annealed outer learning rate, is the platform's ``scheduler=cosine``, not this class.

An epoch is ``steps_per_epoch`` meta-iterations (the paper's 500); the schedules use whole epochs, as the
authors' code does. Evaluation (``context.training`` false) adapts detached copies: no graph back to the
meta-parameters. With more evaluation steps than training steps (``eval_inner_steps``, the inner-step curve),
steps beyond the last trained one reuse its rates, batch-norm weights and statistics.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from metalab.algorithms.base import Context, FitReport, GradientBasedAlgorithm, Predictor, episode_zero_head
from metalab.algorithms.functional import task_local_modules
from metalab.errors import ConfigError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from metalab.tasks.episodes import Task

Weights = dict[str, Tensor]  # a network's parameters (and buffers) by name, for functional_call

MIN_NON_FINAL_WEIGHT = 0.03  # the authors' floor for the earlier steps' MSL weights, divided by the steps


def multi_step_loss_weights(steps: int, epoch: int, epochs: int) -> list[float]:
    """MSL's importance of the query loss after each of ``steps`` inner steps, at ``epoch`` (0-based) of an
    annealing over ``epochs`` epochs (the authors' ``get_per_step_loss_importance_vector``).

    Uniform (1/N each) at epoch 0; each earlier step loses 1/(N·epochs) per epoch, down to 0.03/N, and the
    final step gains what they lose, so the weights sum to 1. From ``epoch >= epochs`` on, the final step's
    loss alone: ``[0, …, 0, 1]``.
    """
    if epoch >= epochs:
        return [0.0] * (steps - 1) + [1.0]
    decay = 1.0 / steps / epochs
    floor = MIN_NON_FINAL_WEIGHT / steps
    earlier = max(1.0 / steps - epoch * decay, floor)
    final = min(1.0 / steps + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * floor)
    return [earlier] * (steps - 1) + [final]


def _key(name: str) -> str:
    """A dotted parameter name as a ParameterDict / buffer key (which may not hold dots)."""
    return name.replace(".", "-")


class MAMLPlusPlus(GradientBasedAlgorithm):
    """MAML with LSLR, BNWB, BNRS, MSL and DA (module docstring), each switched by its own argument.

    Arguments:
        model: the network whose initialisation is meta-learned.
        inner_lr: the inner SGD step size (the initial value of every learned rate with LSLR).
        inner_steps: inner steps during meta-training; LSLR, BNWB and BNRS keep one copy per step.
        eval_inner_steps: inner steps at validation/test; ``None`` = ``inner_steps``.
        per_step_lr: LSLR. per_step_bn_weights: BNWB. per_step_bn_statistics: BNRS.
        multi_step_loss: MSL, annealed to the final step's loss over ``multi_step_loss_epochs`` epochs.
        first_order_epochs: DA, epochs of first-order meta-gradients before second order (0: none).
        steps_per_epoch: meta-iterations per epoch of the schedules (the paper: 500).
        inner_checkpointing: on second-order meta-iterations, recompute each inner step's activations in the
            outer backward (memory of one step, not ``inner_steps``; not under ``runner.backend=vmap``).
        zero_head: each episode's linear head (``model.head``) starts at zero, sized to its ways, as
            :class:`~metalab.algorithms.MAML`'s: any number of ways (``task.sampler=meta_dataset``), the model's
            own head unused. The head's per-step rates (LSLR: one scalar per tensor per step) step the zero head,
            so they stay meta-learned; no ``pre_*`` metrics.

    At the end of meta-training, with LSLR, the learned rates are summarised (``maml_pp/lr_mean``, ``_std``,
    ``_min``, ``_max``, ``_negative_fraction``; ``maml_pp/lr_mean_step<k>``, k = 1…inner_steps) and drawn per
    parameter tensor and step as ``maml_pp_lrs.png``.

    Example (what the runner does per task)::

        prediction, loss = maml_pp.query_loss(task, context)   # Σ_k w_k L_query(after step k)
        grad(loss, maml_pp.meta_parameters())                  # network, rates, per-step BN weights
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.1, inner_steps: int = 5,
                 eval_inner_steps: int | None = None, per_step_lr: bool = True, per_step_bn_weights: bool = True,
                 per_step_bn_statistics: bool = True, multi_step_loss: bool = True, multi_step_loss_epochs: int = 15,
                 first_order_epochs: int = 50, steps_per_epoch: int = 500, inner_checkpointing: bool = False,
                 zero_head: bool = False) -> None:
        super().__init__(inner_lr, inner_steps, eval_inner_steps)
        self._checkpointing(inner_checkpointing, first_order=False)  # DA's first-order epochs just skip it
        self._zero_head(model, zero_head, checkpointing_allowed=True)  # the checkpointed steps take any weights
        if multi_step_loss and multi_step_loss_epochs < 1:
            raise ConfigError(f"algorithm.multi_step_loss_epochs must be >= 1 with multi_step_loss=true, got "
                              f"{multi_step_loss_epochs}; to switch MSL off set algorithm.multi_step_loss=false")
        if first_order_epochs < 0:
            raise ConfigError(f"algorithm.first_order_epochs must be >= 0 (0: second order throughout), got "
                              f"{first_order_epochs}")
        if steps_per_epoch < 1:
            raise ConfigError(f"algorithm.steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.network = model
        self.inner_lr = inner_lr
        self.per_step_lr, self.per_step_bn_weights = per_step_lr, per_step_bn_weights
        self.per_step_bn_statistics, self.multi_step_loss = per_step_bn_statistics, multi_step_loss
        self.multi_step_loss_epochs, self.first_order_epochs = multi_step_loss_epochs, first_order_epochs
        self.steps_per_epoch = steps_per_epoch

        norms = {name: module for name, module in model.named_modules()
                 if isinstance(module, nn.modules.batchnorm._BatchNorm)}
        parameters = dict(model.named_parameters())
        # BNWB: the affine batch-norm parameters get one copy per step; steps 1.. are extra meta-parameters.
        self.bn_parameter_names = [f"{name}.{kind}" for name, module in norms.items() if module.affine
                                   for kind in ("weight", "bias")] if per_step_bn_weights else []
        self.bn_weights = nn.ParameterDict({
            _key(name): nn.Parameter(parameters[name].detach().expand(inner_steps - 1, -1).clone())
            for name in self.bn_parameter_names})  # each (inner_steps - 1, C): steps 1, 2, …
        # BNRS: per-step running statistics, each (inner_steps, C), in a module of their own (buffers, no dots).
        self.bn_buffer_names = [f"{name}.{kind}" for name, module in norms.items() if module.track_running_stats
                                for kind in ("running_mean", "running_var")] if per_step_bn_statistics else []
        self.bn_statistics = nn.Module()
        buffers = dict(model.named_buffers())
        for name in self.bn_buffer_names:
            self.bn_statistics.register_buffer(_key(name), buffers[name].detach().expand(inner_steps, -1).clone())
        # The inner loop adapts every trainable parameter but the per-step batch-norm ones.
        self.adapted_names = [name for name, p in parameters.items()
                              if p.requires_grad and name not in self.bn_parameter_names]
        # LSLR: one rate per adapted parameter tensor per step, each (inner_steps,).
        self.rates = nn.ParameterDict({
            _key(name): nn.Parameter(torch.full((inner_steps,), inner_lr, dtype=parameters[name].dtype,
                                                device=parameters[name].device))
            for name in self.adapted_names}) if per_step_lr else nn.ParameterDict()

    @property
    def model(self) -> nn.Module:
        return self.network

    def first_order(self, step: int) -> bool:
        """DA: whether meta-iteration ``step`` takes first-order meta-gradients."""
        return step < self.first_order_epochs * self.steps_per_epoch

    def loss_weights(self, step: int, inner_steps: int | None = None) -> list[float]:
        """MSL: the importance of each inner step's query loss at meta-iteration ``step`` (``[0, …, 0, 1]``
        with MSL off)."""
        steps = inner_steps or self.inner_steps
        if not self.multi_step_loss:
            return [0.0] * (steps - 1) + [1.0]
        return multi_step_loss_weights(steps, step // self.steps_per_epoch, self.multi_step_loss_epochs)

    def adapt(self, task: Task, context: Context) -> Predictor:
        network = task_local_modules(self.network)
        *_, (step, weights) = self._inner_loop(network, task.support_x, task.support_y, context)
        return lambda x: self._forward(network, x, weights, step, context.training)

    def query_loss(self, task: Task, context: Context) -> tuple[Tensor, Tensor]:
        """The query predictions after the last inner step and the task's meta-objective: in training
        Σ_k w_k · L_query(after step k) (MSL), else the last step's query loss."""
        steps = self.steps(context)
        importance = self.loss_weights(context.step, steps) if context.training else [0.0] * (steps - 1) + [1.0]
        network, loss = task_local_modules(self.network), None
        for index, (step, weights) in enumerate(self._inner_loop(network, task.support_x, task.support_y, context)):
            if importance[index] == 0:
                continue
            prediction = self._forward(network, task.query_x, weights, step, context.training)
            term = importance[index] * context.loss_fn(prediction, task.query_y)
            loss = term if loss is None else loss + term
        return prediction, loss

    def update_running_statistics(self, task: Task, context: Context) -> None:
        """BNRS: step k's running statistics move towards this task's at inner step k, by running the inner loop
        on the task's support set (the learner calls this once per meta-iteration with tracking on; the runner's
        adaptations leave every statistic alone). Without BNRS, the network's own statistics, as every algorithm."""
        if not self.per_step_bn_statistics:
            super().update_running_statistics(task, context)
            return
        with torch.enable_grad():  # the inner steps need the support loss's gradient; nothing else is kept
            # never checkpointed: a recomputed forward would move the statistics twice
            for _ in self._inner_loop(task_local_modules(self.network), task.support_x, task.support_y, context,
                                      checkpointed=False):
                pass

    def _inner_loop(self, network: nn.Module, support_x: Tensor, support_y: Tensor, context: Context,
                    checkpointed: bool = True) -> Iterator[tuple[int, Weights]]:
        """Yield (k, adapted weights) after each inner step; k indexes the per-step copies (the last trained
        step's beyond them). With ``inner_checkpointing`` (and ``checkpointed``), each second-order step runs
        under ``torch.utils.checkpoint``: the outer backward recomputes its activations."""
        training = context.training
        parameters = dict(self.network.named_parameters())
        if training:
            fast = {name: parameters[name] for name in self.adapted_names}
        else:  # no graph back to the meta-parameters
            fast = {name: parameters[name].detach().requires_grad_() for name in self.adapted_names}
        if self.zero_head:  # the episode's zero head in the model's head's place (same keys, so same order)
            fast |= {f"head.{kind}": zeros for kind, zeros in episode_zero_head(self.network.head, support_y).items()}
        create_graph = training and not self.first_order(context.step)
        checkpointed = checkpointed and create_graph and self.inner_checkpointing

        def sgd_step(step: int, *values: Tensor) -> tuple[Tensor, ...]:
            weights = dict(zip(self.adapted_names, values, strict=True))
            loss = context.loss_fn(self._forward(network, support_x, weights, step, training), support_y)
            gradients = torch.autograd.grad(loss, values, create_graph=create_graph)
            return tuple(value - self._rate(name, step, training) * gradient
                         for (name, value), gradient in zip(weights.items(), gradients, strict=True))

        for index in range(self.steps(context)):
            step = min(index, self.inner_steps - 1)
            values = (checkpoint(sgd_step, step, *fast.values(), use_reentrant=False) if checkpointed
                      else sgd_step(step, *fast.values()))
            fast = dict(zip(self.adapted_names, values, strict=True))
            if not training:
                fast = {name: value.detach().requires_grad_() for name, value in fast.items()}
            yield step, fast

    def _rate(self, name: str, step: int, training: bool) -> Tensor | float:
        if not self.per_step_lr:
            return self.inner_lr
        rate = self.rates[_key(name)][step]
        return rate if training else rate.detach()

    def _forward(self, network: nn.Module, x: Tensor, fast: Weights, step: int, training: bool) -> Tensor:
        """The network at inner step ``step``: adapted weights, step ``step``'s batch-norm weights and running
        statistics."""
        weights = dict(fast)
        if step > 0:  # step 0 normalises with the network's own batch-norm weights
            for name in self.bn_parameter_names:
                weight = self.bn_weights[_key(name)][step - 1]
                weights[name] = weight if training else weight.detach()
        for name in self.bn_buffer_names:
            statistic = getattr(self.bn_statistics, _key(name))[step]  # a view: batch norm updates it in place
            weights[name] = statistic if training else statistic.clone()  # evaluation leaves them as they are
        return functional_call(network, weights, (x,))

    def fit_report(self) -> FitReport | None:
        if not self.per_step_lr:
            return None  # nothing learned besides the initialisation
        names = list(self.adapted_names)
        rates = torch.stack([self.rates[_key(name)].detach().float().cpu() for name in names])  # (tensors, steps)
        flat = rates.flatten()
        metrics = {"maml_pp/lr_mean": flat.mean().item(), "maml_pp/lr_std": flat.std().item() if flat.numel() > 1
                   else 0.0, "maml_pp/lr_min": flat.min().item(), "maml_pp/lr_max": flat.max().item(),
                   "maml_pp/lr_negative_fraction": (flat < 0).float().mean().item()}
        metrics |= {f"maml_pp/lr_mean_step{k + 1}": rates[:, k].mean().item() for k in range(rates.shape[1])}
        return FitReport(metrics, {"maml_pp_lrs.png": _rates_figure(rates, names)})


def _rates_figure(rates: Tensor, names: list[str]) -> Figure:
    """A heat map of the learned rates, one row per parameter tensor, one column per inner step."""
    from matplotlib.figure import Figure  # here, when drawn; a plain Figure: no pyplot, no screen backend

    figure = Figure(figsize=(2.0 + 0.9 * rates.shape[1], 1.2 + 0.32 * len(names)))
    axes = figure.subplots()
    image = axes.imshow(rates.numpy(), aspect="auto", cmap="viridis")
    if rates.numel() <= 200:  # few enough cells to print each value
        for row in range(rates.shape[0]):
            for column in range(rates.shape[1]):
                axes.text(column, row, f"{rates[row, column].item():.3g}", ha="center", va="center", fontsize=7,
                          color="w")
    axes.set_xticks(range(rates.shape[1]), [str(k + 1) for k in range(rates.shape[1])])
    axes.set_yticks(range(len(names)), names, fontsize=7)
    axes.set(xlabel="inner step", title="MAML++ learned inner learning rates (LSLR)")
    figure.colorbar(image, ax=axes, label="rate")
    figure.tight_layout()
    return figure
