"""Logging, metrics records and TensorBoard. Only rank 0 writes files."""
