"""The archival tier: payloads split into tensors, deduplicated, compressed, delta-coded.

An archived payload is a *recipe* (its safetensors header bytes and, for each
tensor, the SHA-256 of that tensor's raw bytes: its *tid*) plus one *tensor
blob* per distinct tid, shared by every archived version holding that tensor.
A blob holds the tensor compressed by :mod:`hydra_cas.codec`, either on its own
or as the XOR with a *base* tensor (the same-named tensor of the parent
version), whichever is smaller.  Delta chains are at most
:data:`MAX_DELTA_DEPTH` links long, so rebuilding a tensor reads at most
``MAX_DELTA_DEPTH + 1`` blobs.

Everything read back is bounded by sizes recorded elsewhere and checked: a blob's
raw size must equal the recipe's byte range, its dtype the header's, its depth
its base's depth plus one, and the decoded bytes must hash to the tid.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra_cas import codec, fsio
from hydra_cas.dtypes import ITEMSIZE
from hydra_cas.errors import IntegrityError, ManifestError
from hydra_cas.layout import check_oid, is_oid, iter_fanout
from hydra_cas.stheader import parse_header

if TYPE_CHECKING:
    from collections.abc import Iterator

    from hydra_cas.layout import Layout
    from hydra_cas.stheader import Header

__all__ = [
    "MAX_DELTA_DEPTH",
    "BlobHeader",
    "RecipeTensor",
    "Recipe",
    "Archive",
    "ArchiveStats",
]

logger = logging.getLogger(__name__)

RECIPE_FORMAT = 1
MAX_DELTA_DEPTH = 8
BLOB_MAGIC = b"HCT1"
KIND_PLAIN = 0
KIND_XOR = 1
# magic, kind, depth, reserved, raw size, base tid (32 raw bytes), dtype (16 ASCII, NUL padded)
_BLOB_HEADER = struct.Struct("<4sBBHQ32s16s")
BLOB_HEADER_SIZE = _BLOB_HEADER.size  # 64
_MAX_RECIPE_BYTES = 256 * 1024 * 1024


def _max_frame(size: int) -> int:
    # The codec keeps the smallest of its encodings and one of them is the raw
    # bytes behind a small fixed frame, so no honest blob exceeds this.
    return size + 4096


@dataclass(frozen=True, slots=True)
class BlobHeader:
    """The fixed 64-byte header of a tensor blob."""

    kind: int
    depth: int
    raw_size: int
    base: str | None
    dtype: str

    def pack(self) -> bytes:
        base = bytes.fromhex(self.base) if self.base else bytes(32)
        return _BLOB_HEADER.pack(
            BLOB_MAGIC, self.kind, self.depth, 0, self.raw_size, base, self.dtype.encode("ascii")
        )

    @classmethod
    def unpack(cls, data: bytes, tid: str) -> BlobHeader:
        if len(data) < BLOB_HEADER_SIZE:
            raise IntegrityError(f"tensor blob {tid} is truncated ({len(data)} bytes)", oid=tid)
        magic, kind, depth, reserved, raw_size, base, dtype = _BLOB_HEADER.unpack_from(data)
        if magic != BLOB_MAGIC or reserved != 0 or kind not in (KIND_PLAIN, KIND_XOR):
            raise IntegrityError(f"tensor blob {tid} has a bad header (not a hydra_cas tensor blob)", oid=tid)
        name = dtype.rstrip(b"\0").decode("ascii", "replace")
        if name not in ITEMSIZE:
            # Readers decode the frame as this dtype, so it must be one the codec knows.
            raise IntegrityError(f"tensor blob {tid} names unknown dtype {name[:16]!r}", oid=tid)
        if kind == KIND_PLAIN:
            if depth != 0 or any(base):
                raise IntegrityError(
                    f"tensor blob {tid}: a plain blob must have depth 0 and no base", oid=tid
                )
            return cls(kind, 0, raw_size, None, name)
        if not 1 <= depth <= MAX_DELTA_DEPTH:
            raise IntegrityError(f"tensor blob {tid}: delta depth {depth} is out of range", oid=tid)
        return cls(kind, depth, raw_size, base.hex(), name)


@dataclass(frozen=True, slots=True)
class RecipeTensor:
    """One tensor of a recipe: where its bytes go in the payload and which blob holds them."""

    name: str
    dtype: str
    begin: int  # absolute offsets in the payload
    end: int
    tid: str | None  # None for zero-size tensors


@dataclass(frozen=True, slots=True)
class Recipe:
    """How to rebuild one payload, byte for byte."""

    oid: str
    size: int
    header: bytes  # the payload's first data_start bytes
    tensors: tuple[RecipeTensor, ...]

    def to_json(self) -> bytes:
        doc = {
            "format_version": RECIPE_FORMAT,
            "oid": self.oid,
            "size": self.size,
            "header": base64.b64encode(self.header).decode("ascii"),
            "tensors": [[t.tid, t.begin, t.end] for t in self.tensors],
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes, oid: str) -> Recipe:
        """Parse and fully validate a recipe against the header it carries."""
        where = f"archive recipe {oid}"
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError):
            raise IntegrityError(f"{where} is not valid JSON", oid=oid) from None
        if not isinstance(doc, dict) or doc.keys() != {"format_version", "oid", "size", "header", "tensors"}:
            raise IntegrityError(f"{where} does not have the recipe fields", oid=oid)
        if doc["format_version"] != RECIPE_FORMAT:
            raise IntegrityError(
                f"{where} has unknown format_version {str(doc['format_version'])[:10]}", oid=oid
            )
        if doc["oid"] != oid or type(doc["size"]) is not int or doc["size"] < 8:
            raise IntegrityError(f"{where} names another payload or a bad size", oid=oid)
        size = doc["size"]
        try:
            header_bytes = base64.b64decode(doc["header"], validate=True)
        except (ValueError, TypeError):
            raise IntegrityError(f"{where}: header is not base64", oid=oid) from None
        try:
            header = parse_header(header_bytes, size)
        except Exception as exc:  # InvalidSafetensorsError: the stored header is damaged
            raise IntegrityError(f"{where}: stored header is invalid: {exc}", oid=oid) from None
        if len(header_bytes) != header.data_start:
            raise IntegrityError(f"{where}: stored header has trailing bytes", oid=oid)
        entries = doc["tensors"]
        if not isinstance(entries, list) or len(entries) != len(header.tensors):
            raise IntegrityError(f"{where}: tensor list does not match its header", oid=oid)
        tensors = []
        for info, item in zip(header.tensors, entries, strict=True):
            if not (isinstance(item, list) and len(item) == 3):
                raise IntegrityError(f"{where}: malformed tensor entry", oid=oid)
            tid, begin, end = item
            # Exact ints only: 88.0 or true compare equal to an int and would get
            # past the check below, then fail later as a TypeError, not an IntegrityError.
            if type(begin) is not int or type(end) is not int:
                raise IntegrityError(f"{where}: tensor {info.name!r} has non-integer offsets", oid=oid)
            if begin != header.data_start + info.begin or end != header.data_start + info.end:
                raise IntegrityError(
                    f"{where}: tensor {info.name!r} offsets disagree with the header", oid=oid
                )
            if (tid is None) != (begin == end) or (tid is not None and not is_oid(tid)):
                raise IntegrityError(f"{where}: tensor {info.name!r} has a bad tensor id", oid=oid)
            tensors.append(RecipeTensor(info.name, info.dtype, begin, end, tid))
        return cls(oid, size, header_bytes, tuple(tensors))


@dataclass(slots=True)
class ArchiveStats:
    """What archiving one payload wrote."""

    tensors: int = 0
    reused: int = 0  # tensors already in the archive (tensor-level dedup)
    plain: int = 0
    deltas: int = 0
    raw_bytes: int = 0  # raw bytes of the newly written tensors
    stored_bytes: int = 0  # bytes of the newly written blobs


class Archive:
    """Tensor blobs and recipes under ``archive/``."""

    def __init__(self, layout: Layout, *, durable: bool = True) -> None:
        self.layout = layout
        self.durable = durable
        self.tensors_dir = layout.archive / "tensors" / "sha256"
        self.recipes_dir = layout.archive / "recipes" / "sha256"

    # -- paths

    def tensor_path(self, tid: str) -> Path:
        check_oid(tid, "tensor id")
        return self.tensors_dir / tid[:2] / tid[2:]

    def recipe_path(self, oid: str) -> Path:
        check_oid(oid)
        return self.recipes_dir / oid[:2] / oid[2:]

    def has_recipe(self, oid: str) -> bool:
        return self.recipe_path(oid).is_file()

    def iter_files(self, which: str) -> Iterator[tuple[str, Path]]:
        """(id, path) of every tensor blob (``"tensors"``) or recipe (``"recipes"``)."""
        return iter_fanout(self.tensors_dir if which == "tensors" else self.recipes_dir)

    # -- writing

    def _publish(self, final: Path, data: bytes | bytearray | memoryview, *parts: bytes) -> None:
        fsio.makedirs(self.layout.tmp)
        fd, tmp = fsio.create_temp(self.layout.tmp)
        try:
            try:
                fsio.write_all(fd, data, tmp)
                for part in parts:
                    fsio.write_all(fd, part, tmp)
                if self.durable:
                    fsio.fsync(fd, tmp)
            finally:
                os.close(fd)
            fsio.chmod(tmp, 0o444)
            created = fsio.makedirs(final.parent)
            fsio.replace(tmp, str(final))
        except BaseException:
            fsio.discard(tmp)
            raise
        if self.durable:
            fsio.fsync_dir(final.parent)
            if created:
                fsio.fsync_dir(final.parent.parent)

    def _touch(self, path: Path) -> bool:
        """Refresh mtime (so gc's grace period protects it); False if it is gone."""
        try:
            os.utime(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            logger.debug("could not refresh mtime of %s: %s", path, exc)
        return True

    def _touch_chain(self, tid: str) -> bool:
        """Refresh the mtime of a blob and of each base under it; False if a link is gone or unreadable.

        A blob about to be referenced again (reused, or taken as a delta base)
        needs its whole chain inside gc's grace period: gc re-checks each file's
        age under the lock before deleting it, and an unreferenced delta's
        bases are as unreferenced as the delta itself.
        """
        for _ in range(MAX_DELTA_DEPTH + 1):
            if not self._touch(self.tensor_path(tid)):
                return False
            try:
                header = self.blob_header(tid)
            except IntegrityError:
                return False
            if header.base is None:
                return True
            tid = header.base
        return False  # unreachable for valid headers: depths are bounded and descend

    def refresh(self, oid: str) -> bool:
        """Touch an existing recipe and every blob it needs; False if anything is missing or unreadable.

        Lets an archive reuse the archived form of the same bytes left by an
        earlier archive (or a restored version) without gc collecting it meanwhile.
        """
        path = self.recipe_path(oid)
        if not self._touch(path):
            return False
        try:
            recipe = self.read_recipe(oid)
        except IntegrityError:
            return False
        return all(self._touch_chain(t.tid) for t in recipe.tensors if t.tid is not None)

    def write_recipe(self, recipe: Recipe) -> None:
        path = self.recipe_path(recipe.oid)
        data = recipe.to_json()
        try:
            with open(path, "rb") as f:
                same = f.read(len(data) + 1) == data
        except FileNotFoundError:
            same = False
        # A damaged recipe left in place is replaced, not reused: rebuilding
        # from it would fail the check before commit on every later attempt.
        if same and self._touch(path):
            return
        self._publish(path, data)

    def put_tensor(
        self, raw: memoryview, dtype: str, tid: str, base_tid: str | None, stats: ArchiveStats
    ) -> None:
        """Store one tensor's bytes under ``tid`` unless already there.

        With ``base_tid``, the XOR against that tensor is tried too and kept
        when smaller; a base whose chain is already at the depth bound is not
        used (the tensor becomes a new plain blob, a "keyframe").
        """
        path = self.tensor_path(tid)
        stats.tensors += 1
        if path.is_file() and self._touch_chain(tid):
            stats.reused += 1
            return
        best = codec.encode(raw, dtype)
        header = BlobHeader(KIND_PLAIN, 0, len(raw), None, dtype)
        if base_tid is not None and base_tid != tid and self._touch_chain(base_tid):
            try:
                base_header = self.blob_header(base_tid)
                if (
                    base_header.depth < MAX_DELTA_DEPTH
                    and base_header.raw_size == len(raw)
                    and base_header.dtype == dtype
                ):
                    base_raw = self.tensor_bytes(base_tid, len(raw), dtype)
                    delta = codec.encode(codec.xor_bytes(raw, base_raw), dtype)
                    if len(delta) < len(best):
                        best = delta
                        header = BlobHeader(KIND_XOR, base_header.depth + 1, len(raw), base_tid, dtype)
            except IntegrityError as exc:
                # A damaged (or just collected) base only costs the delta.
                logger.warning("delta base %s unusable, storing tensor %s plain: %s", base_tid, tid, exc)
        self._publish(path, header.pack(), best)
        if header.kind == KIND_XOR:
            stats.deltas += 1
        else:
            stats.plain += 1
        stats.raw_bytes += len(raw)
        stats.stored_bytes += BLOB_HEADER_SIZE + len(best)

    # -- reading

    def blob_header(self, tid: str) -> BlobHeader:
        try:
            with open(self.tensor_path(tid), "rb") as f:
                return BlobHeader.unpack(f.read(BLOB_HEADER_SIZE), tid)
        except FileNotFoundError:
            raise IntegrityError(
                f"tensor blob {tid} is missing from the archive; run `hydra-cas fsck`", oid=tid
            ) from None

    def tensor_bytes(
        self, tid: str, size: int, dtype: str, *, verify: bool = True, _depth: int | None = None
    ) -> bytearray:
        """Rebuild one tensor's raw bytes, following its delta chain (bounded)."""
        try:
            with open(self.tensor_path(tid), "rb") as f:
                # Never read more than a blob of this raw size can legitimately hold.
                limit = BLOB_HEADER_SIZE + _max_frame(size)
                data = f.read(limit + 1)
        except FileNotFoundError:
            raise IntegrityError(
                f"tensor blob {tid} is missing from the archive; run `hydra-cas fsck`", oid=tid
            ) from None
        if len(data) > limit:
            raise IntegrityError(f"tensor blob {tid} is larger than any encoding of {size} bytes", oid=tid)
        header = BlobHeader.unpack(data, tid)
        # A tid names bytes, not a dtype: tensors of different dtypes holding the
        # same bytes (zeros, typically) share one blob, written with the first
        # one's dtype.  So the frame is decoded as the dtype it was made for, and
        # the SHA-256 check makes the bytes right whatever the recipe calls them.
        # A delta and its base are always written with one dtype, so along a
        # chain the dtypes must agree.
        if header.raw_size != size or (_depth is not None and header.dtype != dtype):
            raise IntegrityError(
                f"tensor blob {tid} holds {header.raw_size} bytes of {header.dtype}, "
                f"expected {size} of {dtype}",
                oid=tid,
            )
        if _depth is not None and header.depth != _depth:
            raise IntegrityError(f"tensor blob {tid}: delta chain depths do not descend by one", oid=tid)
        raw = codec.decode(memoryview(data)[BLOB_HEADER_SIZE:], header.dtype, size)
        if header.kind == KIND_XOR:
            assert header.base is not None
            base = self.tensor_bytes(header.base, size, header.dtype, verify=False, _depth=header.depth - 1)
            raw = codec.xor_bytes(raw, base)
        if verify and hashlib.sha256(raw).hexdigest() != tid:
            raise IntegrityError(f"tensor blob {tid} decodes to bytes with another SHA-256", oid=tid)
        return raw

    def read_recipe(self, oid: str) -> Recipe:
        path = self.recipe_path(oid)
        try:
            with open(path, "rb") as f:
                # read(n) allocates n bytes up front, so bound it by the file's
                # size: reading every recipe must not cost the 256 MiB limit.
                size = os.fstat(f.fileno()).st_size
                raw = f.read(min(size, _MAX_RECIPE_BYTES) + 1)
        except FileNotFoundError:
            raise IntegrityError(
                f"archive recipe for object {oid} is missing; run `hydra-cas fsck`", oid=oid
            ) from None
        if len(raw) > _MAX_RECIPE_BYTES:
            raise IntegrityError(f"archive recipe {oid} is implausibly large", oid=oid)
        return Recipe.from_json(raw, oid)

    def iter_payload(self, recipe: Recipe, *, verify_tensors: bool = True) -> Iterator[bytes | bytearray]:
        """Yield the payload's bytes in order: the header, then each tensor."""
        yield recipe.header
        for tensor in recipe.tensors:
            if tensor.tid is not None:
                yield self.tensor_bytes(
                    tensor.tid, tensor.end - tensor.begin, tensor.dtype, verify=verify_tensors
                )

    def live_tensors(self, recipe_oids: set[str]) -> tuple[set[str], list[str]]:
        """Every tid the given recipes need, delta bases included; and problems met."""
        live: set[str] = set()
        problems: list[str] = []
        stack: list[str] = []
        for oid in recipe_oids:
            try:
                recipe = self.read_recipe(oid)
            except IntegrityError as exc:
                problems.append(str(exc))
                continue
            stack.extend(t.tid for t in recipe.tensors if t.tid is not None)
        while stack:
            tid = stack.pop()
            if tid in live:
                continue
            live.add(tid)
            try:
                header = self.blob_header(tid)
            except IntegrityError as exc:
                problems.append(str(exc))
                continue
            if header.base is not None:
                stack.append(header.base)
        return live, problems

    # -- the whole operation

    def archive_payload(
        self, oid: str, payload: memoryview, header: Header, parent: Recipe | None
    ) -> ArchiveStats:
        """Write the blobs and recipe of a verified payload; return what was written."""
        stats = ArchiveStats()
        bases: dict[str, RecipeTensor] = {}
        if parent is not None:
            bases = {t.name: t for t in parent.tensors if t.tid is not None}
        tensors = []
        for info in header.tensors:
            begin, end = header.data_start + info.begin, header.data_start + info.end
            if begin == end:
                tensors.append(RecipeTensor(info.name, info.dtype, begin, end, None))
                continue
            raw = payload[begin:end]
            tid = hashlib.sha256(raw).hexdigest()
            base = bases.get(info.name)
            base_tid = (
                base.tid
                if base is not None and base.dtype == info.dtype and base.end - base.begin == end - begin
                else None
            )
            self.put_tensor(raw, info.dtype, tid, base_tid, stats)
            tensors.append(RecipeTensor(info.name, info.dtype, begin, end, tid))
        recipe = Recipe(oid, len(payload), bytes(payload[: header.data_start]), tuple(tensors))
        self.write_recipe(recipe)
        return stats

    def usage(self, recipe_oids: set[str]) -> dict[str, Any]:
        """Bytes of the archive and what compression and deltas saved (live data only)."""
        live, _ = self.live_tensors(recipe_oids)
        stored = raw_plain = stored_plain = raw_delta = stored_delta = 0
        for tid in live:
            path = self.tensor_path(tid)
            try:
                size = path.stat().st_size
                header = self.blob_header(tid)
            except (FileNotFoundError, IntegrityError):
                continue
            stored += size
            if header.kind == KIND_XOR:
                raw_delta += header.raw_size
                stored_delta += size
            else:
                raw_plain += header.raw_size
                stored_plain += size
        recipes = 0
        for oid in recipe_oids:
            try:
                recipes += self.recipe_path(oid).stat().st_size
            except FileNotFoundError:
                continue
        return {
            "tensor_blobs": len(live),
            "stored_bytes": stored + recipes,
            "unique_tensor_bytes": raw_plain + raw_delta,
            "compression_saved_bytes": raw_plain - stored_plain,
            "delta_saved_bytes": raw_delta - stored_delta,
        }


def load_parent_recipe(archive: Archive, entry: dict[str, Any] | None) -> Recipe | None:
    """The recipe of an archived parent entry, or None when it is not archived."""
    if entry is None or entry["tier"] != "archive":
        return None
    try:
        return archive.read_recipe(entry["oid"])
    except (IntegrityError, ManifestError) as exc:
        logger.warning("parent recipe unreadable, archiving without deltas: %s", exc)
        return None
