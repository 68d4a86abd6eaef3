"""Caption -> embedding: the text encoders prepare uses and the on-device embedder training uses."""
