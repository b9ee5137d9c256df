"""A shared, content-addressed store for build stages, addressed by an fsspec URL.

Layout under the URL (local path, s3://, gs://, memory://, ...):

    objects/<sha256[:2]>/<sha256>   file contents, written once, named by their hash
    index/<stage key>.json          {"stage", "key", "files": {relpath: {sha256, size}}, "record"}

An index document is written only after every object it names is in place, so a
document that exists is complete. Pulls verify each object's sha256 before anything
is moved into the output folder.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from diffprism.manifest import IGNORED, FileEntry
from exporters.errors import IntegrityError, UsageError
from exporters.files import STAGING, replace_dir, sha256_file
from exporters.paths import check_relpath, printable

# Never written from a store: the manifest, the lock, staging and the stage records (.stages/).
RESERVED = frozenset(IGNORED)


class _Index(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stage: str
    key: str
    files: dict[str, FileEntry]  # an object: the same sha256 + size record as a manifest entry
    record: dict[str, Any]

log = logging.getLogger(__name__)


class Store:
    def __init__(self, url: str):
        import fsspec

        try:
            self.fs, self.root = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as exc:
            raise UsageError(f"cannot open store '{url}': {exc}",
                             "use a local path, memory://, or s3:// / gs:// with s3fs / gcsfs installed") from None
        self.url = url
        self.root = self.root.rstrip("/")

    def _object(self, sha: str) -> str:
        return f"{self.root}/objects/{sha[:2]}/{sha}"

    def _index(self, key: str) -> str:
        return f"{self.root}/index/{key}.json"

    def _put_atomic(self, final: str, *, local: Path | None = None, data: bytes | None = None) -> None:
        """Write to a temporary name next to `final`, then move it into place."""
        parent = final.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
        if local is not None:
            self.fs.put_file(str(local), tmp)
        else:
            self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, final)

    def has(self, key: str) -> bool:
        return self.fs.exists(self._index(key))

    def index(self, key: str) -> dict[str, Any] | None:
        """The stage's index document, checked: object names are sha256 hex, paths stay inside the set
        and never name the manifest or the stage records (IntegrityError otherwise)."""
        path = self._index(key)
        if not self.fs.exists(path):
            return None
        fix = f"delete index/{key}.json from {self.url} and rebuild the stage"
        try:
            doc = json.loads(self.fs.cat_file(path).decode("utf-8"))
            _Index.model_validate(doc)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IntegrityError(f"store index {key[:12]} is not valid UTF-8 JSON ({type(exc).__name__})", fix) from None
        except ValidationError as exc:
            err = exc.errors()[0]
            raise IntegrityError(f"store index {key[:12]}: {'.'.join(printable(str(p)) for p in err['loc'])}: "
                                 f"{err['msg']}", fix) from None
        except OSError as exc:
            raise IntegrityError(f"cannot read store index {key[:12]}: {exc}", fix) from None
        if doc["key"] != key:
            raise IntegrityError(f"store index {key[:12]} names another key ({printable(doc['key'])[:12]})", fix)
        for rel in doc["files"]:
            parts = check_relpath(rel, "store index path").parts
            if parts[0] in RESERVED:
                raise IntegrityError(f"store index {key[:12]} would overwrite {printable(rel)}", fix)
        return doc

    def push(self, stage: str, key: str, out: Path, files: dict[str, dict[str, Any]], record: dict[str, Any]) -> int:
        """Upload the stage's files (those not already stored) and its index document; returns bytes sent."""
        sent = 0
        for rel, entry in sorted(files.items()):
            target = self._object(entry["sha256"])
            if self.fs.exists(target):
                continue
            local = out / rel
            if sha256_file(local) != entry["sha256"]:
                raise IntegrityError(f"{local} changed while it was being pushed", "re-run the build")
            self._put_atomic(target, local=local)
            sent += entry["size"]
        doc = {"stage": stage, "key": key, "files": files, "record": record}
        self._put_atomic(self._index(key), data=(json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
        log.info("pushed %s (%s): %d files, %d new bytes", stage, key[:12], len(files), sent)
        return sent

    def pull(self, key: str, out: Path) -> dict[str, Any]:
        """Fetch a stage's files into `out` (verified, then moved into place per top-level folder).

        Any failure leaves `out` as it was and the staging folder removed: an IntegrityError (exit 6).
        """
        doc = self.index(key)
        if doc is None:
            raise UsageError(f"stage {key[:12]} is not in the store {self.url}", "run the job that builds it first")
        staging = out / STAGING / f"pull.{uuid.uuid4().hex}"
        staging.mkdir(parents=True)
        try:
            tops: set[str] = set()
            for rel, entry in sorted(doc["files"].items()):
                parts = check_relpath(rel, "store index path").parts
                dest = staging.joinpath(*parts)
                dest.parent.mkdir(parents=True, exist_ok=True)
                obj = self._object(entry["sha256"])
                if not self.fs.exists(obj):
                    raise IntegrityError(f"store object for {printable(rel)} is missing from {self.url}",
                                         "rebuild the stage and push it again")
                self.fs.get_file(obj, str(dest))
                if _sha256(dest) != entry["sha256"]:
                    raise IntegrityError(f"store object for {printable(rel)} does not match its hash",
                                         f"delete it from {self.url} and rebuild")
                tops.add(parts[0])
        except IntegrityError:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        except Exception as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise IntegrityError(f"cannot pull stage {key[:12]} from {self.url}: {type(exc).__name__}: {exc}",
                                 "check the store, then rebuild the stage") from None
        for top in sorted(tops):
            src, final = staging / top, out / top
            if src.is_dir():
                replace_dir(src, final)
            else:
                os.replace(src, final)
        shutil.rmtree(staging, ignore_errors=True)
        log.info("pulled %s (%s): %d files", doc["stage"], key[:12], len(doc["files"]))
        return doc


def _sha256(path: Path) -> str:
    return sha256_file(path) if path.is_file() else hashlib.sha256(b"").hexdigest()
