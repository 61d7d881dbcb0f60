"""Privacy events of whole training schedules: sampler x steps x epochs x partitioning."""

from __future__ import annotations

from asymflow.accounting.events import (
    BalancedSampled,
    Composed,
    Event,
    Gaussian,
    ModelPartitioned,
    PoissonSampled,
    SelfComposed,
)

SAMPLERS = ("poisson", "balanced", "shuffle")


def training_event(
    sampler: str,
    sigma: float,
    steps: int,
    *,
    k: int | None = None,
    q: float | None = None,
    epochs: int = 1,
    parts: int = 1,
    shared: bool = False,
) -> Event:
    """The event of ``epochs`` passes of ``steps`` noisy-sum steps each.

    poisson: every step samples with rate q (default k/steps); balanced: every pass puts each
    record in k of the steps. ``parts`` > 1 adds model partitioning (one of ``parts`` blocks per
    record and step, noise on all blocks). ``shared`` adds a part that every sampled record
    updates (partial splitting, each part clipped to its own norm): under Poisson sampling the
    step is the joint ``Composed((Gaussian, ModelPartitioned))`` under one sampling decision.
    Shuffled fixed batches have no certified bound (Chua et al. 2024) and are refused.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got epochs={epochs!r}")
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise ValueError(f"parts must be an integer >= 1, got parts={parts!r}")
    noise: Event = Gaussian(sigma)
    step_noise = ModelPartitioned(parts, noise) if parts > 1 else noise
    if shared:
        if parts < 2:
            raise ValueError(f"shared needs parts >= 2 (partial splitting), got parts={parts}")
        if sampler != "poisson":
            raise ValueError(
                "partial splitting (shared) is bounded only under poisson sampling; no accountant "
                "bounds BalancedSampled over a joint step"
            )
        step_noise = Composed((noise, step_noise))
    if sampler == "shuffle":
        raise ValueError(
            "no certified epsilon is known for shuffled fixed-size batches (Chua et al. 2024); "
            "use sampler 'balanced' with k=1 for the same batch structure with a certified bound"
        )
    if sampler == "poisson":
        if q is None:
            if k is None:
                raise ValueError("poisson sampling needs q (or k, giving q = k/steps)")
            BalancedSampled(k, steps, noise)  # validates k against steps
            q = k / steps
        return SelfComposed(PoissonSampled(q, step_noise), steps * epochs)
    if k is None:
        raise ValueError("balanced sampling needs k, the number of steps each record joins")
    return SelfComposed(BalancedSampled(k, steps, step_noise), epochs)
