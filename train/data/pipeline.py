"""The data pipeline: tokenise, expand media placeholders, pack, shard per rank, resume exactly.

Notable choices:
- Tokenisation runs once per (sources, tokenizer, media config), in `omniscratch data prepare` or here when its
  store is missing (train/data/store.py); every rank memory-maps the store read-only, so a rank's memory does not
  grow with the corpus. A bad row becomes a reject (logged, counted) instead of a crash later.
- Packing is one deterministic GLOBAL sequence of rows, a pure function of (data, seq_len, seed, epoch):
  epoch e holds each accepted document its source's `weight` times, shuffled with a seed derived from (seed, e)
  (train/data/mixing.py), and packs them greedily (train/data/packing.py, numpy over the store's document lengths),
  in that order, into rows of seq_len; a document never straddles two rows (a text document longer than
  seq_len is cut into seq_len pieces, a media document that long is rejected). Step s with a global batch
  of G rows takes rows [s*G, (s+1)*G) and rank r its contiguous share, so the cursor is one global row
  index, independent of world size and workers.
- Sample index i = epoch * N + k names the k-th document of epoch `epoch`'s shuffled order (N: the epoch's length,
  the weighted document count); a step consumes
  a contiguous range of them (`last_step_ranges`, half-open), and `sample_source(i)` names its source row.
- doc_ids and position_ids restart per document; labels are IGNORE_INDEX on padding, media markers and
  placeholders, and on each document's first token, so no loss term predicts across a document boundary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.config import IGNORE_INDEX, PAD_ID, SPECIAL_TOKENS, ModelConfig
from model.media import audio_tokens, vision_tokens
from tokenizer.bpe import tokenizer_digest
from train.data.encoding import AUDIO, IMAGE, PLACEHOLDER
from train.data.loading import Prefetcher
from train.data.mixing import epoch_length, mix_order
from train.data.packing import pack
from train.data.rejects import DecodeRejects, check_rejects, write_rejects
from train.data.sources import (
    NO_LIMIT,
    MediaPolicy,
    Source,
    declared_licence,
    manifest_entry,
    media_shapes,
    row_media,
)
from train.data.store import Store, prepare

MODALITIES = ("text", "image", "video", "audio")  # the names of Batch.modality's values 0..3 (MODALITY's values)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) long
    labels: torch.Tensor  # (B, T) long, aligned with input_ids; IGNORE_INDEX where no text loss
    position_ids: torch.Tensor  # (B, T) long, restart per document
    doc_ids: torch.Tensor  # (B, T) long, document index within the row (padding = its own doc)
    modality: torch.Tensor  # (B, T) long: an index into MODALITIES, of the token's document
    pixel_values: list[torch.Tensor]  # (F, 3, H, W) uint8 vision items in placeholder order (normalised on the device)
    audio_values: list[torch.Tensor]  # (N,) audio items in placeholder order
    sample_ids: list[int]  # global sample indices in this micro-batch
    # per row, its documents' lengths in order (padding one more), summing to T: doc_ids' runs, kept on the host so
    # that attention can split rows by document without reading doc_ids back from the device (model/attention.py)
    doc_lens: list[list[int]] | None = None
    # documents whose media failed to decode here ({source, file, row, reason}): their items are zeros and their
    # labels IGNORE_INDEX; host data, so the count reaches the reject rule at log time without a device sync
    rejects: list[dict] = dataclasses.field(default_factory=list)

    def pin_memory(self) -> Batch:
        """Page-locked copies (DataLoader's pin_memory thread calls this), so the copy to the device is asynchronous."""
        pin = {f: getattr(self, f).pin_memory() for f in ("input_ids", "labels", "position_ids", "doc_ids", "modality")}
        return dataclasses.replace(self, **pin, pixel_values=[p.pin_memory() for p in self.pixel_values],
                                   audio_values=[a.pin_memory() for a in self.audio_values])


class TrainLoader:
    """Packed, rank-sharded, exactly resumable batches over one or more sources (see the module docstring)."""

    def __init__(self, data_dir, tokenizer_path, model_cfg: ModelConfig, seq_len: int, micro_batch: int, grad_accum: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, *, cache_dir: str | Path | None = None,
                 num_proc: int = 0, max_reject_fraction: float = 0.01, rejects_path: str | Path | None = None,
                 policy: MediaPolicy = NO_LIMIT, workers: int = 0):
        """`workers`: DataLoader processes that build batches ahead (train/data/loading.py); 0: built on demand here."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        specs = data_dir if isinstance(data_dir, (list, tuple)) else [data_dir]
        self.sources = [s if isinstance(s, Source) else Source(str(s)) for s in specs]
        self.cfg, self.seq_len, self.seed, self.tokenizer_digest = model_cfg, seq_len, seed, tokenizer_digest(tokenizer_path)
        self.micro_batch, self.grad_accum, self.rank, self.world_size = micro_batch, grad_accum, rank, world_size
        self.policy = policy
        # the prepared store (train/data/store.py), made here when missing (num_proc processes, 0: every core)
        work = prepare(self.sources, tokenizer_path, model_cfg, policy=self.policy, cache_dir=cache_dir, workers=num_proc,
                       log=lambda msg: None)
        self.store = store = Store(work)
        self.entries = [manifest_entry(src, files=m["files"]) for src, m in zip(self.sources, store.manifest["sources"])]
        docs = store.docs
        too_long = (docs[:, 2] > 0) & (docs[:, 1] > seq_len)  # media cannot be cut: longer than a row, rejected
        rejects = store.rejects() + [{"source": self.sources[int(s)].path, "row": int(r),
                                      "reason": f"{n} tokens with media do not fit seq_len={seq_len}"}
                                     for n, s, r in docs[too_long][:, [1, 3, 4]].tolist()]
        rejects.sort(key=lambda r: ([s.path for s in self.sources].index(r["source"]), r["row"]))
        for i, (entry, m) in enumerate(zip(self.entries, store.manifest["sources"])):
            entry["rows"] = m["rows"]
            entry["rejected"] = sum(r["source"] == self.sources[i].path for r in rejects)
        self.rejects, self.rejects_path = rejects, Path(rejects_path) if rejects_path else store.path.parent / "rejects_run.jsonl"
        if rank == 0:  # one writer; every rank checks the limit below
            self.rejects_path.unlink(missing_ok=True)
            write_rejects(self.rejects_path, rejects)
        check_rejects(rejects, sum(m["rows"] for m in store.manifest["sources"]), max_reject_fraction, self.rejects_path)
        self.max_reject_fraction, self._decode = max_reject_fraction, DecodeRejects(self.rejects_path)
        self._doc = np.flatnonzero(~too_long)  # accepted document d -> its row in the store's docs.npy
        self._src, self._row, self._len = (np.ascontiguousarray(docs[self._doc, c]) for c in (3, 4, 1))
        if len(self._len) == 0:
            raise ValueError(f"no usable samples in {', '.join(s.path for s in self.sources)}")
        self._weights = [float(s.weight) for s in self.sources]
        self._n = epoch_length(self._src, self._weights)  # samples per epoch: the weighted document count
        if self._n == 0:
            raise ValueError(f"the source weights leave no document in an epoch ({len(self._len)} accepted documents, "
                             f"weights {self._weights}): raise the weights of the sources that have documents")
        self._perms: dict[int, np.ndarray] = {}
        self.cursor, self.last_step_ranges, self._epochs, self._epoch_rows = 0, [], {}, []
        self.workers, self._prefetch = workers, Prefetcher(self, workers) if workers else None

    # ---- the global row sequence ----

    def _perm(self, epoch: int) -> np.ndarray:
        """The documents of epoch `epoch` in order, each its source's weight times (train/data/mixing.py)."""
        if epoch not in self._perms:
            self._perms = {e: v for e, v in self._perms.items() if e >= epoch - 1}  # `which` walks epochs upward
            self._perms[epoch] = mix_order(self.seed, epoch, self._src, self._weights)
        return self._perms[epoch]

    def _pack(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Pieces (sample k, doc, offset, length) of epoch `epoch` in order, and each row's first piece: greedy, a
        document longer than a row cut into seq_len pieces (train/data/packing.py, numpy over the lengths)."""
        if epoch not in self._epochs:
            perm = self._perm(epoch)
            k, off, m, starts = pack(self._len[perm], self.seq_len)
            self._epochs = {e: v for e, v in self._epochs.items() if e >= epoch - 1}  # keep the working set small
            self._epochs[epoch] = (np.stack([k, perm[k], off, m], axis=1), starts)
        return self._epochs[epoch]

    def _locate(self, g: int) -> tuple[int, int]:
        """Global row g -> (epoch, row within the epoch)."""
        e = 0
        while True:
            if e == len(self._epoch_rows):
                self._epoch_rows.append(len(self._pack(e)[1]) - 1)
            if g < self._epoch_rows[e]:
                return e, g
            g, e = g - self._epoch_rows[e], e + 1

    def _row_pieces(self, g: int) -> tuple[int, np.ndarray]:
        e, r = self._locate(g)
        pieces, starts = self._pack(e)
        return e, pieces[starts[r]:starts[r + 1]]

    @property
    def num_samples(self) -> int:
        """N, the samples per epoch (accepted documents, each its source's weight times): sample index
        i = epoch * N + k (see the module docstring)."""
        return self._n

    def row_samples(self, g: int) -> list[tuple[int, int, int, int]]:
        """The document pieces packed into global row g, in row order: (sample index, first token, token count,
        the whole document's length in tokens); the packing itself, for `omniscratch data which`."""
        epoch, pieces = self._row_pieces(g)
        return [(epoch * self._n + k, off, m, int(self._len[d])) for k, d, off, m in pieces.tolist()]

    def sample_source(self, sample: int) -> dict:
        """Where global sample index `sample` comes from: source name, path, row, epoch."""
        n = self._n
        d = self._perm(sample // n)[sample % n]
        entry = self.entries[self._src[d]]
        return {"source": entry["name"], "path": entry["path"], "row": int(self._row[d]), "epoch": sample // n}

    # ---- batches ----

    def _batch(self, rows: range) -> Batch:
        T, n, tokens, docs = self.seq_len, self._n, self.store.tokens, self.store.docs
        ids = np.full((len(rows), T), PAD_ID, dtype=np.int64)
        pos, doc, mod = (np.zeros((len(rows), T), dtype=np.int64) for _ in range(3))
        media, samples, doc_lens = [], [], []  # media: (doc, its tokens, b, t) of media documents, in row-major order
        for b, g in enumerate(rows):
            epoch, pieces = self._row_pieces(g)
            t = 0
            for j, (k, d, off, m) in enumerate(pieces.tolist()):
                start, _, modality = docs[self._doc[d], :3].tolist()
                seg = tokens[start + off:start + off + m]
                ids[b, t:t + m], pos[b, t:t + m], doc[b, t:t + m], mod[b, t:t + m] = seg, np.arange(m), j, modality
                if modality:  # a media document is never cut, so it is this one piece
                    media.append((d, seg, b, t))
                samples.append(epoch * n + k)
                t += m
            doc[b, t:], pos[b, t:] = len(pieces), np.arange(T - t)
            doc_lens.append([int(m) for m in pieces[:, 3]] + ([T - t] if t < T else []))
        ids, pos, doc, mod = (torch.from_numpy(x) for x in (ids, pos, doc, mod))
        labels = ids.clone()
        # no loss on padding and media, nor on a document's first token (it would be predicted from the previous doc)
        labels[(ids == PAD_ID) | ((ids >= IMAGE) & (ids < len(SPECIAL_TOKENS))) | (pos == 0)] = IGNORE_INDEX
        pixels, sounds, rejects = self._media(media, labels)
        return Batch(ids, labels, pos, doc, mod, pixels, sounds, sorted(set(samples)), doc_lens, rejects)

    def _media(self, docs: list[tuple[int, np.ndarray, int, int]], labels: torch.Tensor):
        """Decode the documents' media in order, checking that each item fills exactly its placeholder run. Bytes
        that pass prepare (headers only) but fail to decode make the document a reject: its items become zeros of
        the shapes the header gave, its labels IGNORE_INDEX (nothing is learned from it); -> pixels, sounds, rejects."""
        pixels, sounds, rejects = [], [], []
        for d, seq, b, t in docs:
            starts = np.flatnonzero(np.isin(seq, list(PLACEHOLDER)))  # start markers, in order; each end is start + 1
            ends = np.flatnonzero(np.isin(seq, [t + 1 for t in PLACEHOLDER]))
            runs = [(PLACEHOLDER[int(seq[s])], int(e - s - 1)) for s, e in zip(starts, ends)]
            row, ids = self.store.row_media(int(self._doc[d])), [p for p, _ in runs]
            try:
                vision, audio = row_media(row, ids, None, self.cfg, self.policy, as_uint8=True)
            except ValueError as e:
                shapes, lengths = media_shapes(row, ids, None, self.cfg, self.policy)  # checked by prepare: no raise
                vision = [torch.zeros((f, 3, h, w), dtype=torch.uint8) for f, h, w in shapes]
                audio = [torch.zeros(n, dtype=torch.float32) for n in lengths]
                labels[b, t:t + len(seq)] = IGNORE_INDEX
                rejects.append(self._decode_reject(d, str(e)))
            want = [vision_tokens(v.shape[0], v.shape[2], v.shape[3], self.cfg.vision) for v in vision]
            want += [audio_tokens(len(a), self.cfg.audio) for a in audio]
            got = [n for p, n in runs if p != AUDIO] + [n for p, n in runs if p == AUDIO]
            if got != want:
                si, row = int(self._src[d]), int(self._row[d])
                raise ValueError(f"{self.entries[si]['path']} row {row}: placeholder runs {got} do not match media tokens "
                                 f"{want}; the prepared store is stale: delete {self.store.path.parent}")
            pixels += vision
            sounds += audio
        return pixels, sounds, rejects

    def _decode_reject(self, d: int, reason: str) -> dict:
        """The reject record of accepted document d: its source, the file holding it, its row in the source (as every
        reject) and in that file."""
        si, row = int(self._src[d]), int(self._row[d])
        files, counts = self.entries[si]["files"], self.store.manifest["sources"][si]["file_rows"]
        f = int(np.searchsorted(np.cumsum(counts), row, side="right"))
        return {"source": self.sources[si].path, "file": files[f]["name"], "row": row,
                "file_row": row - int(sum(counts[:f])), "reason": f"decode failed: {reason}"}

    @property
    def global_rows(self) -> int:
        """G, the rows of one optimizer step over all ranks."""
        return self.micro_batch * self.grad_accum * self.world_size

    def _micro(self, cursor: int, j: int) -> Batch:
        """This rank's micro-batch j of the step whose first global row is `cursor`."""
        first = cursor + (self.rank * self.grad_accum + j) * self.micro_batch  # this rank's contiguous share of G rows
        return self._batch(range(first, first + self.micro_batch))

    def next_step(self) -> list[Batch]:
        """The grad_accum micro-batches of this rank for the next optimizer step; advances the global cursor."""
        G = self.global_rows
        if self.workers:
            out = self._prefetch.take(self.cursor)
        else:
            out = [self._micro(self.cursor, j) for j in range(self.grad_accum)]
        self._decode.note([r for b in out for r in b.rejects])
        (e0, first_row), (e1, last_row), n = self._row_pieces(self.cursor), self._row_pieces(self.cursor + G - 1), self._n
        self.last_step_ranges = [[e0 * n + int(first_row[0, 0]), e1 * n + int(last_row[-1, 0]) + 1]]
        self.cursor += G
        return out

    @property
    def decode_rejected(self) -> int:
        """Documents this rank rejected at decode time so far (counted once each on this rank)."""
        return len(self._decode)

    def check_decode_rejects(self, decode_rejected: int) -> None:
        """The reject rule with `decode_rejected` (summed over the ranks, at log time) added to prepare's rejects:
        a ValueError naming the worst sources past `max_reject_fraction`. A document met on two ranks in different
        epochs counts twice, so the sum errs on the strict side."""
        total = sum(m["rows"] for m in self.store.manifest["sources"])
        check_rejects(self.rejects + self._decode.records, total, self.max_reject_fraction, self.rejects_path,
                      count=len(self.rejects) + decode_rejected)

    def _identity(self) -> dict:
        """What the global row sequence is a function of: a resume must match all of it."""
        identity = {"seed": self.seed, "seq_len": self.seq_len, "tokenizer": self.tokenizer_digest,
                    "sources": [e["sha256"] for e in self.entries]}
        if any(w != 1 for w in self._weights):  # absent at the default, so older loader states still match
            identity["weights"] = self._weights
        if self.policy != NO_LIMIT:
            identity["media_policy"] = self.policy.to_dict()
        return identity

    def state_dict(self) -> dict:
        return {"version": 1, "row": self.cursor, **self._identity()}

    def load_state_dict(self, sd: dict) -> None:
        mine_all = self._identity()
        for key in [*mine_all, *(k for k in ("weights", "media_policy") if k in sd and k not in mine_all)]:
            mine = mine_all.get(key)
            if sd.get(key) != mine:
                raise ValueError(f"data loader state has {key}={sd.get(key)!r} but this run has {mine!r}: "
                                 f"resume with the same data, tokenizer, seq_len and seed")
        self.cursor = int(sd["row"])


def heldout_batches(data_dir, tokenizer_path, model_cfg: ModelConfig, seq_len: int, micro_batch: int, n_batches: int, *,
                    rank: int = 0, world_size: int = 1, seed: int = 0, rejects_path: str | Path | None = None,
                    policy: MediaPolicy = NO_LIMIT) -> list[Batch]:
    """This rank's `n_batches` micro-batches of DATA/heldout, packed as training packs (the first step of a TrainLoader
    over it), under the licence declared for DATA: the held-out loss of training and of `omniscratch eval`."""
    src = Source(str(Path(data_dir) / "heldout"), licence=declared_licence(Source(str(data_dir))), name="heldout")
    return TrainLoader([src], tokenizer_path, model_cfg, seq_len, micro_batch, n_batches, rank=rank,
                       world_size=world_size, seed=seed, rejects_path=rejects_path, policy=policy).next_step()
