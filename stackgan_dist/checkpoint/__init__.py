"""Atomic, verified checkpoints and preemption signals."""
