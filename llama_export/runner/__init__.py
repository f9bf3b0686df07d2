"""Rank processes: the launcher and the rank environment, thread sizing, the model source, and one
step across a rank's segments and collectives (`step.py` is the contract)."""
