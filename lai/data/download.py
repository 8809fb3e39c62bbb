"""Best-effort downloads that fail fast and never hang.

Every attempt first probes the host (DNS + TCP connect) in a daemon thread bounded by
``download_timeout()`` seconds, so an offline machine learns within seconds that the network is
unavailable, even where name resolution itself would block. The transfer then runs with a
socket timeout of the same length (a stall timeout: a slow but live download may take longer).
Every failure surfaces as :class:`DownloadFailed` with a one-line reason, which builders put
into their :class:`~lai.data.base.MissingDataError`.
"""
from __future__ import annotations

import contextlib
import os
import socket
import threading
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

TIMEOUT_ENV = "LAI_DOWNLOAD_TIMEOUT"
DEFAULT_TIMEOUT_S = 10.0
HF_HOST = "huggingface.co"


class DownloadFailed(RuntimeError):
    """A download attempt failed; ``str(e)`` says why in one line."""


def describe(e: BaseException) -> str:
    """``"TypeName: first line of the message"`` (library errors can span many lines)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def download_timeout() -> float:
    """Seconds allowed for a connection probe or a socket stall.

    ``$LAI_DOWNLOAD_TIMEOUT`` (default 10).
    """
    try:
        return max(0.1, float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    except ValueError:
        return DEFAULT_TIMEOUT_S


def probe_host(host: str, port: int = 443, timeout: float | None = None) -> str | None:
    """``None`` when a TCP connection to ``host:port`` opens within ``timeout`` seconds, else
    the reason it did not.

    Runs in a daemon thread because ``getaddrinfo`` has no timeout of its own; a probe still
    blocked after ``timeout`` is abandoned (the thread dies with the process).
    """
    timeout = download_timeout() if timeout is None else timeout
    result: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except Exception as e:  # any failure means "not reachable"
            result.append(describe(e))

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return result[0] if result else f"no connection within {timeout:g} s"


def host_reachable(host: str, port: int = 443, timeout: float | None = None) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds."""
    return probe_host(host, port, timeout) is None


@contextlib.contextmanager
def socket_timeout(seconds: float) -> Iterator[None]:
    """Temporarily set the default socket timeout (libraries that pass none inherit it)."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def require_host(url_or_host: str) -> None:
    """Raise :class:`DownloadFailed` unless the host of a URL (or a bare host) is reachable."""
    host = urllib.parse.urlparse(url_or_host).hostname or url_or_host
    reason = probe_host(host)
    if reason is not None:
        raise DownloadFailed(f"cannot reach {host} ({reason}; offline?)")


def fetch_url(url: str, dest: Path) -> Path:
    """Download ``url`` to ``dest`` (written atomically); returns ``dest``."""
    require_host(url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=download_timeout()) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
        tmp.replace(dest)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise DownloadFailed(f"downloading {url} failed: {describe(e)}") from e
    return dest


def guarded(what: str, fn: Callable[[], Any], host: str) -> Any:
    """Run a library download ``fn`` after probing ``host``, with a socket stall timeout.

    Returns ``fn()``; any exception becomes :class:`DownloadFailed` naming ``what``.
    """
    require_host(host)
    try:
        with socket_timeout(download_timeout()):
            return fn()
    except Exception as e:
        raise DownloadFailed(f"{what} failed: {describe(e)}") from e


def failure_note(e: BaseException) -> str:
    """The sentence a MissingDataError gets about a failed download attempt."""
    return "Download attempted and failed: " + (str(e) if isinstance(e, DownloadFailed)
                                                 else describe(e))


def hf_load_dataset(path: str, name: str | None = None, **kwargs: Any) -> Any:
    """``datasets.load_dataset(path, name, **kwargs)`` that fails fast when offline.

    Returns what ``load_dataset`` returns (a ``DatasetDict``, or an iterable for streaming).
    """
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise DownloadFailed("Hugging Face offline mode is set "
                             "(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)")
    label = f"datasets.load_dataset({path!r}" + (f", {name!r})" if name else ")")

    def load() -> Any:
        # the hub client reads these on each request; keep its retries within our budget
        os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(int(download_timeout())))
        os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(int(download_timeout())))
        import datasets  # lazy: importing datasets costs seconds

        return datasets.load_dataset(path, name, **kwargs)

    return guarded(label, load, HF_HOST)
