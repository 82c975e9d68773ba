"""The two kinds of error a `cfgen` command ends with, and what they are made of.

    UserError  something the user can fix (a config value, a missing file or weights, a path):
               the CLI prints `cfgen: error: <message>` on one line and exits 2; nothing was done.
    RunFailed  the run itself went wrong (too many samples failed, --fail-fast hit a failure):
               `cfgen: failed: <message>`, exit 1; finished shards stay valid, re-run to resume.

Everything a module raises for one of these reasons derives from one of the two, so
`cli.main` maps exactly two classes to exit codes. Per-sample problems (an undecodable
image) are not errors of the run: they become `failed` rows in the manifest.
"""

from __future__ import annotations


class UserError(Exception):
    """Anything the user can fix; one line, exit code 2."""


class ConfigError(UserError, ValueError):
    """A config key, type or value that cannot work."""


class InputError(UserError):
    """Inputs missing or unusable as a whole: no finished shards of the previous stage, no images."""


class ModelLoadError(UserError):
    """Weights or configs of a model missing or unreadable, or refused (pickle without --trust-checkpoint)."""


class ShardError(UserError):
    """A shard that cannot be read (missing, truncated, corrupt)."""


class ImageDecodeError(UserError, ValueError):
    """An input that cannot become an image. Caught per sample, where its message is the
    recorded reason; it reaches the CLI only when a whole command depended on that one image."""


class RunFailed(Exception):
    """The run went wrong for reasons of data or disk, not of usage: one line, exit code 1."""


class FailFast(RunFailed):
    """--fail-fast: a sample failed; its shard was not committed."""
