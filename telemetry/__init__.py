"""OpenTelemetry set-up, metrics and the in-process stats aggregator.

This package never imports ``service``: it takes providers and settings as arguments.
"""

import os

# The instrumentations' switch to the stable database conventions on spans (db.system.name,
# db.namespace, db.query.text, db.operation.name, server.address, server.port instead of
# db.system, db.name, db.statement, net.peer.*), the names our metrics use. The
# instrumentations read it once, when the first of them starts (after this package is
# imported: our code starts them); a value set in the environment wins.
SEMCONV_STABILITY_OPT_IN = "database,http"
os.environ.setdefault("OTEL_SEMCONV_STABILITY_OPT_IN", SEMCONV_STABILITY_OPT_IN)
