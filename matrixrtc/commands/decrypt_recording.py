"""``python -m matrixrtc decrypt-recording --key KEYFILE SRC [--out DIR]``: playable files
from an encrypted recording.

SRC is a recording directory (every ``*.sealed`` file in it, and its index — sealed
``index.json.sealed``, or a plain ``index.json`` of older recordings — as ``index.json`` with
the file names rewritten) or single ``.sealed`` files. Each ``NAME.sealed`` becomes ``DIR/NAME``
(DIR defaults to ``SRC-decrypted`` for a directory, the file's own directory otherwise);
existing files are never overwritten.

A file whose recorder stopped without finishing it (crash, power loss) is restored up to its
last intact chunk and reported as truncated. Exit status: 0 when every file decrypted whole,
1 when one could not be decrypted (wrong key, not a recording, altered), 2 when some were
truncated but everything else is fine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from matrixrtc.e2ee.sealed_stream import SealedStreamError, TruncatedStream
from matrixrtc.errors import LocalError
from matrixrtc.media.recorder import INDEX, index_path, read_index
from matrixrtc.media.sealed_file import SEALED_SUFFIX, decrypt_file, read_private_key

__all__ = ["register", "run"]


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "decrypt-recording",
        help="decrypt a recording made with record --encrypt-to",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", type=Path, nargs="+", help="recording directory or .sealed files")
    p.add_argument("--key", type=Path, required=True, help="private key file (recording-key)")
    p.add_argument("--out", type=Path, default=None, help="output directory")
    p.set_defaults(func=run)


def _plan(srcs: list[Path], out: Path | None) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """(sealed file, destination) pairs and the index files to rewrite into ``out``."""
    pairs: list[tuple[Path, Path]] = []
    indexes: list[Path] = []
    for src in srcs:
        if src.is_dir():
            dest = out or src.with_name(src.name + "-decrypted")
            for f in sorted(src.glob(f"*{SEALED_SUFFIX}")):
                if f.name != INDEX + SEALED_SUFFIX:
                    pairs.append((f, dest / f.name.removesuffix(SEALED_SUFFIX)))
            if index_path(src) is not None:
                indexes.append(src)
        elif src.name == INDEX + SEALED_SUFFIX:
            indexes.append(src.parent)
        elif src.name.endswith(SEALED_SUFFIX):
            pairs.append((src, (out or src.parent) / src.name.removesuffix(SEALED_SUFFIX)))
        else:
            raise LocalError(f"{src}: neither a recording directory nor a {SEALED_SUFFIX} file")
    return pairs, indexes


def _rewrite_index(data: dict[str, Any], dest_dir: Path) -> None:
    data["encrypted"] = False
    for p in data.get("participants", []):
        for seg in p.get("segments", []):
            if isinstance(seg.get("file"), str):
                seg["file"] = seg["file"].removesuffix(SEALED_SUFFIX)
    dest_dir.mkdir(parents=True, exist_ok=True)
    (dest_dir / INDEX).write_text(json.dumps(data, indent=2) + "\n")


def run(args: argparse.Namespace) -> int:
    try:
        key = read_private_key(args.key)
        pairs, indexes = _plan(list(args.src), args.out)
    except (LocalError, SealedStreamError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not pairs and not indexes:
        print("error: no .sealed files found", file=sys.stderr)
        return 1
    failed = truncated = False
    for src, dst in pairs:
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists():
            print(f"error: {dst} exists; not overwritten", file=sys.stderr)
            failed = True
            continue
        try:
            result = decrypt_file(src, dst, key)
        except TruncatedStream as exc:
            print(f"{src.name}: TRUNCATED: {exc}; restored what was intact to {dst}")
            truncated = True
            continue
        except SealedStreamError as exc:
            print(f"error: {src}: {exc}", file=sys.stderr)
            failed = True
            continue
        print(f"{src.name}: {result.plaintext_bytes} bytes in {result.chunks} chunks -> {dst}")
    for rec_dir in indexes:
        dest_dir = args.out or rec_dir.with_name(rec_dir.name + "-decrypted")
        if (dest_dir / INDEX).exists():
            continue
        try:
            data = read_index(rec_dir, key)
        except (LocalError, SealedStreamError, ValueError) as exc:
            print(f"error: {rec_dir} index: {exc}", file=sys.stderr)
            failed = True
            continue
        _rewrite_index(data, dest_dir)
        print(f"index -> {dest_dir / INDEX}")
    return 1 if failed else 2 if truncated else 0
