"""Errors shared by the config and rule loaders.

Startup problems are collected, not raised one at a time, so an operator fixing a broken file
sees every problem in one run instead of one per restart.
"""


class ConfigError(Exception):
    """One or more problems in config or rule files, each a one-line 'where: what' string."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))
