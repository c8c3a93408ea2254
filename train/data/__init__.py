"""Data: the built-in corpus generator (`corpus.py`), declared sources (`sources.py`), media decoding under the media
policy (`media.py`), mixing sources by weight (`mixing.py`), a row's token ids (`encoding.py`), the packing pipeline
that feeds training and held-out evaluation (`pipeline.py`), its rejects log and limit (`rejects.py`), and
`which.py`, the samples behind a training step. May import `model` (token ids, media sizes), `tokenizer` and
`train.checkpoint`; never an engine (`train.parallel`, DeepSpeed) nor the training loop.
"""
