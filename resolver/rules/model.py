"""What a rule is: a named list with its action, and the rule each of its domains maps to.

Kept apart from the matcher and the loader so that stages, tools and tests can name rules
without pulling in YAML.
"""

from dataclasses import dataclass, field

ALLOW = "allow"
DEFAULT_ACTION = "nxdomain"
ACTIONS = (DEFAULT_ACTION, "sinkhole", "nodata", "refused", ALLOW)
# Unspecified addresses: a client that connects to a sinkhole fails at once, off the network.
DEFAULT_SINKHOLE_V4 = ("0.0.0.0",)
DEFAULT_SINKHOLE_V6 = ("::",)


@dataclass(frozen=True, slots=True)
class RuleList:
    """One named list: what to do with its names, and where it came from for messages."""

    name: str
    action: str = DEFAULT_ACTION
    sinkhole_v4: tuple[str, ...] = DEFAULT_SINKHOLE_V4
    sinkhole_v6: tuple[str, ...] = DEFAULT_SINKHOLE_V6
    ttl: int | None = None
    source: str = ""

    def __post_init__(self) -> None:
        """Catch a misspelt action from code too: an unknown one would silently block."""
        if self.action not in ACTIONS:
            raise ValueError(f"{self.action!r} is not one of {', '.join(ACTIONS)}")


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
