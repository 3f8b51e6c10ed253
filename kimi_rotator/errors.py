"""The base of every mistake a user can fix, so that the CLI can catch them all without importing
the modules that raise them (backups, imports, the proxy's set-up load only for their commands)."""


class UserError(Exception):
    """The message reads `<what happened>; <what to do>`; the CLI prints it as `error: ...`, exit 1."""
