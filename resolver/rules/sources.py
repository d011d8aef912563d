"""Lists whose names come from a file or a URL (`source:` in a rule file): the declaration,
the download, the copies kept of it, and when to fetch it again.

A URL source is never read from the network by the loader. `Feeds` downloads it (in a
thread: `refresh_due`, `fetch_missing`) into a *pending* copy beside the last *good* one; the
next load reads the pending copy, and the reload that load belongs to decides its fate
(`settle`): installed or unchanged promotes it to the good copy, while a failed or refused
reload (broken content, the guard) discards it, so the rules in force, the copy on disk and
a restart all keep the previous content. The good copy lives in `blocking.state_dir`, with
its ETag and Last-Modified for conditional requests, so a restart with the feed down still
serves it.

Scheduling is a pure function of wall-clock `now` (`Schedule`): due at start when there is no
copy or the copy is older than `refresh`; after a success, `refresh` later; after a failure,
sooner, backing off from RETRY_FIRST up to `refresh` (as Blocky retries a list that failed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from email.utils import formatdate
from pathlib import Path
from typing import IO

from resolver.message.constants import Clock
from resolver.ops.metrics import Metrics, Tally

log = logging.getLogger(__name__)

YAML = "yaml"  # a source holding a list's `domains:` and `entries:`, as a rule file would
DEFAULT_REFRESH = 86400.0  # seconds: a day
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
CONNECT_TIMEOUT = 10.0  # seconds to connect, and for each read (urllib's one timeout)
DOWNLOAD_TIMEOUT = 300.0  # seconds for a whole download: a feed trickling bytes gives up
RETRY_FIRST = 60.0  # seconds before the first retry of a failed fetch, doubling each time
IDLE = 1.0  # seconds between looks at the schedule when nothing is due sooner
CHUNK = 64 * 1024
USER_AGENT = "resolver (rule sources; +https://example.invalid/resolver)"

# resolver_source_failures_total reasons
FETCH, TIMEOUT, TOO_LARGE, SHA256, BROKEN, REFUSED, FAILED = (
    "fetch", "timeout", "too_large", "sha256", "broken", "refused", "reload_failed")


@dataclass(frozen=True, slots=True)
class Source:
    """A list's `source:` as the rule file declares it (docs/rules.md)."""

    list_name: str
    location: str  # an absolute path, or an http(s) URL
    format: str
    refresh: float = DEFAULT_REFRESH  # seconds; URL sources only
    sha256: str | None = None  # lowercase hex
    max_bytes: int = DEFAULT_MAX_BYTES
    declared: str = ""  # 'file:line' of the `source:` key, for messages

    @property
    def is_url(self) -> bool:
        return is_url(self.location)


def is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


class SourceError(Exception):
    """A fetch that failed: reason is the failures_total label, the message says the rest."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# Downloading (blocking I/O: call it in a thread).


@dataclass(frozen=True, slots=True)
class Validators:
    """What a server said about the copy it sent, for the next conditional request."""

    etag: str | None = None
    last_modified: str | None = None
    fetched_at: float = 0.0  # wall-clock seconds of the last 200 or 304

    def headers(self) -> dict[str, str]:
        found = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        if self.etag:
            found["If-None-Match"] = self.etag
        if self.last_modified:
            found["If-Modified-Since"] = self.last_modified
        return found


def download(source: Source, known: Validators, into: Path, wall: Clock,
             connect_timeout: float = CONNECT_TIMEOUT,
             total_timeout: float = DOWNLOAD_TIMEOUT) -> Validators | None:
    """Fetch source into the file into (written whole or not at all); None when the server
    says the copy we have is current (304). Raises SourceError."""
    request = urllib.request.Request(source.location, headers=known.headers())
    deadline = time.monotonic() + total_timeout
    try:
        with urllib.request.urlopen(request, timeout=connect_timeout) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > source.max_bytes:
                raise SourceError(TOO_LARGE, f"{length} bytes is more than max_bytes "
                                  f"({source.max_bytes})")
            digest = _save(response, into, source.max_bytes, deadline)
            headers = response.headers
    except urllib.error.HTTPError as error:
        if error.code == 304:
            return None
        raise SourceError(FETCH, f"HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        if isinstance(error.reason, TimeoutError):
            raise SourceError(TIMEOUT, f"no answer within {connect_timeout:g} s") from None
        raise SourceError(FETCH, f"cannot fetch: {error.reason}") from None
    except TimeoutError:
        raise SourceError(TIMEOUT, f"no data within {connect_timeout:g} s") from None
    except OSError as error:  # connection reset, and the like, mid-body
        raise SourceError(FETCH, f"cannot fetch: {error}") from None
    if source.sha256 is not None and digest != source.sha256:
        into.unlink(missing_ok=True)
        raise SourceError(SHA256, f"sha256 {digest} is not the pinned {source.sha256}")
    return Validators(headers.get("ETag"), headers.get("Last-Modified") or formatdate(
        wall(), usegmt=True), wall())


def _save(response: IO[bytes], into: Path, cap: int, deadline: float) -> str:
    """Copy the body to into by way of a temporary file (renamed when whole); its sha256."""
    digest = hashlib.sha256()
    size = 0
    partial = into.with_name(into.name + ".part")
    try:
        with partial.open("wb") as out:
            while chunk := response.read(CHUNK):
                size += len(chunk)
                if size > cap:
                    raise SourceError(TOO_LARGE, f"more than max_bytes ({cap}) bytes")
                if time.monotonic() > deadline:
                    raise SourceError(TIMEOUT, f"not complete within {DOWNLOAD_TIMEOUT:g} s")
                digest.update(chunk)
                out.write(chunk)
        os.replace(partial, into)
    finally:
        partial.unlink(missing_ok=True)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# When to fetch (pure).


@dataclass(frozen=True, slots=True)
class Schedule:
    """One URL source's timing: when it is due, and how many fetches failed in a row."""

    due: float
    failures: int = 0

    @staticmethod
    def first(now: float, refresh: float, fetched_at: float | None) -> Schedule:
        """At start, or when a rule file adds the source: due now without a copy, else when
        the copy (fetched at fetched_at) is refresh old."""
        if fetched_at is None:
            return Schedule(now)
        return Schedule(max(now, min(fetched_at + refresh, now + refresh)))

    def succeeded(self, now: float, refresh: float) -> Schedule:
        return Schedule(now + refresh)

    def failed(self, now: float, refresh: float) -> Schedule:
        failures = self.failures + 1
        retry = min(refresh, RETRY_FIRST * 2 ** min(failures - 1, 30))
        return Schedule(now + retry, failures)


# ---------------------------------------------------------------------------------------------
# The copies, and the fetching they go through.


@dataclass(slots=True)
class _Feed:
    """What is known of one URL source: its copies and schedule."""

    source: Source
    schedule: Schedule
    good: Validators | None  # None: no good copy yet
    pending: Validators | None = None  # a download not yet judged by a reload
    offered: bool = False  # the pending copy was read by a load since it came
    last_success: float | None = None


@dataclass
class Feeds:
    """The URL sources in force, their copies on disk, their schedule and their metrics.

    Used from the reloading task (or the supervisor's main loop) and one fetching thread at a
    time; a lock keeps the two from seeing a feed half-changed.
    """

    state_dir: str | None
    wall: Clock = time.time
    connect_timeout: float = CONNECT_TIMEOUT
    total_timeout: float = DOWNLOAD_TIMEOUT
    failures: Tally = field(init=False)
    _feeds: dict[str, _Feed] = field(init=False, default_factory=dict)  # by URL
    _local: tuple[str, ...] = field(init=False, default=())  # paths of local sources
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    _temporary: tempfile.TemporaryDirectory[str] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.failures = Tally("source_failures_total", "Failed refreshes of URL rule sources "
                              "(the previous copy stays), by list and reason.",
                              ("list", "reason"))

    def export(self, metrics: Metrics) -> None:
        """Register the per-source metrics with the process that refreshes."""
        tally = metrics.counter(self.failures.name, self.failures.help, self.failures.labels)
        tally.counts.update(self.failures.counts)  # what failed at start, before the server
        self.failures = tally
        metrics.gauge("source_last_success_timestamp_seconds", "Wall-clock time of the last "
                      "successful fetch (new content or 304) of each URL rule source.",
                      ("list",), self._last_successes)
        metrics.gauge("source_refresh_interval_seconds", "The refresh interval of each URL "
                      "rule source.", ("list",), self._intervals)

    # --- what the loader asks -----------------------------------------------------------------

    def copies(self, source: Source) -> list[Path]:
        """The files a load should try for source, best first: the pending download (marked as
        read, for `settle`), then the last good copy."""
        with self._lock:
            feed = self._feeds.get(source.location)
            found = []
            if feed is not None and feed.pending is not None:
                feed.offered = True
                found.append(self._path(source.location, "pending"))
            good = self._path(source.location, "feed")
            if good.is_file():
                found.append(good)
            return found

    def reject(self, source: Source, why: str) -> None:
        """The pending copy of source is broken (the loader then reads the good one)."""
        with self._lock:
            feed = self._feeds.get(source.location)
            if feed is not None and feed.pending is not None:
                self._discard(feed, BROKEN, why)

    # --- what the reloading process does --------------------------------------------------------

    def declare(self, sources: Iterable[Source]) -> None:
        """The URL sources the rules just read name: new ones are scheduled (due now without
        a copy), changed settings taken, and the ones no longer named forgotten."""
        now = self.wall()
        sources = tuple(sources)
        with self._lock:
            self._local = tuple(source.location for source in sources if not source.is_url)
            wanted = {source.location: source for source in sources if source.is_url}
            for url in self._feeds.keys() - wanted.keys():
                del self._feeds[url]
            for url, source in wanted.items():
                feed = self._feeds.get(url)
                if feed is None:
                    good = self._validators(url)
                    fetched = good.fetched_at if good is not None else None
                    self._feeds[url] = _Feed(source, Schedule.first(now, source.refresh, fetched),
                                             good, last_success=fetched)
                elif feed.source != source:
                    feed.source = source

    def local_paths(self) -> tuple[str, ...]:
        """The local source files of the rules last read: watched like rule files."""
        return self._local

    def sleep(self) -> float:
        """Seconds until the next source is due, at most IDLE (a reload may add one). A
        source whose new copy waits for its reload is not due."""
        now = self.wall()
        with self._lock:
            dues = [feed.schedule.due for feed in self._feeds.values() if feed.pending is None]
        return max(0.0, min([IDLE, *(due - now for due in dues)]))

    def due(self) -> bool:
        now = self.wall()
        with self._lock:
            return any(feed.schedule.due <= now and feed.pending is None
                       for feed in self._feeds.values())

    def refresh_due(self, everything: bool = False) -> bool:
        """Fetch every source that is due (every one: everything), side by side (blocking:
        run it in a thread). True when one brought new content, which a reload should now
        read."""
        now = self.wall()
        with self._lock:
            due = [feed.source for feed in self._feeds.values() if feed.pending is None
                   and (everything or feed.schedule.due <= now)]
        return self._fetch(due)

    def fetch_missing(self) -> bool:
        """At start: fetch the sources that have no copy at all (blocking), so that a first
        start serves them. True when one came."""
        with self._lock:
            missing = [feed.source for feed in self._feeds.values() if feed.good is None]
        return self._fetch(missing)

    def settle(self, result: str) -> None:
        """A reload ended with result (reload.OK/UNCHANGED/FAILED/REFUSED): the pending copies
        it read become the good ones, or are dropped (and counted) when it did not install."""
        with self._lock:
            for feed in self._feeds.values():
                if feed.pending is None or not feed.offered:
                    continue
                if result in ("ok", "unchanged"):
                    url = feed.source.location
                    try:
                        os.replace(self._path(url, "pending"), self._path(url, "feed"))
                        self._save_validators(url, feed.pending)
                    except OSError as error:  # a full disk: this feed is fetched again
                        log.warning("source %s: cannot keep the new copy: %s", url, error)
                        feed.pending, feed.offered = None, False
                        continue
                    feed.good, feed.pending, feed.offered = feed.pending, None, False
                else:
                    reason = REFUSED if result == "refused" else FAILED
                    self._discard(feed, reason, f"the reload was {result}")

    # --- inside ------------------------------------------------------------------------------

    def _fetch(self, sources: list[Source]) -> bool:
        if not sources:
            return False
        with ThreadPoolExecutor(max_workers=min(8, len(sources))) as pool:
            return any(list(pool.map(self._fetch_one, sources)))

    def _fetch_one(self, source: Source) -> bool:
        url = source.location
        with self._lock:
            feed = self._feeds.get(url)
            known = (feed.good if feed is not None else None) or Validators()
            if not self._path(url, "feed").is_file():
                known = Validators()  # nothing to be 'not modified' from
        try:
            fresh = download(source, known, self._path(url, "pending"), self.wall,
                             self.connect_timeout, self.total_timeout)
        except SourceError as error:
            self._failed(source, error.reason, str(error))
            return False
        except Exception as error:  # a bug must not end refreshing, nor go unsaid
            log.exception("source %s (list %s): fetch failed", url, source.list_name)
            self._failed(source, FETCH, repr(error))
            return False
        with self._lock:
            feed = self._feeds.get(url)
            if feed is None:
                return False  # no longer named by the rules
            now = self.wall()
            feed.schedule = feed.schedule.succeeded(now, source.refresh)
            feed.last_success = now
            if fresh is None:  # 304: the good copy is current
                if feed.good is not None:
                    feed.good = replace(feed.good, fetched_at=now)
                    self._save_validators(url, feed.good)
                log.info("source %s (list %s): not modified", url, source.list_name)
                return False
            feed.pending, feed.offered = fresh, False
        log.info("source %s (list %s): new content, reloading", url, source.list_name)
        return True

    def _failed(self, source: Source, reason: str, message: str) -> None:
        retry = 0.0
        with self._lock:
            feed = self._feeds.get(source.location)
            if feed is not None:
                now = self.wall()
                feed.schedule = feed.schedule.failed(now, source.refresh)
                retry = feed.schedule.due - now
        self.failures.inc((source.list_name, reason))
        log.error("source %s (list %s): %s; the previous copy stays, next try in %.0f s",
                  source.location, source.list_name, message, retry)

    def _discard(self, feed: _Feed, reason: str, why: str) -> None:
        """Drop a pending copy (the lock is held): the previous copy and rules stay. The
        schedule goes on as after a failed fetch, so the feed is tried again soon."""
        self._path(feed.source.location, "pending").unlink(missing_ok=True)
        feed.pending, feed.offered = None, False
        feed.schedule = feed.schedule.failed(self.wall(), feed.source.refresh)
        self.failures.inc((feed.source.list_name, reason))
        log.error("source %s (list %s): new content not taken: %s; the previous copy stays",
                  feed.source.location, feed.source.list_name, why)

    def _directory(self) -> Path:
        if self.state_dir is not None:
            path = Path(self.state_dir) / "sources"
        else:
            if self._temporary is None:
                self._temporary = tempfile.TemporaryDirectory(prefix="resolver-sources-")
            path = Path(self._temporary.name)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _path(self, url: str, kind: str) -> Path:
        """state_dir/sources/<hash of the URL>.<kind>: feed (good), pending, json."""
        return self._directory() / f"{hashlib.sha256(url.encode()).hexdigest()[:24]}.{kind}"

    def _validators(self, url: str) -> Validators | None:
        """The good copy's validators, from disk (a copy without them counts as none)."""
        if not self._path(url, "feed").is_file():
            return None
        try:
            data = json.loads(self._path(url, "json").read_text(encoding="utf-8"))
            return Validators(data.get("etag"), data.get("last_modified"),
                              float(data["fetched_at"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _save_validators(self, url: str, known: Validators | None) -> None:
        if known is None:
            return
        data = {"url": url, "etag": known.etag, "last_modified": known.last_modified,
                "fetched_at": known.fetched_at}
        path = self._path(url, "json")
        partial = path.with_name(path.name + ".part")
        partial.write_text(json.dumps(data), encoding="utf-8")
        os.replace(partial, path)

    def _last_successes(self) -> dict[tuple[str, ...], float]:
        with self._lock:
            return {(feed.source.list_name,): feed.last_success
                    for feed in self._feeds.values() if feed.last_success is not None}

    def _intervals(self) -> dict[tuple[str, ...], float]:
        with self._lock:
            return {(feed.source.list_name,): feed.source.refresh
                    for feed in self._feeds.values()}
