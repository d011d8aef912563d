"""Rule reloads: read the files again, judge the new set, and say exactly what happened.

Whatever asks for a reload (SIGHUP, a file change, `POST /-/reload`), it goes the same way:
1. read: the config file again (its `blocking` section; other sections need a restart and
   are only compared) and the rule files, compiled into one RuleSet. A problem anywhere is
   a `failed` reload listing every problem, and the rules in force stay.
2. judge: the same version (and the same blocked answers) as in force is `unchanged`, and
   nothing is swapped. Otherwise the guard (`blocking.guard`, from the config just read, so
   an operator can loosen it in the same edit) must pass, unless the reload is forced: no
   list's domain count may change by more than `max_change` of its count in force, and no
   `must_resolve` name may be blocked. A reload that fails it is `refused`.
3. install: the caller swaps the set in, in one step. The single process does it on its
   event loop (server/app.py); the supervisor sends the one compiled set to every worker
   (server/supervisor.py), so all serve the same version.
4. report: counted in `resolver_reloads_total{result}` and logged, the version in force in
   every line.

`Reloads` holds what a reload compares against and is used from one task or thread at a
time: the callers run reloads one by one, in the order they were asked.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace

from resolver.message.constants import Clock
from resolver.ops.config import BlockingConfig, Config, GuardConfig, Overrides, load_config
from resolver.ops.errors import ConfigError
from resolver.ops.metrics import Tally
from resolver.rules.apart import load_apart
from resolver.rules.matcher import RuleSet
from resolver.rules.sources import Feeds, Source

log = logging.getLogger(__name__)

OK, FAILED, REFUSED, UNCHANGED = "ok", "failed", "refused", "unchanged"
PENDING = "pending"  # the HTTP endpoint's answer when the result did not come in time
HTTP_WAIT = 60.0  # seconds POST /-/reload waits for its result (others may queue first)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one reload came to; `version` is the version in force afterwards."""

    result: str
    version: str
    problems: tuple[str, ...] = ()

    def as_json(self) -> dict[str, object]:
        return {"result": self.result, "version": self.version, "problems": list(self.problems)}


@dataclass(frozen=True, slots=True)
class Candidate:
    """A config and rule set read from the files, not judged yet."""

    config: Config
    rules: RuleSet
    sources: tuple[Source, ...] = ()  # what the rules' lists take from files and URLs


@dataclass(frozen=True, slots=True)
class Install:
    """A rule set as it is installed: with the `blocking` section its answers are packed
    with, and the wall-clock time it was installed (`resolver_rules_last_reload_timestamp_
    seconds`). What a worker is sent, or forked with."""

    rules: RuleSet
    blocking: BlockingConfig
    at: float


def pending(version: str) -> Outcome:
    """What POST /-/reload answers when its reload has not ended within HTTP_WAIT."""
    return Outcome(PENDING, version, (f"no result within {HTTP_WAIT:g} s; the reload goes on, "
                                      "and the log and resolver_reloads_total will say how it "
                                      "ended",))


def read_candidate(given: Config, overrides: Overrides, feeds: Feeds | None = None
                   ) -> Candidate:
    """The config file again (when the server was started with one; the flags still override
    it) and the rules it names, with the copies of URL sources in feeds. Raises ConfigError
    with every problem. Reads files: run it off the event loop. The rules are compiled in
    a child process (rules/apart.py), so a large list's build never swells the server."""
    config = load_config(given.source, overrides) if given.source is not None else given
    loaded = load_apart(config.blocking.rules, feeds)
    for note in loaded.notes:
        log.warning("%s", note)
    return Candidate(config, loaded.rules, loaded.sources)


def load_at_start(config: Config, feeds: Feeds) -> RuleSet:
    """The rules at startup. A URL source with no copy on disk is fetched first (blocking,
    within its timeouts), so a first start serves it; one that cannot be fetched leaves its
    list empty until a retry succeeds (logged and counted), as Blocky starts with the lists
    that load. A source with a copy starts from it, and is refreshed in the background when
    due. Raises ConfigError."""
    loaded = load_apart(config.blocking.rules, feeds)
    feeds.declare(loaded.sources)
    if feeds.fetch_missing():
        loaded = load_apart(config.blocking.rules, feeds)
        feeds.settle(OK)  # no guard at startup: nothing is in force to compare with
    for note in loaded.notes:
        log.warning("%s", note)
    return loaded.rules


def restart_only(given: Config, new: Config) -> list[str]:
    """The keys outside `blocking` whose value differs between the running config and the
    one read: they take effect only at restart (listen addresses, upstreams, cache sizes)."""
    differ = []
    for section in fields(Config):
        if section.name in ("blocking", "source"):
            continue
        old_section, new_section = getattr(given, section.name), getattr(new, section.name)
        if old_section == new_section:
            continue
        differ += [f"{section.name}.{key.name}" for key in fields(old_section)
                   if getattr(old_section, key.name) != getattr(new_section, key.name)]
    return differ


def guard_problems(old: RuleSet, new: RuleSet, guard: GuardConfig, now: float | None = None
                   ) -> list[str]:
    """Why the guard refuses new in place of old; empty when it passes.

    A list is compared by name with the list of that name in force. A new list is not
    checked (nothing to compare it with), nor one that held no domains (no fraction of
    nothing); one that is gone changed by 1. now: wall-clock seconds, by which a list whose
    window has ended blocks no must-resolve name.
    """
    problems = []
    if guard.max_change is not None:
        for name, before in old.counts.items():
            if before == 0:
                continue
            after = new.counts.get(name)
            change = 1.0 if after is None else abs(after - before) / before
            if change > guard.max_change:
                what = (f"would disappear ({before} domains)" if after is None else
                        f"would go from {before} to {after} domains ({after - before:+d}, "
                        f"{(after - before) / before:+.0%})")
                problems.append(f"list {name!r} {what}: more than blocking.guard.max_change "
                                f"({guard.max_change:.0%})")
    for name in guard.must_resolve:
        blocker = would_block(new, name, now)
        if blocker is not None:
            problems.append(f"blocking.guard.must_resolve name {name!r} would be blocked "
                            f"by {blocker}")
    return problems


def would_block(rules: RuleSet, name: str, now: float | None = None) -> str | None:
    """Which list (entry, domain) would block name under rules, or None."""
    found = rules.would_block(name, now)  # for some client at some time: scope is ignored
    if found is None:
        return None
    rule, domain = found
    entry = f" entry {rule.entry_id!r}" if rule.entry_id else ""
    return f"list {rule.list.name!r}{entry} (domain {domain!r})"


def describe(rules: RuleSet) -> str:
    """The version and size of a set, as log lines show it."""
    lists = len(rules.lists)
    return (f"rules {rules.version} ({rules.domain_count} domains from {lists} "
            f"list{'s' if lists != 1 else ''})")


class Reloads:
    """The state reloads compare against, and the steps around the install."""

    def __init__(self, given: Config, overrides: Overrides, rules: RuleSet, counts: Tally,
                 wall: Clock, feeds: Feeds | None = None):
        """given: the config as loaded at startup (its file is read again on each reload;
        restart-only keys are compared with it). counts: resolver_reloads_total. wall: the
        wall clock, for the time a set was installed. feeds: the URL sources of the rules in
        force and their copies (load_at_start's), else none until a reload reads some."""
        self.given = given
        self.overrides = overrides
        self.counts = counts
        self.wall = wall
        self.feeds = feeds or Feeds(given.blocking.state_dir, wall)
        self.current = Install(rules, given.blocking, wall())
        self.watch_paths = watched(given, self.feeds)  # what the file watcher looks at
        self._was = self.version  # the version an ok reload replaced, for its log line
        for name in given.blocking.guard.must_resolve:
            blocker = would_block(rules, name, wall())
            if blocker is not None:
                log.warning("blocking.guard.must_resolve name %r is blocked by %s in %s (the "
                            "guard checks reloads only)", name, blocker, rules.version)

    @property
    def version(self) -> str:
        return self.current.rules.version

    def read(self) -> Candidate | Outcome:
        """Step 1; a failed Outcome on any problem. Reads files: call it off the event loop."""
        try:
            candidate = read_candidate(self.given, self.overrides, self.feeds)
        except ConfigError as exc:
            return Outcome(FAILED, self.version, tuple(exc.problems))
        except Exception as exc:  # a bug must not end reloading, nor go unsaid
            log.exception("reload: reading the rules failed")
            return Outcome(FAILED, self.version, (f"internal error: {exc!r}",))
        return candidate

    def judge(self, read: Candidate | Outcome, force: bool, trigger: str) -> Outcome | Install:
        """Step 2: the final Outcome, or the Install to make (then call `installed`)."""
        if isinstance(read, Outcome):
            return read
        config, rules = read.config, read.rules
        self.feeds.declare(read.sources)
        self.watch_paths = watched(config, self.feeds)
        for key in restart_only(self.given, config):
            log.warning("reload (%s): %s differs from the running value; it takes effect "
                        "at restart", trigger, key)
        blocking = config.blocking
        if rules.version == self.version and _answers(blocking) == _answers(
                self.current.blocking):
            self.current = replace(self.current, blocking=blocking)  # watch, guard, paths
            return Outcome(UNCHANGED, self.version)
        if not force:
            problems = guard_problems(self.current.rules, rules, blocking.guard, self.wall())
            if problems:
                return Outcome(REFUSED, self.version, (
                    *problems, f"refused {rules.version}; POST /-/reload?force=1 overrides "
                               "the guard"))
        return Install(rules, blocking, self.wall())

    def installed(self, install: Install, problems: Sequence[str] = ()) -> Outcome:
        """Step 3 done: install is in force (problems: what went wrong on the way, such as a
        worker that did not confirm it)."""
        self._was = self.version
        self.current = install
        return Outcome(OK, self.version, tuple(problems))

    def report(self, outcome: Outcome, trigger: str) -> Outcome:
        """Step 4: count and log it, and keep or drop the new copies of URL sources it read;
        returns it."""
        self.counts.inc((outcome.result,))
        self.feeds.settle(outcome.result)
        if outcome.result == OK:
            log.info("reload (%s) ok: %s in force (was %s)", trigger,
                     describe(self.current.rules), self._was)
            for problem in outcome.problems:
                log.error("reload (%s): %s", trigger, problem)
        elif outcome.result == UNCHANGED:
            log.info("reload (%s): rules %s unchanged", trigger, outcome.version)
        else:
            for problem in outcome.problems:
                log.error("reload (%s) %s, rules %s stay: %s", trigger, outcome.result,
                          outcome.version, problem)
        return outcome


def _answers(blocking: BlockingConfig) -> BlockingConfig:
    """The part of a blocking section that shapes answers: a reload that changes only the
    rest (and not the rules' version) is `unchanged`, though the new values are taken. The
    rule paths are left out because the version covers what they hold."""
    return replace(blocking, rules=(), watch_interval=0.0, guard=GuardConfig(), state_dir=None)


def watched(config: Config, feeds: Feeds | None = None) -> tuple[str, ...]:
    """The rule paths, the config file and the local sources, whose changes reload."""
    extra: Iterable[str] = () if config.source is None else (config.source,)
    local = feeds.local_paths() if feeds is not None else ()
    return (*config.blocking.rules, *extra, *local)
