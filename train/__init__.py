"""Training side of omniscratch: data, DeepSpeed engine, checkpoints, provenance, audit, evaluation."""
