"""Reward-model scoring service. Kept empty so that importing the client never pulls in torch."""
