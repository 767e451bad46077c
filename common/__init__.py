"""Code every tpnb process imports: the connector, the root daemon, the cluster's manager and agent.

  errors_wire  TpnbError <-> gRPC status (one codec both ends)
  forward      tunnel frames, the byte-stream interface and the pumps behind every tunnel
  aio          small asyncio helpers (first-of, OS error text)
  liveness     (pid, start time) identity of processes
  logs         one log file per process, levels changeable at runtime

It depends only on tpnb.errors, tpnb.config, tpnb.version and tpnb.proto, so
the cluster image carries it unchanged.
"""
