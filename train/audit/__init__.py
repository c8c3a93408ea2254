"""The weight-similarity audit: which components of a checkpoint derive from other models. Reading weights as
sketches (`weights.py`), calibrated statistics and nulls (`stats.py`), pairing and verdicts (`compare.py`, the
`omniscratch audit` command). May import `model`; never `train.parallel`, DeepSpeed or the provenance package.
"""
