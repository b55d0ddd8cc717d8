"""The training engine's parts that scripts and the trainer share."""
