"""Reinforcement learning with verifiable rewards: GRPO's math (`grpo`), the reward functions (`rewards`)."""
