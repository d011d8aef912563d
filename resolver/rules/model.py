"""What a rule is: a named list with its action, and the rule each of its domains maps to.

Kept apart from the matcher and the loader so that stages, tools and tests can name rules
without pulling in YAML.
"""

import ipaddress
from dataclasses import dataclass, field

ALLOW = "allow"
DEFAULT_ACTION = "nxdomain"
ACTIONS = (DEFAULT_ACTION, "sinkhole", "nodata", "refused", ALLOW)
# Unspecified addresses: a client that connects to a sinkhole fails at once, off the network.
DEFAULT_SINKHOLE_V4 = ("0.0.0.0",)
DEFAULT_SINKHOLE_V6 = ("::",)
ENFORCE = "enforce"
DRY_RUN = "dry-run"
MODES = (ENFORCE, DRY_RUN)
EVERYONE = 100.0  # rollout percentage: every client
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class RuleList:
    """One named list: what to do with its names, and where it came from for messages."""

    name: str
    action: str = DEFAULT_ACTION
    sinkhole_v4: tuple[str, ...] = DEFAULT_SINKHOLE_V4
    sinkhole_v6: tuple[str, ...] = DEFAULT_SINKHOLE_V6
    ttl: int | None = None
    source: str = ""
    # Staging (docs/rules.md#staged-lists): who the list applies to, when, and whether it
    # answers or only counts. The defaults make a list that applies to everyone, always.
    mode: str = ENFORCE
    clients: tuple[Network, ...] = ()  # empty: every client
    except_clients: tuple[Network, ...] = ()
    rollout: float = EVERYONE  # percent of clients, chosen by a stable hash
    starts: float | None = None  # epoch seconds; active from starts (inclusive)
    expires: float | None = None  # ... until expires (exclusive)

    def __post_init__(self) -> None:
        """Catch a misspelt action or mode from code too: an unknown one would silently block,
        and a dry-run allow list would mean nothing."""
        if self.action not in ACTIONS:
            raise ValueError(f"{self.action!r} is not one of {', '.join(ACTIONS)}")
        if self.mode not in MODES:
            raise ValueError(f"{self.mode!r} is not one of {', '.join(MODES)}")
        if self.mode == DRY_RUN and self.action == ALLOW:
            raise ValueError("an allow list cannot be dry-run")
        if not 0 <= self.rollout <= EVERYONE:
            raise ValueError(f"rollout {self.rollout} is not a percentage 0 to 100")
        if self.starts is not None and self.expires is not None and self.expires <= self.starts:
            raise ValueError("expires must be after starts")

    @property
    def staged(self) -> bool:
        """Whether what the list does depends on the client or the time, or is only counted:
        such a list is judged per query and its answers are never replayed to others."""
        return (self.mode != ENFORCE or bool(self.clients) or bool(self.except_clients)
                or self.rollout < EVERYONE or self.starts is not None
                or self.expires is not None)


@dataclass(frozen=True, slots=True)
class Rule:
    """What a match returns; shared by all domains of one entry (memory: 1M domains)."""

    list: RuleList
    entry_id: str = ""
    entry_name: str = ""
    # The label values resolver_blocked_total counts this rule's hits under, made once here
    # rather than per blocked query.
    labels: tuple[str, str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", (self.list.name, self.entry_id, self.list.action))
