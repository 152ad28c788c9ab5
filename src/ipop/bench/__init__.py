"""ipop.bench: ``ipop bench`` measures ipop side by side with the direct link and its peers.

``peers`` brings up each system under test between two test bed hosts (direct underlay, ipop
encrypted, ipop plain, wireguard-go, tinc); ``measure`` runs iperf3 and ping and samples CPU
time from ``/proc``; ``run`` walks the plan (systems x link conditions x cases) and collects the
result document; ``report`` renders it as rich tables, JSON and a matplotlib chart.

Result document (``--json``), schema ``ipop-bench/1``::

    {"schema": "ipop-bench/1", "started": ISO-8601, "duration_s", "seconds", "quick",
     "workers" (the ipop nodes' shards), "workers_asked" ("auto" or the number given),
     "machine": {"cpus", "kernel", "iperf3"},
     "links": {"veth": "unshaped veth", "tbf1g": "tbf 1 Gbit/s"},
     "sizes": [64, 128, ...],
     "systems": {NAME: {"label", "version", "mtu", "overlay", "security", "idle_cpu_pct",
                        "drops", "links": {LINK: {CASE: value}}}},
     "skipped": {NAME: reason}, "failures": [text], "notes": [text]}

Cases per link: ``tcp1_mbit``, ``tcp4_mbit``, ``tcp8_mbit``, ``ping_avg_ms``, ``ping_p50_ms``,
``sweep`` (a list of ``{"size", "size_used", "mbit", "pps"}``), ``loss1_mbit``, ``loss3_mbit``,
``cpu_pct`` (``{"sender", "receiver"}``, % of one core during the one-stream run; empty for
direct) and ``ratios`` (``{"vs_direct": {...}, "vs_wireguard-go": {...}}``).  A case that
failed is null and named in ``failures``.
"""

SCHEMA = "ipop-bench/1"
