"""The small files of a checkpoint folder that the verifier both hashes and parses, each read once: the digest it
compares and the facts it states come from the same bytes.

An attacker who controls the storage the verifier reads (a FUSE or network mount that answers a second read with other
bytes, a file swapped between hash and parse) could otherwise make it hash one file and check another. So verify and
replay read each of these files once, by the no-follow small-file reader (hashing.read_small: no links, no FIFOs, at
most 64 MiB), hash those bytes (`submit_hashes(given=...)`) and parse those bytes. The weights, model.safetensors, are
mapped once instead (hashing.SafetensorsFile); the resume state ds/ is bound by the sizes the certificate lists and
by witness.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from train.provenance.hashing import read_small
from train.provenance.record import DATA_MANIFEST, RECORD, SCHEMA, SLSA

PARSED = (RECORD, "model_config.json", "run_config.json", DATA_MANIFEST, SLSA)  # the small files verify parses


class FolderBytes:
    """The small files `names` of one folder, read once when this is made: `raw` ({name: bytes}) is what the hasher
    is given, `bytes`/`json` what the checks parse. A name that could not be read (or was not asked for) raises a
    ValueError saying why each time it is asked for: it is never read again."""

    def __init__(self, folder, names=PARSED):
        self.folder, self.raw, self._why = Path(folder), {}, {}
        for name in names:
            try:
                self.raw[name] = read_small(self.folder / name)
            except ValueError as e:
                self._why[name] = str(e)

    def bytes(self, name: str) -> bytes:
        if name not in self.raw:
            raise ValueError(self._why.get(name, f"{self.folder / name}: not among the files read with its folder"))
        return self.raw[name]

    def json(self, name: str):
        return json.loads(self.bytes(name))


class ReadOnce(dict):
    """{folder: FolderBytes}, each folder read on first use: the verified folder and the kept checkpoints beside it,
    whose certificates the lineage check, the replay's choice of segments and its end-point checks all parse."""

    def __missing__(self, folder) -> FolderBytes:
        self[folder] = FolderBytes(folder)
        return self[folder]


def read_certificate(small: FolderBytes) -> dict:
    """provenance.json as read once (these bytes are hashed, and parsed here) -> the record; ValueError saying why
    it is no certificate of this schema (a link, a FIFO, not JSON, not a JSON object, another schema)."""
    raw = small.bytes(RECORD)
    try:
        rec = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"not JSON ({e})") from None
    if not isinstance(rec, dict):
        raise ValueError(f"is a JSON {type(rec).__name__}, not an object: no certificate the trainer writes; "
                         f"re-export the checkpoint")
    if rec.get("schema") != SCHEMA:
        raise ValueError(f"schema {rec.get('schema')!r} is not {SCHEMA}")
    return rec
