"""The change stream: tables derived from ``bookings`` are kept outside the writers' transactions.

- ``derived``: the derived tables, how to fold a batch of changes into each and how to compute
  each from scratch;
- ``position``: where the stream stands (state, recorded position, the slot, loss, locks);
- ``batch``: the decoded changes of one batch, netted as they arrive;
- ``replication``: the replication protocol client the stream is read with;
- ``stream``: reading the logical replication slot and folding one batch exactly once;
- ``rebuild``: ``rollups rebuild`` / ``rollups verify`` and ``wait_applied``;
- ``consumer``: the elected consumer that runs in ``serve`` (and ``follow``), and each worker's
  view of the stream's state.
"""
