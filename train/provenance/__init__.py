"""Provenance: the certificate a checkpoint carries and the verifier that checks it. Recording (`record.py`:
environment, init record, lineage chain), tensor and Merkle digests (`digest.py`), folder walking and hashing
(`hashing.py`), the foreign-weights tripwire (`tripwire.py`), signing with OpenSSF model-signing (`signing.py`),
verification (`verify.py`, `record_checks.py`), segment replay (`replay.py`, which runs the trainer as a
subprocess) and the verification report (`report.py`). May import `model`; never `train.parallel` or DeepSpeed,
so that a verifier needs no training stack.
"""
