"""Loggers of the application. They are children of `ray.serve`, so inside a Serve replica their
lines go to that replica's log file (logs/serve/replica_<app>_<deployment>_<id>.log) with the
replica and request id, at the level Serve's logging_config sets (INFO by default). Outside Ray
(unit tests, scripts) they behave as ordinary loggers."""

from __future__ import annotations

import logging


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"ray.serve.moelora.{name}")
