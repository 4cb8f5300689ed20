"""``python -m matrixrtc recording-key KEYFILE``: a key pair for encrypted recordings.

Writes a new X25519 private key to KEYFILE (base64, mode 0600; an existing file is never
overwritten) and prints the public key. Give the public key to ``record --encrypt-to``; keep
KEYFILE for ``decrypt-recording --key``. Without KEYFILE's private key nobody, the recorder
included, can read the recording.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from matrixrtc.media.sealed_file import generate_key_file

__all__ = ["register", "run"]


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "recording-key",
        help="make a key pair for encrypted recordings (prints the public key)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("keyfile", type=Path, help="where to write the private key (must not exist)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path: Path = args.keyfile
    try:
        public = generate_key_file(path)
    except FileExistsError:
        print(f"error: {path} exists; it is never overwritten", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: cannot write {path}: {exc.strerror}", file=sys.stderr)
        return 1
    print(public)
    print(f"private key written to {path}; record with --encrypt-to {public}", file=sys.stderr)
    return 0
