"""The arena: a blind side-by-side page where people rate checkpoints, and ratings from their votes.

`serve` (app.py, the page in static/, generation in contestants.py, upload checks in media.py), the vote store
(db.py with Alembic migrations in migrations/, the hash chain in chain.py), `ratings` (ratings.py: Bradley-Terry
with bootstrap and sandwich intervals) and `verify-votes`; cli.py is the subcommand. May import `train.inference`
(checkpoint loading, generation), `train.data` (probe items, media decoders) and `train.provenance` (digests);
nothing imports it, and it never imports the training stack (train.parallel, the loop, DeepSpeed).
"""
