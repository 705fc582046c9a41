"""The one error type for mistakes a user can cause or fix (bad id, bad range, offline...)."""


class RBAError(Exception):
    """A user-fixable problem; its message is one sentence that says what to do."""


def above_maximum(option: str, value: int, maximum: int) -> RBAError:
    """A text length option (``--max-length``, ``--seq-len``) above the model's position limit, said before any pass."""
    return RBAError(f"{option} {value} is above the model's maximum of {maximum} tokens; use at most {maximum}.")


def refuse_unknown(options, *known) -> None:
    """A :class:`TypeError` naming the keywords of ``options`` that none of the ``known`` collections holds, as
    Python says it for a function's own parameters."""
    unknown = sorted(set(options).difference(*map(set, known)))
    if unknown:
        raise TypeError(f"unexpected keyword argument{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
