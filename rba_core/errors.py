"""The one error type for mistakes a user can cause or fix (bad id, bad range, offline...)."""


class RBAError(Exception):
    """A user-fixable problem; its message is one sentence that says what to do."""
