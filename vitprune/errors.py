"""Errors vitprune raises on purpose.

Every error a *user* can cause (a missing file, a model that is not a ViT, a keep rate out of range)
is a :class:`VitpruneError`; the command line prints its message as one line and exits non-zero.
Anything else escaping vitprune is a bug and keeps its traceback.
"""


class VitpruneError(Exception):
    """A user-facing error: the message is one complete sentence, shown without a traceback."""


class LoadError(VitpruneError):
    """A model source could not be read (missing, corrupt, wrong kind, or needs ``trust_pickle``)."""


class CaptureError(VitpruneError):
    """The model could not be captured as a ``torch.fx.GraphModule``."""


class AnalysisError(VitpruneError):
    """The captured graph is not a ViT vitprune can analyse; the message gives the reason."""


class PassError(VitpruneError):
    """A pass refused or failed; the message names the pass and the passes run before it."""


class VerificationError(VitpruneError):
    """A rewritten model failed verification (keep-all not exact, non-finite output, bad shape)."""


class SaveError(VitpruneError):
    """A model could not be saved (unserialisable graph op, output path refused)."""


class SearchError(VitpruneError):
    """A search that cannot run or cannot succeed: a bad target or budget, empty or malformed calibration
    data, a target no method reaches, an unreadable schedule file."""


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (a library's error is often many lines), else its type's name:
    what a one-line ``vitprune: error: ...`` quotes of an error it turns into its own."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    # a heading ending in ':' (transformers 5.17: "Validation error for field 'architectures':") says nothing
    # on its own: the line after it is the reason
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
