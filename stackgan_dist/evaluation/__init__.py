"""Evaluation: caption consistency on the synthetic data; IS/FID in inception.py."""
