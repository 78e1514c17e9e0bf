#!/usr/bin/env bash
# Print where the API is, an admin token and a ready curl line.
set -euo pipefail
HOST="${1:-127.0.0.1}"
PORT="${2:-8000}"
TOKEN="$(.venv/bin/salon-reports token --role admin --ttl 86400)"
SALON="$(.venv/bin/python - <<'PY'
import psycopg
from service.config import get_settings
from service.db import libpq_url
with psycopg.connect(libpq_url(get_settings().database_url)) as c:
    row = c.execute("SELECT min(id) FROM salons").fetchone()
print(row[0] if row and row[0] else 1)
PY
)"
cat <<MSG

  salon-reports is starting on http://$HOST:$PORT
  API docs:     http://$HOST:$PORT/docs
  admin token (24 h):
    $TOKEN
  try:
    curl -s -H "Authorization: Bearer $TOKEN" "http://$HOST:$PORT/api/v1/optimized-reports/dashboard?salon_id=$SALON" | python3 -m json.tool
  owner token for salon $SALON:  .venv/bin/salon-reports token --role owner --salon $SALON
  performance page:  http://$HOST:$PORT/performance   (paste the admin token above)
  some traffic:      .venv/bin/salon-reports simulate --duration 120   (in another terminal)

MSG
