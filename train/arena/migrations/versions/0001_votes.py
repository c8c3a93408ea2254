"""The first schema: models, media, votes (with their hash-chain links) and the chain head.

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

revision, down_revision, branch_labels, depends_on = "0001", None, None, None


def upgrade() -> None:
    op.create_table("models", sa.Column("cert", sa.String(64), primary_key=True), sa.Column("label", sa.Text, nullable=False))
    op.create_table("media", sa.Column("digest", sa.String(64), primary_key=True),
                    sa.Column("kind", sa.String(16), nullable=False), sa.Column("data", sa.LargeBinary, nullable=False))
    op.create_table(
        "votes",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("battle_id", sa.String(64), nullable=False, unique=True),
        sa.Column("left_cert", sa.String(64), nullable=False), sa.Column("right_cert", sa.String(64), nullable=False),
        sa.Column("left_label", sa.Text, nullable=False), sa.Column("right_label", sa.Text, nullable=False),
        sa.Column("flip", sa.Boolean, nullable=False), sa.Column("prompt", sa.Text, nullable=False),
        sa.Column("media_digest", sa.String(64)), sa.Column("media_kind", sa.String(16)), sa.Column("probe", sa.Text),
        sa.Column("left_answer", sa.Text, nullable=False), sa.Column("right_answer", sa.Text, nullable=False),
        sa.Column("choice", sa.String(16), nullable=False), sa.Column("voter", sa.String(64), nullable=False),
        sa.Column("created_at", sa.String(32), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False), sa.Column("hash", sa.String(64), nullable=False),
    )
    op.create_index("votes_voter", "votes", ["voter"])
    table = op.create_table("chain_head", sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
                            sa.Column("seq", sa.Integer, nullable=False), sa.Column("hash", sa.String(64), nullable=False))
    op.bulk_insert(table, [{"id": 1, "seq": 0, "hash": "0" * 64}])


def downgrade() -> None:
    for name in ("chain_head", "votes", "media", "models"):
        op.drop_table(name)
