"""Defences for reading untrusted files: a restricted unpickler and resource budgets checked before
allocation."""
