"""The env-step clock's one scheduling rule, shared by evaluation, checkpoints and model fits."""


def passed_multiple(previous: int, current: int, every: int) -> bool:
    """Whether a multiple of ``every`` lies in (previous, current]: things happen at multiples of
    their interval, so runs with different warm-ups, or resumed ones, line up."""
    return current // every > previous // every
