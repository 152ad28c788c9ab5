"""A real Prometheus server (Debian's ``prometheus``) in a test bed namespace, and its HTTP API.

It scrapes the given targets every ``interval`` seconds into a throw-away TSDB in its work
directory, listens on ``listen`` (in its namespace), and is stopped by PID like the other
servers of the test bed.  ``query`` asks its HTTP API (``/api/v1/query``) from inside the
namespace and returns the result vector.
"""

from __future__ import annotations

import json
import sys
import urllib.parse
from pathlib import Path
from typing import Any

from ipop.errors import EnvironmentFault
from ipop.testbed.servers import ServerProcess, _bound, _netns_prefix

_FETCH = "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], " \
         "timeout=5).read().decode())"


def fetch(url: str, netns: str | None) -> str:
    """GET ``url`` from inside ``netns`` (where 127.0.0.1 is that namespace's loopback)."""
    import subprocess

    r = subprocess.run([*_netns_prefix(netns), sys.executable, "-c", _FETCH, url],
                       capture_output=True, text=True, timeout=20, check=False)
    if r.returncode != 0:
        raise EnvironmentFault(f"GET {url} failed: {r.stderr.strip()[-300:]}")
    return r.stdout


class Prometheus(ServerProcess):
    """``prometheus`` scraping ``targets`` (``host:port``) every ``interval`` seconds."""

    name = "prometheus"
    binary = "prometheus"

    def __init__(self, workdir: Path, targets: list[str], *, listen: str = "127.0.0.1:9090",
                 interval: float = 1.0, netns: str | None = None) -> None:
        super().__init__(workdir, netns)
        self.listen = listen
        self.config_path = self.workdir / "prometheus.yml"
        # YAML is a superset of JSON: the config is written as JSON
        self.config_path.write_text(json.dumps({
            "global": {"scrape_interval": f"{interval:g}s", "evaluation_interval": "5s",
                       "scrape_timeout": f"{interval:g}s"},
            "scrape_configs": [{"job_name": "ipop", "static_configs": [{"targets": targets}]}],
        }, indent=2))

    def argv(self) -> list[str]:
        return ["prometheus", f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                f"--web.listen-address={self.listen}", "--log.level=warn"]

    def ready(self) -> bool:
        host, port = self.listen.rsplit(":", 1)
        return _bound("tcp", host, int(port), self.netns)

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query; returns ``data.result`` (a list of {metric, value})."""
        url = f"http://{self.listen}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        reply = json.loads(fetch(url, self.netns))
        if reply.get("status") != "success":
            raise EnvironmentFault(f"prometheus query {expr!r}: {reply}")
        result: list[dict[str, Any]] = reply["data"]["result"]
        return result
