"""DeCo's Heun and Adams samplers (spec/04 §4, §6) as diffusers schedulers.

Euler needs no scheduler of its own: diffusers' `FlowMatchEulerDiscreteScheduler` fed DeCo's
time grid as explicit sigmas (sigma = 1 - t) performs x + (sigma_next - sigma) * model_output,
which is DeCo's x + (t_next - t) * v when model_output = -v. These two schedulers take the same
model_output (the flow-matching prediction noise - x0 = d x / d sigma = -v), so a pipeline
feeds all three alike.

A scheduler's `plan` lists its model evaluations in order: the DeCo time of each (also as
diffusers-style `timesteps` = sigma * num_train_timesteps) and the time whose guidance scale it
uses (`guidance_scale`). `step` is called once per evaluation with the model's output at the
sample the previous `step` returned, so a pipeline's loop is the same for every solver.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
from torch import Tensor

from deco.optimized.sampling import adams_guidance_at, adams_weights, guidance_at, time_grid


@dataclass(frozen=True)
class Evaluation:
    """One model evaluation of a solver: at DeCo time `time`, inside step `step` (from grid[step]
    to grid[step + 1]); `corrector` marks Heun's second evaluation of a step."""

    time: float
    step: int
    corrector: bool = False


class DeCoScheduler(SchedulerMixin, ConfigMixin):  # type: ignore[misc]
    """What the DeCo schedulers share: the time grid (spec/04 §1), the evaluation plan and the
    diffusers bookkeeping. Subclasses define `build_plan`, `guidance_scale` and `advance`."""

    order = 1
    init_noise_sigma = 1.0  # the starting sample is standard normal noise, unscaled

    def __init__(self) -> None:
        self.grid: list[float] = []
        self.plan: list[Evaluation] = []
        self.timesteps = torch.zeros(0)
        self.num_inference_steps: int | None = None
        self._index = 0

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None,
                      timeshift: float = 1.0) -> None:
        """Prepare `num_inference_steps` steps on DeCo's grid with time shift `timeshift`."""
        self.grid = time_grid(num_inference_steps, timeshift)
        self.num_inference_steps = num_inference_steps
        self.plan = self.build_plan(self.grid)
        sigmas = [1.0 - e.time for e in self.plan]
        scale = self.config.num_train_timesteps
        self.timesteps = torch.tensor(sigmas, dtype=torch.float64, device=device).mul(scale).float()
        self._index = 0
        self.reset()

    @property
    def model_times(self) -> list[float]:
        """DeCo's t of each model evaluation, in float64 (what the model is called with)."""
        return [e.time for e in self.plan]

    def scale_model_input(self, sample: Tensor, timestep: Tensor | float | None = None) -> Tensor:
        """Identity (diffusers' interface; DeCo's model takes the sample as it is)."""
        return sample

    def step(self, model_output: Tensor, timestep: Tensor | float, sample: Tensor,
             return_dict: bool = True) -> SchedulerOutput | tuple[Tensor]:
        """Take the model's output (-v, see the module docstring) at `sample` for the next
        evaluation of the plan; return the sample for the following evaluation (after the
        last one: the final image)."""
        if not self.plan:
            raise RuntimeError("set_timesteps must be called before step")
        if self._index >= len(self.plan):
            raise RuntimeError(f"step: all {len(self.plan)} evaluations of the plan are done; "
                               f"call set_timesteps again")
        evaluation = self.plan[self._index]
        self._index += 1
        prev = self.advance(evaluation, -model_output, sample)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The sample at diffusers timesteps (B,) (sigma * num_train_timesteps, sigma = 1 - t):
        DeCo's interpolation t x + (1 - t) noise (spec/01), as diffusers' add_noise."""
        sigma = timesteps.to(original_samples.device, torch.float64) / self.config.num_train_timesteps
        t = (1.0 - sigma).to(original_samples.dtype).reshape(-1, *([1] * (original_samples.ndim - 1)))
        noisy: Tensor = t * original_samples + (1 - t) * noise
        return noisy

    def dt(self, step: int) -> float:
        """t_{step+1} - t_step in float64."""
        return self.grid[step + 1] - self.grid[step]

    def __len__(self) -> int:
        """num_train_timesteps, as diffusers' schedulers report it."""
        return int(self.config.num_train_timesteps)

    # --------------------------------------------------------------- defined by the solvers
    def build_plan(self, grid: list[float]) -> list[Evaluation]:
        """The model evaluations of a run on `grid`, in order."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget the previous run's state."""
        raise NotImplementedError

    def guidance_scale(self, index: int, guidance: float, interval: tuple[float, float]) -> float:
        """The guidance scale of evaluation `index` of the plan."""
        raise NotImplementedError

    def advance(self, evaluation: Evaluation, velocity: Tensor, sample: Tensor) -> Tensor:
        """The sample of the next evaluation, given DeCo's velocity v at `sample`."""
        raise NotImplementedError


class DeCoHeunScheduler(DeCoScheduler):
    """Heun with a plain Euler last step (spec/04 §4). Default: the release's variant that reuses
    the previous corrector's velocity as the next predictor's (N evaluations for N steps);
    `exact=True` re-evaluates the predictor (2N - 1). Both evaluations of step i use the
    guidance scale of t_i (low < t_i <= high)."""

    @register_to_config  # type: ignore[untyped-decorator]  # diffusers is not analysed (pyproject)
    def __init__(self, num_train_timesteps: int = 1000, exact: bool = False) -> None:
        super().__init__()
        self._x: Tensor | None = None  # x_i, the state at the start of the current step
        self._v: Tensor | None = None  # v_i, the current step's predictor velocity

    def build_plan(self, grid: list[float]) -> list[Evaluation]:
        last = len(grid) - 2
        if self.config.exact:
            plan = []
            for i in range(last + 1):
                plan.append(Evaluation(grid[i], i))
                if i < last:
                    plan.append(Evaluation(grid[i + 1], i, corrector=True))
            return plan
        return [Evaluation(grid[0], 0)] + [Evaluation(grid[i + 1], i, corrector=True)
                                           for i in range(last)]

    def reset(self) -> None:
        self._x = self._v = None

    def guidance_scale(self, index: int, guidance: float, interval: tuple[float, float]) -> float:
        return guidance_at(self.grid[self.plan[index].step], guidance, interval)

    def advance(self, evaluation: Evaluation, velocity: Tensor, sample: Tensor) -> Tensor:
        i = evaluation.step
        if not evaluation.corrector:  # sample = x_i, velocity = v_i
            return self._predict(sample, velocity, i)
        assert self._x is not None and self._v is not None
        dt = self.dt(i)  # sample = x^_i, velocity = v^_i
        x = self._x + dt * 0.5 * (self._v + velocity)
        if self.config.exact:
            return x  # the next evaluation is step i + 1's predictor, at x_{i+1}
        return self._predict(x, velocity, i + 1)  # the corrector's velocity is reused

    def _predict(self, x: Tensor, v: Tensor, i: int) -> Tensor:
        """Predictor x^_i = x_i + dt v_i (on the last step, the result)."""
        self._x, self._v = x, v
        return x + self.dt(i) * v


class DeCoAdamsScheduler(DeCoScheduler):
    """The release's Adams-Bashforth sampler (spec/04 §6): x_{i+1} = x_i + dt sum_j w_ij v_j
    over the last `order` guided velocities (`deco.optimized.sampling.adams_weights`). The model
    is evaluated at the accumulated time t_0 + dt_0 + ... and guided where low < t < high."""

    @register_to_config  # type: ignore[untyped-decorator]  # diffusers is not analysed (pyproject)
    def __init__(self, num_train_timesteps: int = 1000, order: int = 2) -> None:
        super().__init__()
        if isinstance(order, bool) or not isinstance(order, int) or order < 1:
            raise ValueError(f"order: expected an int >= 1, got {order!r}")
        self.weights: list[list[float]] = []
        self._history: list[Tensor] = []

    def build_plan(self, grid: list[float]) -> list[Evaluation]:
        self.weights = adams_weights(grid, self.config.order)
        plan, t = [], 0.0
        for i in range(len(grid) - 1):
            plan.append(Evaluation(t, i))
            t += grid[i + 1] - grid[i]  # a running sum, like the release's t_cur
        return plan

    def reset(self) -> None:
        self._history = []

    def guidance_scale(self, index: int, guidance: float, interval: tuple[float, float]) -> float:
        t = self.plan[index].time
        return adams_guidance_at(t, guidance, interval)

    def advance(self, evaluation: Evaluation, velocity: Tensor, sample: Tensor) -> Tensor:
        i = evaluation.step
        self._history = [*self._history, velocity][-self.config.order:]
        weights = self.weights[i]  # min(order, i + 1) of them, oldest first
        recent = self._history[-len(weights):]
        v = weights[0] * recent[0]
        for w, earlier in zip(weights[1:], recent[1:], strict=True):
            v = v + w * earlier
        return sample + self.dt(i) * v
