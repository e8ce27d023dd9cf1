"""The one error type for bad recipes: it lists every problem found, each naming its key."""

from __future__ import annotations


class ConfigError(ValueError):
    """A recipe is invalid. ``problems`` holds one line per problem, each naming a key path."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        head = f"{source}: " if source else ""
        count = len(self.problems)
        noun = "problem" if count == 1 else "problems"
        body = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{head}invalid recipe, {count} {noun}:\n{body}")
