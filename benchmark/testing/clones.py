"""A published file at a cited commit, read from a local clone of its repository, for the tests that check a
committed split or id list against the file it was made from (the files themselves are not shipped)."""

from __future__ import annotations

import os
import subprocess


def file_at_commit(variable: str, commit: str, path: str) -> bytes | None:
    """The bytes of ``path`` at ``commit`` in the git clone named by the environment variable ``variable``, or
    None where the variable is unset or the clone lacks that commit or file (the caller skips)."""
    repo = os.environ.get(variable)
    if not repo or not os.path.isdir(repo):
        return None
    shown = subprocess.run(["git", "-C", repo, "show", f"{commit}:{path}"], capture_output=True, check=False)
    return shown.stdout if shown.returncode == 0 else None
