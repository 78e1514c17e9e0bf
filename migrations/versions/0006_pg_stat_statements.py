"""Install ``pg_stat_statements`` in the database, where the server has the library loaded.

``/performance/stats`` and the performance page list the statements that cost the database the
most (total time, calls, mean, rows, shared blocks hit and read) from it, and every report
statement carries a static comment naming its query (``db.query.summary``), so each entry there
points back to the query's spans and metrics.

The statistics themselves need ``shared_preload_libraries = 'pg_stat_statements'`` on the
server (``scripts/services.sh`` and ``docker-compose.yml`` set it); this revision creates the
extension's view in this database. Creating it takes a superuser (or the database owner where
the extension is trusted): a role that may not, or a server without the extension's files,
leaves the schema as it was and the stats say the statements are unavailable and why. The
downgrade leaves the extension in place: a DBA may use it for other things, and it holds no
data of ours.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        DO $$
        BEGIN
            CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
        EXCEPTION WHEN insufficient_privilege OR undefined_file OR feature_not_supported THEN
            RAISE NOTICE 'pg_stat_statements not installed: %', SQLERRM;
        END
        $$
        """
    )


def downgrade() -> None:
    pass
