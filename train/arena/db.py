"""The vote store: SQLAlchemy Core tables, the engine (SQLite in WAL mode, or PostgreSQL by URL), Alembic migrations.

Tables: `models` (certificate digest -> label), `media` (digest -> the bytes the models saw), `votes` (one row per
vote: both checkpoints' certificate digests, prompt, media digest, side assignment, choice, voter cookie id, time,
and its link in the hash chain) and `chain_head` (one row: the last seq and hash).

Notable choices:
- Appending a vote takes the head row FOR UPDATE (PostgreSQL) or the write lock up front (SQLite's BEGIN
  IMMEDIATE), so concurrent votes get consecutive seqs and each links to the one before, whatever the server count.
- SQLite runs with synchronous=FULL: a vote the server answered "recorded" survives a crash or power loss.
- `battle_id` is unique: a second vote on a battle is refused by the database itself, not only by the server.
- The schema is created and upgraded by Alembic (migrations/) at every start; `alembic_version` records it.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from model.config import UsageError

from .chain import GENESIS, Log, vote_hash

metadata = sa.MetaData()
models = sa.Table("models", metadata, sa.Column("cert", sa.String(64), primary_key=True),
                  sa.Column("label", sa.Text, nullable=False))
media = sa.Table("media", metadata, sa.Column("digest", sa.String(64), primary_key=True),
                 sa.Column("kind", sa.String(16), nullable=False), sa.Column("data", sa.LargeBinary, nullable=False))
votes = sa.Table(
    "votes", metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("battle_id", sa.String(64), nullable=False, unique=True),
    sa.Column("left_cert", sa.String(64), nullable=False), sa.Column("right_cert", sa.String(64), nullable=False),
    sa.Column("left_label", sa.Text, nullable=False), sa.Column("right_label", sa.Text, nullable=False),
    sa.Column("flip", sa.Boolean, nullable=False),  # True when the sampled pair was shown in reverse order
    sa.Column("prompt", sa.Text, nullable=False),
    sa.Column("media_digest", sa.String(64)), sa.Column("media_kind", sa.String(16)), sa.Column("probe", sa.Text),
    sa.Column("left_answer", sa.Text, nullable=False), sa.Column("right_answer", sa.Text, nullable=False),
    sa.Column("choice", sa.String(16), nullable=False), sa.Column("voter", sa.String(64), nullable=False),
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("prev_hash", sa.String(64), nullable=False), sa.Column("hash", sa.String(64), nullable=False),
)
chain_head = sa.Table("chain_head", metadata, sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
                      sa.Column("seq", sa.Integer, nullable=False), sa.Column("hash", sa.String(64), nullable=False))

CHOICES = ("left", "right", "tie", "both_bad")


class AlreadyVoted(Exception):
    pass


def url_for(db: str | None, out: Path) -> str:
    """`--db` as given (postgresql://... is run through psycopg 3), or the SQLite file in the output folder."""
    if not db:
        return f"sqlite:///{(out / 'votes.sqlite').resolve()}"
    if db.startswith(("postgresql://", "postgres://")):
        try:
            import psycopg  # noqa: F401
        except ModuleNotFoundError:
            raise UsageError("--db postgresql://...: PostgreSQL needs psycopg: pip install 'omniscratch[postgres]'") from None
        return "postgresql+psycopg://" + db.split("://", 1)[1]
    return db


def connect(url: str) -> sa.Engine:
    """An engine for `url`, migrated to the newest schema."""
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):
            dbapi_conn.isolation_level = None  # transactions are begun below, not by the driver
            for pragma in ("journal_mode=WAL", "synchronous=FULL", "busy_timeout=30000", "foreign_keys=ON"):
                dbapi_conn.execute(f"PRAGMA {pragma}")

        @sa.event.listens_for(engine, "begin")
        def _begin(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE")  # take the write lock now, never upgrade a read lock later
    else:
        engine = sa.create_engine(url, pool_pre_ping=True)
    migrate(engine)
    return engine


def migrate(engine: sa.Engine) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def register_models(engine: sa.Engine, labels: dict[str, str]) -> None:
    with engine.begin() as conn:
        known = {r.cert for r in conn.execute(sa.select(models.c.cert))}
        rows = [{"cert": c, "label": lab} for c, lab in labels.items() if c not in known]
        if rows:
            conn.execute(models.insert(), rows)


def append_vote(engine: sa.Engine, vote: dict, media_bytes: bytes | None = None) -> dict:
    """Store `vote` (the chain's FIELDS less seq) as the next link; -> the row as stored. AlreadyVoted if its
    battle has a vote."""
    try:
        with engine.begin() as conn:
            head = conn.execute(sa.select(chain_head).where(chain_head.c.id == 1).with_for_update()).one()
            row = dict(vote, seq=head.seq + 1, prev_hash=head.hash)
            row["hash"] = vote_hash(row, head.hash)
            if media_bytes is not None and conn.execute(
                    sa.select(media.c.digest).where(media.c.digest == vote["media_digest"])).first() is None:
                conn.execute(media.insert().values(digest=vote["media_digest"], kind=vote["media_kind"], data=media_bytes))
            conn.execute(votes.insert().values(**row))
            conn.execute(chain_head.update().where(chain_head.c.id == 1).values(seq=row["seq"], hash=row["hash"]))
    except IntegrityError as e:
        if "battle_id" in str(e.orig) or "votes_battle_id" in str(e.orig):
            raise AlreadyVoted(vote["battle_id"]) from None
        raise
    return row


def all_votes(engine: sa.Engine, after: int = 0) -> list[dict]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(votes).where(votes.c.seq > after).order_by(votes.c.seq))
        return [dict(r._mapping) for r in rows]


def model_labels(engine: sa.Engine) -> dict[str, str]:
    with engine.connect() as conn:
        return {r.cert: r.label for r in conn.execute(sa.select(models))}


def head(engine: sa.Engine) -> tuple[int, str]:
    with engine.connect() as conn:
        r = conn.execute(sa.select(chain_head).where(chain_head.c.id == 1)).first()
    return (r.seq, r.hash) if r else (0, GENESIS)


def reconcile(engine: sa.Engine, log: Log) -> int:
    """Append to the log the votes committed after its last line (a server stopped between the two writes)."""
    logged = log.read()
    missing = all_votes(engine, after=logged[-1]["seq"] if logged else 0)
    log.append(missing)
    return len(missing)
