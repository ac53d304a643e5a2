"""HTTP resources: ``/_matrix/key/v2/server``, ``/_matrix/key/v2/query`` and ``/health``."""
