"""``eval --results DIR``: finished shards kept on disk, so a rerun computes only what is missing.

One file per finished shard, ``DIR/<recipe>/<first image position>-<key>.shard``, where the key
(`edge_convnext.shards.shard_key`) hashes the artifact's sha256, the image ids, the preprocessing, the
runtime and its version, the thread count and the CPU: a changed kernel or image list is a different
file, never a reused number. Layout: a magic line, the sha256 of the payload, then the payload (an
``.npz`` of the logits and ids, read with ``allow_pickle=False``). A file that fails its checksum or
does not parse is reported, deleted and recomputed. Written with temp file + rename (`fileio`).
Only complete "ok" shards are stored; failed, unrunnable or budget-stopped shards are retried next time.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import numpy as np

from edge_convnext.shards import Shard, ShardResult
from edge_convnext.fileio import write_bytes_atomic

log = logging.getLogger(__name__)
MAGIC = b"edge-convnext-shard/v1\n"


class ShardStore:
    """Finished shards under ``root``; `load` returns None for a missing or corrupted one."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.corrupted: list[Path] = []

    def path(self, shard: Shard, key: str) -> Path:
        return self.root / shard.job.recipe / f"{shard.start:07d}-{key[:32]}.shard"

    def save(self, shard: Shard, key: str, r: ShardResult) -> None:
        if r.status != "ok" or r.stopped_by_budget:
            return
        meta = {"key": key, "shard": shard.label, "runner": r.runner, "emulated": r.emulated,
                "run_seconds": r.run_seconds, "wall_seconds": r.wall_seconds, "loop_seconds": r.loop_seconds,
                "identity": r.identity}
        buf = io.BytesIO()
        np.savez(buf, logits=r.logits.astype(np.float32), ids=np.asarray(r.ids, dtype=np.str_),
                 failed_ids=np.asarray(r.failed_ids, dtype=np.str_), meta=np.asarray(json.dumps(meta)))
        payload = buf.getvalue()
        write_bytes_atomic(self.path(shard, key), MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)

    def load(self, shard: Shard, key: str) -> ShardResult | None:
        path = self.path(shard, key)
        if not path.is_file():
            return None
        try:
            return self._read(path, shard, key)
        except (OSError, ValueError, KeyError) as e:
            log.warning("%s: corrupted shard result (%s); recomputing it", path, e)
            self.corrupted.append(path)
            path.unlink(missing_ok=True)
            return None

    @staticmethod
    def _read(path: Path, shard: Shard, key: str) -> ShardResult:
        data = path.read_bytes()
        if not data.startswith(MAGIC):
            raise ValueError("not an edge-convnext shard file")
        digest, payload = data[len(MAGIC) : len(MAGIC) + 64].decode("ascii", "replace"), data[len(MAGIC) + 65 :]
        if hashlib.sha256(payload).hexdigest() != digest:
            raise ValueError("checksum mismatch")
        with np.load(io.BytesIO(payload), allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            r = ShardResult(status="ok", runner=meta["runner"], emulated=bool(meta["emulated"]),
                            ids=[str(s) for s in z["ids"]], logits=z["logits"].astype(np.float32),
                            failed_ids=[str(s) for s in z["failed_ids"]], run_seconds=float(meta["run_seconds"]),
                            wall_seconds=float(meta["wall_seconds"]),
                            loop_seconds=float(meta.get("loop_seconds", 0.0)), identity=meta["identity"])
        expected = [s.image_id for s in shard.samples]
        if meta["key"] != key or sorted(r.ids + r.failed_ids) != sorted(expected) or r.logits.shape[0] != len(r.ids):
            raise ValueError("contents do not match the shard it is named for")
        return r
