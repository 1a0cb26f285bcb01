"""Reachability of the services a config points at (Spark master, object store, MLflow server).

A misconfigured or stopped service must fail a job within seconds with an error that names the endpoint,
not after a client's own retry loop (Spark's master registration gives up after ~minutes, S3A and MLflow
retry for minutes by default). One quick probe before the first use does that.
"""
from __future__ import annotations

import socket
import urllib.error
import urllib.request
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 3.0


class ServiceUnreachable(RuntimeError):
    """A configured service does not answer at its endpoint."""


def host_port(endpoint: str, default_port: int | None = None) -> tuple[str, int]:
    """(host, port) of ``scheme://host:port/...`` or ``host:port``."""
    parts = urlsplit(endpoint if "://" in endpoint else f"tcp://{endpoint}")
    try:
        port = parts.port or default_port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:  # a port that is not a number
        port = None
    if not parts.hostname or not port:
        raise ServiceUnreachable(f"cannot tell host and port from endpoint {endpoint!r}")
    return parts.hostname, port


def check_tcp(what: str, endpoint: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise ServiceUnreachable naming `what` and `endpoint` unless a TCP connection opens within `timeout`."""
    host, port = host_port(endpoint)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise ServiceUnreachable(f"{what} at {endpoint} is unreachable ({e}); is it running, and is the "
                                 f"endpoint in the config right?") from None


def check_spark_master(master: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """A standalone master URL (``spark://h:p`` or the HA form ``spark://h1:p1,h2:p2``): at least one
    master must accept connections. Other masters (local, yarn, k8s) are not probed here."""
    if not master.startswith("spark://"):
        return
    errors = []
    for hp in master[len("spark://"):].split(","):
        try:
            check_tcp("Spark master", f"spark://{hp}", timeout)
            return
        except ServiceUnreachable as e:
            errors.append(str(e))
    raise ServiceUnreachable("; ".join(errors))


def check_http_health(what: str, base_url: str, path: str = "/health", timeout: float = PROBE_TIMEOUT_S) -> None:
    """GET base_url + path must answer (any HTTP status below 500) within `timeout`."""
    url = base_url.rstrip("/") + path
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return
    except urllib.error.HTTPError as e:
        if e.code < 500:
            return
        raise ServiceUnreachable(f"{what} at {base_url} answered {e.code} to {url}") from None
    except (OSError, ValueError) as e:
        raise ServiceUnreachable(f"{what} at {base_url} is unreachable ({getattr(e, 'reason', e)}); is it "
                                 f"running, and is the URI in the config right?") from None
