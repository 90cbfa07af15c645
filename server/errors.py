"""Why the server refuses a reply: one exception per outcome, with a short kind that metrics count."""

from __future__ import annotations

from distill.synthetic import InvalidSet

# A reply the server refuses; ``kind`` is one of :data:`server.validate.KINDS`. The same class as
# a set that fails :func:`distill.upload.validate_set`: an invalid set is a rejected reply.
Rejected = InvalidSet


class Declined(Rejected):
    """A client's decline (kind ``declined-<kind>``): it uploaded nothing, whatever its figures say.

    ``figures`` are the privacy figures it reported, validated (empty when there were none or
    they were refused); ``refused`` says why they were refused ("" when they were not).
    """

    def __init__(self, kind: str, detail: str, figures: dict[str, float | int], refused: str = "") -> None:
        super().__init__(kind, detail)
        self.figures, self.refused = figures, refused

