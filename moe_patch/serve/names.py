"""Which ``model`` a request may name: the served names (``--served-model-name``, several allowed) and aliases
(``--alias``); by default any id, as llama-server does for its one model.

A single-model server that refuses every name but the path it was started with breaks clients that send a fixed
id (``gpt-4o``, the name of the model they were configured for); llama-server answers any id with its model. That
is the default here; ``--strict-model-name`` refuses an id that is none of the names with OpenAI's 404
``model_not_found``, as vLLM does. Answers always carry the first served name: the client learns what answered.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import RequestError


@dataclass(frozen=True)
class ServedNames:
    """The names of the one model served; ``names[0]`` is the one answers carry."""

    names: tuple[str, ...]
    strict: bool = False

    def __post_init__(self):
        if not self.names:
            raise ValueError("a served model needs at least one name")
        # one entry per name, first occurrence kept (a name given both as served name and alias)
        object.__setattr__(self, "names", tuple(dict.fromkeys(self.names)))

    @property
    def primary(self) -> str:
        return self.names[0]

    def check(self, requested: str | None) -> None:
        """Accept ``requested`` (None: the one model served), or 404 when strict and it is none of the names."""
        if requested is None or requested in self.names or not self.strict:
            return
        known = ", ".join(repr(n) for n in self.names)
        raise RequestError(
            f"the model {requested!r} does not exist; this server serves {known}",
            status=404,
            param="model",
            code="model_not_found",
        )

    def find(self, requested: str) -> str | None:
        """The served name ``requested`` is (``GET /v1/models/{id}``), None if it is none of them."""
        return requested if requested in self.names else None
