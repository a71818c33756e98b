"""SAC (v2: twin Q, Polyak targets, optional automatic temperature): the agent with its default
parts (algorithms/agent.py): real batches, one-step policy improvement, no world model.

The model-free baseline, and MPDP's policy-evaluation half: its ``critic_step`` is MPDP's.
"""

from __future__ import annotations

from mpdp_lightning.algorithms.agent import Agent


class SAC(Agent):
    """Soft Actor-Critic: ``Agent`` as it is (see its arguments). One update: the critic step on a
    real batch, pi_0's one-step improvement, the temperature."""
