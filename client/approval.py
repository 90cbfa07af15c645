"""Which Flower apps a node runs: the sha256 hashes of the FABs its data holder approved.

Flower names an app bundle (FAB) by ``sha256(FAB bytes)`` (``fab_hash``; the SuperLink recomputes
it from the bytes). The data holder reviews what the operator sends (the app directory or the
``.fab``), computes that hash here, and adds it to the node's allowlist; the node
(``python -m client.supernode --approved-apps FILE``) refuses any other FAB before it is stored or
run. Usage::

    python -m client.approval hash <app dir | file.fab>      # the fab_hash Flower will see
    python -m client.approval add FILE <app dir | file.fab> [--label TEXT]
    python -m client.approval list FILE                      # what FILE approves (exit 1: refuses all)

A directory is bundled with Flower's own builder (``flwr.cli.build.build_fab_from_disk``), the
one ``flwr run <dir>`` uses, so the hash is what that run will carry. The build is deterministic:
files in sorted order, a fixed date, no file modes; it depends only on the files' paths and bytes
(including any untracked file that ``.gitignore`` lets through, so hash the exact directory that
will be submitted). ``flwr run`` takes a directory, not a ``.fab``, and first moves a legacy
``[tool.flwr.federations]`` table out of ``pyproject.toml``: hash a directory that has none.

Allowlist format (text, UTF-8): one approval per line, ``<64 hex digits> [label]``; blank lines
and lines starting with ``#`` are ignored. A missing, unreadable, malformed or empty file approves
nothing: the node then refuses every app (fail closed), and says why.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HASH = re.compile(r"[0-9a-f]{64}")
HEADER = ("# fedistill approved apps: sha256 of each FAB this node may run (python -m client.approval add)\n"
          "# <sha256> [label]\n")


class AllowlistError(ValueError):
    """The allowlist cannot be read as one; a node refuses every app until it is fixed."""


def fab_hash(content: bytes) -> str:
    """Flower's ``fab_hash`` of FAB bytes (``hashlib.sha256(fab).hexdigest()`` in Flower 1.42)."""
    return hashlib.sha256(content).hexdigest()


def fab_bytes(source: str | Path) -> bytes:
    """The FAB for ``source``: a ``.fab`` file's bytes, or a directory bundled as ``flwr run`` does."""
    path = Path(source).expanduser()
    if path.is_dir():
        from flwr.cli.build import build_fab_from_disk  # local: Flower's CLI stack is only needed here

        return build_fab_from_disk(path)
    if path.is_file():
        return path.read_bytes()
    raise FileNotFoundError(f"{path}: neither an app directory nor a .fab file")


def hash_source(source: str | Path) -> str:
    """The ``fab_hash`` a run of ``source`` (app directory or ``.fab``) will carry."""
    return fab_hash(fab_bytes(source))


def read_allowlist(path: str | Path) -> dict[str, str]:
    """Approved hash -> label. Raises :class:`AllowlistError` for anything but a valid, non-empty list."""
    approved = _entries(_read(path), path)
    if not approved:
        raise AllowlistError(f"approved-apps file {path}: approves no app")
    return approved


def _read(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise AllowlistError(f"approved-apps file {path}: unreadable ({err})") from err


def _entries(text: str, path: str | Path) -> dict[str, str]:
    """The approvals in ``text``; one malformed line spoils the file (it may be a truncated hash)."""
    approved: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        digest, *label = line.split(maxsplit=1)
        if not HASH.fullmatch(digest.lower()):
            raise AllowlistError(f"approved-apps file {path}, line {number}: {digest[:80]!r} is not a sha256 "
                                 "hex digest (64 hex digits)")
        approved[digest.lower()] = label[0] if label else ""
    return approved


@dataclass(frozen=True)
class Approvals:
    """The node's allowlist, read afresh at every decision so an approval or a revocation
    takes effect for the next new run without restarting the node."""

    path: Path

    def refusal(self, digest: str) -> str | None:
        """Why the FAB with hash ``digest`` may not run here, or None when it is approved."""
        try:
            approved = read_allowlist(self.path)
        except AllowlistError as err:
            return f"{err}; every app is refused"
        if str(digest).lower() not in approved:
            return f"app {str(digest)[:80]} is not in the approved-apps file {self.path}"
        return None


def add(path: str | Path, source: str | Path, label: str = "") -> tuple[str, bool]:
    """Approve ``source``'s FAB in the allowlist ``path`` (created if missing): (hash, newly added).

    The file is replaced atomically, so a node reading it mid-write sees the old or the new list.
    """
    digest = hash_source(source)
    label = " ".join(f"{label} ({Path(source).name}, added {time.strftime('%Y-%m-%d')})".split())
    path = Path(path)
    text = _read(path) if path.exists() else HEADER
    if digest in _entries(text, path):  # also refuses to extend a malformed list
        return digest, False
    text = (text if text.endswith("\n") else text + "\n") + f"{digest} {label}\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest, True


def main(argv: list[str] | None = None) -> int:
    """The ``python -m client.approval`` command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m client.approval", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("hash", help="print the fab_hash of an app directory or .fab").add_argument("source")
    adding = sub.add_parser("add", help="approve an app directory or .fab in an allowlist file")
    adding.add_argument("file")
    adding.add_argument("source")
    adding.add_argument("--label", default="", help="a note kept next to the hash (who, what, why)")
    sub.add_parser("list", help="print what an allowlist approves").add_argument("file")
    args = parser.parse_args(argv)
    try:
        if args.command == "hash":
            print(hash_source(args.source))
        elif args.command == "add":
            digest, added = add(args.file, args.source, args.label)
            print(f"{digest} {'approved in' if added else 'already approved in'} {args.file}")
        else:
            for digest, label in read_allowlist(args.file).items():
                print(f"{digest} {label}".rstrip())
    except (AllowlistError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
