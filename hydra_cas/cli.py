"""The ``hydra-cas`` command line.

Every command is a small function taking the parsed arguments and the store; it
prints results to stdout and returns an exit status.  :func:`main` is the one
place that turns errors into messages and exit codes: a ``HydraError`` prints
one line to stderr (no traceback) and exits with the error's ``exit_code``.

Exit codes: 0 success; 1 fsck found problems; 2 usage or other error (an
unreadable input file included); 3 not found; 4 version exists (or is still
aliased); 5 integrity failure; 130 interrupted.  Whatever goes wrong, stderr gets
one line starting with ``hydra-cas:``; a traceback is shown only with ``-v``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra_cas import __version__
from hydra_cas.errors import HydraError, InvalidMetadataError, InvalidVersionError
from hydra_cas.refs import canonical_version, check_name, split_ref
from hydra_cas.store import DEFAULT_STORE, Store

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["build_parser", "main"]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- formatting


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=False)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip() for row in rows]
    return "\n".join(lines)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=False))


def _progress_wanted(args: argparse.Namespace) -> bool:
    return sys.stderr.isatty() and not getattr(args, "json", False)


# ---------------------------------------------------------------------------- commands


def _parse_meta(pairs: list[str] | None) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidMetadataError(f"--meta {pair!r}: write KEY=VALUE")
        try:
            meta[key] = json.loads(value)  # numbers, true/false, JSON lists stay typed
        except ValueError:
            meta[key] = value
    return meta


def _check_source(args: argparse.Namespace) -> None:
    """Refuse a bad input file of ``save`` before the store is opened (or created).

    A missing file, a directory or a hostile safetensors header must not leave
    an empty store behind; the header check is cheap (it reads the header only)
    and ``Store.import_file`` repeats it on the file it actually streams.
    """
    from hydra_cas.stheader import validate_file

    split_ref(args.ref, default_version=None)  # a bad NAME:VERSION is refused first, too
    path = Path(args.file)
    if not path.is_file():
        if not path.exists():
            raise HydraError(f"{args.file}: no such file")
        raise HydraError(f"{args.file}: not a regular file; give a .safetensors or .npz file")
    if path.suffix != ".npz":
        validate_file(path)


def cmd_save(args: argparse.Namespace, store: Store) -> int:
    name, version = split_ref(args.ref, default_version=None)
    result = store.import_file(
        args.file,
        name,
        version,
        metadata=_parse_meta(args.meta),
        parent=args.parent,
        progress=_progress_wanted(args),
    )
    if args.json:
        _print_json(
            {
                "name": result.name,
                "version": result.version,
                "oid": result.oid,
                "size": result.size,
                "deduplicated": result.deduplicated,
                "unchanged": result.unchanged,
            }
        )
    elif result.unchanged:
        print(f"{result.ref} already holds these bytes (sha256 {result.oid}); nothing changed")
    else:
        how = "deduplicated: no new bytes stored" if result.deduplicated else f"{_size(result.size)} stored"
        print(f"saved {result.ref}  sha256 {result.oid}  ({how})")
    return 0


def cmd_export(args: argparse.Namespace, store: Store) -> int:
    name, version = split_ref(args.ref)
    key = store.resolve(name, version)  # once: the line printed names the version written
    dest = Path(args.file)
    if dest.is_dir():
        raise HydraError(f"{args.file} is a directory; give the path of the file to write")
    if dest.exists() and not args.force:
        raise HydraError(f"{args.file} already exists; choose another path or pass --force to overwrite it")
    if not dest.absolute().parent.is_dir():
        raise HydraError(f"cannot write {args.file}: directory {dest.absolute().parent} does not exist")
    target = store.export(name, key, dest, overwrite=args.force, progress=_progress_wanted(args))
    print(f"wrote {target} ({name}:{key})")
    return 0


def cmd_ls(args: argparse.Namespace, store: Store) -> int:
    versions = store.list(args.name)
    if args.json:
        _print_json([v.to_dict() for v in versions])
        return 0
    if not versions:
        print(f"no models in {store.root}")
        return 0
    if args.name:
        rows = [
            [
                v.version + (" (latest)" if v.is_latest else ""),
                v.oid[:12],
                _size(v.size),
                str(v.tensors),
                v.tier,
                v.status,
                ",".join(v.aliases),
                v.created[:19].replace("T", " "),
            ]
            for v in versions
        ]
        print(_table(rows, ["VERSION", "OID", "SIZE", "TENSORS", "TIER", "STATUS", "ALIASES", "CREATED"]))
        return 0
    by_model: dict[str, list[Any]] = {}
    for v in versions:
        by_model.setdefault(v.name, []).append(v)
    rows = []
    for name, items in by_model.items():
        latest = next((v for v in items if v.is_latest), items[-1])
        aliases = sorted({f"{a}->{v.version}" for v in items for a in v.aliases})
        rows.append(
            [
                name,
                str(len(items)),
                latest.version,
                ",".join(aliases),
                _size(sum(v.size for v in items)),
                latest.created[:19].replace("T", " "),
            ]
        )
    print(_table(rows, ["NAME", "VERSIONS", "LATEST", "ALIASES", "SIZE", "CREATED"]))
    return 0


def cmd_show(args: argparse.Namespace, store: Store) -> int:
    name, version = split_ref(args.ref)
    info = store.info(name, version)
    tensors: list[dict[str, Any]] | None = None
    unavailable = "the version is marked broken" if info.status != "ok" else None
    if unavailable is None:
        try:
            tensors = store.tensors(name, info.version)
        except HydraError as exc:  # a missing object: still show the record
            unavailable = str(exc)
    if args.json:
        _print_json({**info.to_dict(), "tensor_list": tensors})
        return 0
    print(f"{info.ref}{'  (latest)' if info.is_latest else ''}")
    print(f"  oid       sha256:{info.oid}")
    print(f"  blake3    {info.blake3}")
    print(f"  size      {_size(info.size)} ({info.size:,} bytes)")
    print(f"  tensors   {info.tensors}   parameters {info.parameters:,}   dtypes {', '.join(info.dtypes)}")
    print(f"  tier      {info.tier}   status {info.status}")
    print(f"  created   {info.created}")
    print(f"  parent    {info.parent or '-'}")
    print(f"  aliases   {', '.join(info.aliases) or '-'}")
    print(f"  metadata  {json.dumps(info.metadata, sort_keys=True) if info.metadata else '-'}")
    if unavailable:
        print(f"  tensors unavailable: {unavailable}")
    elif tensors:
        print()
        print(
            _table(
                [[t["name"], t["dtype"], "x".join(map(str, t["shape"])) or "scalar"] for t in tensors],
                ["TENSOR", "DTYPE", "SHAPE"],
            )
        )
    return 0


def cmd_rm(args: argparse.Namespace, store: Store) -> int:
    name, version = split_ref(args.ref, default_version=None)
    try:
        canonical_version(version)
    except InvalidVersionError:
        # `latest`, an alias or a range: deleting whatever it means today is too easy to regret.
        raise HydraError(
            f"rm takes an exact version: {name}:{version} is {name}:{store.resolve(name, version)} now; "
            "write that"
        ) from None
    aliases = store.info(name, version).aliases if args.force else ()
    removed = store.delete(name, version, force=args.force)
    print(f"removed {name}:{removed} (its bytes are freed by `hydra-cas gc` once nothing else uses them)")
    if aliases:
        print(f"removed alias(es) pointing at it: {', '.join(aliases)}")
    return 0


def cmd_alias(args: argparse.Namespace, store: Store) -> int:
    if args.rm:
        if args.version is not None:
            raise HydraError("alias --rm takes NAME ALIAS only")
        store.remove_alias(args.name, args.alias)
        print(f"removed alias {args.name}:{args.alias}")
        return 0
    if args.version is None:
        raise HydraError("alias needs NAME ALIAS VERSION (or --rm NAME ALIAS)")
    target = store.set_alias(args.name, args.alias, args.version)
    print(f"alias {args.name}:{args.alias} -> {args.name}:{target}")
    return 0


def cmd_du(args: argparse.Namespace, store: Store) -> int:
    usage = store.du()
    if args.json:
        _print_json(usage)
        return 0
    rows = [
        [
            m["name"],
            str(m["versions"]),
            _size(m["logical_bytes"]),
            _size(m["stored_bytes"]),
            _size(m["dedup_saved_bytes"]),
        ]
        for m in usage["models"]
    ]
    total = usage["total"]
    rows.append(
        [
            "TOTAL",
            str(sum(m["versions"] for m in usage["models"])),
            _size(total["logical_bytes"]),
            _size(total["stored_bytes"]),
            _size(total["dedup_saved_bytes"]),
        ]
    )
    print(_table(rows, ["NAME", "VERSIONS", "LOGICAL", "STORED", "SAVED BY DEDUP"]))
    print(
        f"\non disk: {_size(total['on_disk_bytes'])}, of which unreferenced "
        f"(gc frees after the grace period): {_size(total['unreferenced_bytes'])}"
    )
    hot, archive = usage["tiers"]["hot"], usage["tiers"]["archive"]
    print(f"hot tier:     {hot['versions']} versions, {_size(hot['stored_bytes'])}")
    if archive["versions"]:
        print(
            f"archive tier: {archive['versions']} versions, {_size(archive['logical_bytes'])} logical "
            f"-> {_size(archive['stored_bytes'])} stored; saved by tensor dedup "
            f"{_size(archive['tensor_dedup_saved_bytes'])}, by compression "
            f"{_size(archive['compression_saved_bytes'])}, by deltas {_size(archive['delta_saved_bytes'])}"
        )
    return 0


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")


def _duration(text: str) -> float:
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration; write e.g. 3600, 30m, 1h or 7d")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def cmd_gc(args: argparse.Namespace, store: Store) -> int:
    grace = args.grace
    if args.prune_now:
        if not args.force:
            raise HydraError(
                "--prune-now deletes objects a save in flight may still need; add --force to confirm"
            )
        grace = 0.0
    plan = store.gc(grace_period=grace, dry_run=args.dry_run, progress=_progress_wanted(args))
    if args.json:
        _print_json(plan.to_dict())
    else:
        print(plan.render())
    return 0


def cmd_fsck(args: argparse.Namespace, store: Store) -> int:
    if args.sample is not None and not 0 < args.sample <= 100:
        raise HydraError("--sample takes a percentage above 0 and at most 100")
    if args.workers is not None and args.workers < 1:
        raise HydraError("--workers takes a number of hashing workers, 1 or more")
    report = store.fsck(
        repair=args.repair, sample=args.sample, workers=args.workers, progress=_progress_wanted(args)
    )
    if args.json:
        _print_json(report.to_dict())
    else:
        print(report.render())
    return report.exit_code


def cmd_archive(args: argparse.Namespace, store: Store) -> int:
    name = version = None
    if args.ref:
        if ":" in args.ref:
            name, version = split_ref(args.ref)
        else:
            name = check_name(args.ref)
    if args.older_than is not None and not 0 <= args.older_than < float("inf"):
        # NaN would compare false against every date and so select every version.
        raise HydraError("--older-than takes a number of days, 0 or more")
    chosen = store.archive_candidates(
        name, version, keep_latest=args.keep_latest, older_than_days=args.older_than
    )
    if args.dry_run:
        if args.json:
            _print_json({"would_archive": [f"{n}:{v}" for n, v in chosen]})
        else:
            print("\n".join(f"would archive {n}:{v}" for n, v in chosen) or "nothing to archive")
        return 0
    from hydra_cas.progress import progress_bar

    done: list[dict[str, Any]] = []
    with progress_bar(len(chosen), "archive", enabled=_progress_wanted(args), unit="version") as bar:
        for n, v in chosen:
            result = store.archive(n, v)
            stats = result.stats
            done.append(
                {
                    "ref": result.ref,
                    "oid": result.oid,
                    "size": result.size,
                    "tensors": stats.tensors if stats else 0,
                    "reused": stats.reused if stats else 0,
                    "deltas": stats.deltas if stats else 0,
                    "new_bytes": stats.stored_bytes if stats else 0,
                }
            )
            bar.update(1)
            if not args.json:
                last = done[-1]
                print(
                    f"archived {result.ref}: {_size(result.size)} -> {_size(last['new_bytes'])} new "
                    f"({last['reused']} of {last['tensors']} tensors shared, {last['deltas']} deltas)"
                )
    if args.json:
        _print_json({"archived": done})
    elif not done:
        print("nothing to archive")
    return 0


def cmd_restore(args: argparse.Namespace, store: Store) -> int:
    name, version = split_ref(args.ref, default_version=None)
    result = store.restore(name, version)
    print(f"{result.ref} is {'already' if result.already else 'now'} in the hot tier")
    return 0


def _transfer(args: argparse.Namespace, store: Store, direction: str) -> int:
    from hydra_cas.remote import pull, push

    remote = Store(args.remote, create=direction == "push")
    fn = push if direction == "push" else pull
    result = fn(store, remote, args.refs, progress=_progress_wanted(args))
    if args.json:
        _print_json(result.to_dict())
    else:
        print(result.render())
    return 0


def cmd_push(args: argparse.Namespace, store: Store) -> int:
    return _transfer(args, store, "push")


def cmd_pull(args: argparse.Namespace, store: Store) -> int:
    return _transfer(args, store, "pull")


def cmd_demo(args: argparse.Namespace, store_path: str) -> int:
    from hydra_cas.demo import run_demo

    return run_demo(store_path, print)


# ---------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--store",
        default=argparse.SUPPRESS,
        metavar="PATH",
        help=f"store directory or s3://bucket/prefix (default: $HYDRA_STORE or {DEFAULT_STORE})",
    )
    common.add_argument(
        "-v", "--verbose", action="count", default=argparse.SUPPRESS, help="show log messages (-vv for debug)"
    )
    parser = argparse.ArgumentParser(
        prog="hydra-cas",
        description="A versioned, content-addressed store for model weights.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"hydra-cas {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help_text: str, func: Any, *, json_flag: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        p.set_defaults(func=func)
        if json_flag:
            p.add_argument("--json", action="store_true", help="print JSON for scripts")
        return p

    p = add(
        "save",
        "import a .safetensors (stored byte for byte) or .npz file as NAME:VERSION",
        cmd_save,
        json_flag=True,
    )
    p.add_argument("file")
    p.add_argument("ref", metavar="NAME:VERSION")
    p.add_argument("--meta", action="append", metavar="KEY=VALUE", help="user metadata (repeatable)")
    p.add_argument("--parent", metavar="VERSION", help="the version this one derives from")

    p = add("export", "write a version's payload, byte-identical, to FILE", cmd_export)
    p.add_argument("ref", metavar="NAME[:VERSION]")
    p.add_argument("file")
    p.add_argument("-f", "--force", action="store_true", help="overwrite FILE if it exists")

    p = add("ls", "list models (or one model's versions)", cmd_ls, json_flag=True)
    p.add_argument("name", nargs="?")

    p = add("show", "show a version's record and tensors", cmd_show, json_flag=True)
    p.add_argument("ref", metavar="NAME[:VERSION]")

    p = add("rm", "remove a version's ref (gc frees its bytes later)", cmd_rm)
    p.add_argument("ref", metavar="NAME:VERSION")
    p.add_argument("-f", "--force", action="store_true", help="also remove aliases pointing at it")

    p = add("alias", "point ALIAS at a version, or remove it with --rm", cmd_alias)
    p.add_argument("name")
    p.add_argument("alias")
    p.add_argument("version", nargs="?")
    p.add_argument("--rm", action="store_true", help="remove the alias")

    add("du", "disk usage: logical, stored, saved by dedup", cmd_du, json_flag=True)

    p = add("gc", "delete objects nothing references (after a grace period)", cmd_gc, json_flag=True)
    p.add_argument("--dry-run", action="store_true", help="print the plan, delete nothing")
    p.add_argument(
        "--grace",
        type=_duration,
        default=3600.0,
        metavar="DURATION",
        help="only delete unreferenced objects older than this (default 1h; e.g. 30m, 7d)",
    )
    p.add_argument("--prune-now", action="store_true", help="grace period 0 (needs --force)")
    p.add_argument("-f", "--force", action="store_true", help="confirm --prune-now")

    p = add("fsck", "verify every object by re-hashing; --repair to mend", cmd_fsck, json_flag=True)
    p.add_argument(
        "--repair",
        action="store_true",
        help="quarantine corrupt objects, mark their refs broken, rebuild the manifest, clean temp files",
    )
    p.add_argument("--sample", type=float, metavar="PCT", help="hash only this percentage of objects")
    p.add_argument("--workers", type=int, metavar="N", help="hashing processes (default: all cores)")

    p = add(
        "archive",
        "move versions to the compressed, tensor-deduplicated archive tier",
        cmd_archive,
        json_flag=True,
    )
    p.add_argument("ref", nargs="?", metavar="NAME[:VERSION]")
    p.add_argument("--keep-latest", type=int, metavar="N", help="keep each model's newest N versions hot")
    p.add_argument(
        "--older-than", type=float, metavar="DAYS", help="only versions created more than DAYS ago"
    )
    p.add_argument("--dry-run", action="store_true", help="list what would be archived")

    p = add("restore", "bring an archived version back to the hot tier", cmd_restore)
    p.add_argument("ref", metavar="NAME:VERSION")

    for direction, func, text in (
        ("push", cmd_push, "copy versions and their aliases to another store (missing objects only)"),
        ("pull", cmd_pull, "copy versions and their aliases from another store (missing objects only)"),
    ):
        p = add(direction, text, func, json_flag=True)
        p.add_argument("remote", metavar="STORE", help="the other store: a directory or s3://bucket/prefix")
        p.add_argument("refs", nargs="*", metavar="NAME[:VERSION]",
                       help="what to copy: a model (all its versions) or one version (default: everything)")
        if direction == "pull":
            p.set_defaults(creates_store=True)

    add("demo", "run a guided demo on the store (default ./hydra_models)", cmd_demo)
    return parser


class _RaisedElsewhere(logging.Filter):
    """Drop the store's CRITICAL line about an integrity failure it is about to raise.

    ``Store`` logs every checksum mismatch at CRITICAL and then raises it (the
    prototype's callers relied on the log).  Here :func:`main` prints the raised
    error itself, or the demo tells its story, so the log line would only say the
    same thing twice; ``-v`` shows it again.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "hydra_cas.store" and record.levelno >= logging.CRITICAL)


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("hydra-cas: %(levelname)s: %(message)s"))
    if verbosity == 0:
        handler.addFilter(_RaisedElsewhere())
    root = logging.getLogger("hydra_cas")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


# Any of these marks a directory as a store (docs/FORMAT.md).  A lone ``lock`` is
# what a read-only command leaves in an empty directory.
_STORE_MARKERS = ("manifest.json", "journal.jsonl", "objects")
_HARMLESS = frozenset({"lock"})


def _check_store_dir(path: str) -> None:
    """Refuse a directory that holds other things and no store.

    gc deletes old files under ``<store>/tmp`` and fsck --repair moves files
    around, so ``--store ~`` or ``HYDRA_STORE=/`` must fail before anything runs.
    A missing or empty directory is fine (``save`` creates a store there).
    """
    if "://" in path:
        return  # a remote store: its backend checks it
    root = Path(path)
    if not root.is_dir() or any((root / marker).exists() for marker in _STORE_MARKERS):
        return
    with os.scandir(root) as entries:
        foreign = sorted(e.name for e in entries if e.name not in _HARMLESS)
    if foreign:
        raise HydraError(
            f"{root.absolute()} holds other files ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}) but no hydra_cas store (no manifest.json, "
            "journal.jsonl or objects/); pass the store's directory, or a new or empty one"
        )


def _one_line(text: str) -> str:
    """``text`` with newlines and other control characters escaped, so an error stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _fail(message: str) -> None:
    print(f"hydra-cas: error: {_one_line(message)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verbosity = getattr(args, "verbose", 0) or 0
    _configure_logging(verbosity)
    store_path = getattr(args, "store", None) or os.environ.get("HYDRA_STORE") or DEFAULT_STORE
    if args.func is cmd_demo:
        # The demo flips a byte of one of its own objects for a moment: it never
        # follows $HYDRA_STORE into a real store, only an explicit --store.
        store_path = getattr(args, "store", None) or DEFAULT_STORE
    try:
        _check_store_dir(store_path)
        if args.func is cmd_demo:
            status = cmd_demo(args, store_path)
        else:
            if args.func is cmd_save:
                _check_source(args)
            # Only commands that write may create a store; reads of a missing store are an error.
            creates = args.func in (cmd_save,) or getattr(args, "creates_store", False)
            store = Store(store_path, create=creates)
            status = int(args.func(args, store))
        sys.stdout.flush()  # a closed pipe shows up here, not at interpreter exit
        return status
    except HydraError as exc:
        _fail(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        print("hydra-cas: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout closed early (e.g. piped into head): not an error worth a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as exc:
        # A file the user named (save's input, export's target) that cannot be used.
        where = f"{exc.filename}: " if exc.filename else ""
        _fail(f"{where}{exc.strerror or exc}")
        return 2
    except Exception as exc:
        # A bug: still one line, but say so; -v shows the traceback for a report.
        if verbosity:
            logger.exception("unexpected error")
        _fail(f"unexpected {type(exc).__name__}: {exc} (this is a bug; rerun with -v for the traceback)")
        return 2


if __name__ == "__main__":
    sys.exit(main())
