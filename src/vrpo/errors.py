"""The project's one-line error types that every layer may raise (kept apart so no layer imports another for them)."""


class ConfigError(ValueError):
    """A config problem, phrased as one line that names the key."""


class EvalError(RuntimeError):
    """Bad evaluation input or a refused cache, phrased as one line."""


class PeerLost(RuntimeError):
    """A distributed run lost a rank (it died, or hung beyond the timeout), phrased as one line."""


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the pip extra that brings it."""
