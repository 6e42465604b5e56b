"""Benchmarks for sessionq: the ceilings it cannot beat, the peer it should beat,
and (wired in by ``bench.run``) sessionq itself.

Run everything with ``.venv/bin/python -m bench.run`` (``--quick`` for a smoke
run); see ``bench/run.py`` for what is measured and how it is reported.

- ``bench.loadgen``: the closed-loop engine shared by every client here
  (N sessions x W messages in flight, msgs/s, round-trip p50/p99, CPU of the
  processes involved, read from ``/proc``).
- ``bench.ceilings``: (a) a bare websockets echo server, (b) a bare aio-pika
  round trip through one exclusive queue per session, (c) the minimal
  ws -> queue -> consumer -> ws path.
- ``bench.stomp``: the peer, RabbitMQ's own Web-STOMP plugin, driven by a
  minimal STOMP 1.2 over WebSocket client.
- ``bench.sessionq``: sessionq's full path driven by its own load client
  (``clients/bench.py``): closed-loop rows, ``--workers 2``, the open-loop
  latency row, the 10,000 idle sessions test and the targets table.
"""
