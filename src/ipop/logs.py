"""Log set-up for ``ipop up``: text or JSON lines, journald-aware, re-applied on reload.

- ``log_format: "text"``: ``TIME LOGGER LEVEL MESSAGE``.  Under journald (``$JOURNAL_STREAM``
  set, as systemd sets it for a service whose stderr goes to the journal) the line carries no
  time of its own (the journal stamps it) and starts with the syslog priority (``<3>`` for an
  error), which journald turns into the entry's priority.
- ``log_format: "json"``: one object per line: ``time`` (RFC 3339, UTC), ``level``, ``logger``,
  ``message``, and ``peer_uid`` / ``link`` when the record concerns a link (passed by the
  caller as ``extra=link_extra(...)``), and ``exception`` with a traceback.
- Levels keep IPOP's keys: ``controller_logging`` for ``ipop`` (the controller and the rest),
  ``tincan_logging`` 0..3 for ``ipop.dataplane``.  ``--log-level`` overrides the first.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from typing import Any, TextIO

TINCAN_LEVELS = {0: "ERROR", 1: "WARNING", 2: "INFO", 3: "DEBUG"}
SYSLOG_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
                   logging.DEBUG: 7}
HANDLER_NAME = "ipop-stderr"


def link_extra(peer_uid: bytes | str | None, link: str | None = None) -> dict[str, Any]:
    """``extra=`` for a log call about one link: the peer's UID (hex) and a short link text."""
    uid = peer_uid.hex() if isinstance(peer_uid, bytes) else peer_uid
    return {"peer_uid": uid, "link": link}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("peer_uid", "link"):
            value = getattr(record, key, None)
            if value is not None:
                obj[key] = value
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str, ensure_ascii=False)


class JournalFormatter(logging.Formatter):
    """Text for journald: syslog priority prefix, no timestamp."""

    def __init__(self) -> None:
        super().__init__("%(name)s %(levelname)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prio = SYSLOG_PRIORITY.get(record.levelno, 6)
        text = super().format(record)
        # a multi-line record (a traceback) stays one journal entry per line, each prefixed
        return "\n".join(f"<{prio}>{line}" for line in text.split("\n"))


def under_journald(environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return bool(env.get("JOURNAL_STREAM"))


def make_formatter(log_format: str, environ: dict[str, str] | None = None) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter()
    if under_journald(environ):
        return JournalFormatter()
    return logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s")


def configure(*, log_format: str, controller_logging: str, tincan_logging: int,
              override: str | None = None, stream: TextIO | None = None) -> None:
    """Install (or replace, on reload) the stderr handler and the levels."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if h.get_name() == HANDLER_NAME), None)
    if handler is None:
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.set_name(HANDLER_NAME)
        root.addHandler(handler)
    handler.setFormatter(make_formatter(log_format))
    level = override or controller_logging
    root.setLevel(level)
    logging.getLogger("ipop").setLevel(level)
    quiet = max(logging.WARNING, logging.getLevelName(level))
    logging.getLogger("slixmpp").setLevel(quiet)
    # aioice's INFO lines (the state changes of every candidate pair: four or five lines a link,
    # at start-up a good share of a node's CPU) only at DEBUG; ipop.nat logs the gathered
    # candidates and the selected path at INFO
    logging.getLogger("aioice").setLevel(logging.INFO if level == "DEBUG" else quiet)
    logging.getLogger("ipop.dataplane").setLevel(TINCAN_LEVELS.get(tincan_logging, "INFO"))
