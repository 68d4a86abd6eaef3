"""Process group, seeding and model wrapping: the only place that knows about torch.distributed."""
