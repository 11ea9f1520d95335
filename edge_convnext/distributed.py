"""``eval --ray [ADDRESS]``: shards (artifact x range of images) as Ray tasks, merged like a local run.

Needs the ``[ray]`` extra on the driver and the workers, and this package plus the artifact's runtime
on every worker. What travels where:

* artifacts and images are read from the same paths on every worker (a shared filesystem: NFS, a
  cluster volume); each task re-checks its artifact's sha256 against the manifest and against the
  sha256 the driver planned with, so a worker seeing a different file fails that shard loudly; a
  worker process keeps the last runner it opened, so consecutive shards of one artifact load it once;
* the stored reference stays on the driver: a task returns its shard's raw logits through Ray's
  object store, and the driver computes every metric once over all of them
  (`edge_convnext.evaluate.merge_shards`), which is why sharded numbers equal local ones exactly.

Each task reserves as many Ray CPUs as it runs runtime threads (``--threads``, default 1 with
``--ray``), so Ray never runs more threads than a node has cores. A task whose worker process dies
is retried ``retries`` times (Ray's ``max_retries``); after that its shard is an "error" result.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from edge_convnext.errors import EdgeConvNextError, MissingExtra, first_line
from edge_convnext.manifest import Manifest
from edge_convnext.progress import Progress
from edge_convnext.recipes import ArtifactFormat
from edge_convnext.runners import Runner, open_runner
from edge_convnext.shards import ProgressFn, Shard, ShardResult, ShardSettings, host_identity, run_shard

# Test-only fault injection: a directory; a file "once" in it makes one worker os._exit mid-shard
# (the file is renamed away by the worker that takes it), a file "always" makes every attempt exit.
TEST_EXIT_ENV = "EDGE_CONVNEXT_TEST_WORKER_EXIT"
LOCAL = "local"


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise MissingExtra("ray", "ray", "eval --ray") from None
    return ray


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Fail fast on a ``host:port`` nobody listens on: Ray itself retries such an address for minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "local", "auto" and other forms Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise EdgeConvNextError(f"--ray {address}: nothing answers there ({e}); give the head node's address "
                                "(`ray start --head` prints it), or no address to start a local cluster") from e


def _test_exit_hook() -> ProgressFn | None:
    where = os.environ.get(TEST_EXIT_ENV)
    if not where:
        return None

    def hook(done: int, failed: int) -> None:  # called after each batch: the worker dies mid-shard
        if (Path(where) / "always").exists():
            os._exit(17)
        try:
            os.rename(Path(where) / "once", Path(where) / "once.taken")  # atomic: exactly one worker wins
        except FileNotFoundError:
            return
        os._exit(17)

    return hook


# The last runner this worker process opened: consecutive shards of one artifact (the usual order, since
# shards are submitted artifact by artifact) skip the load (0.1 to 17 s per artifact, see bench). One
# entry only, so a worker holds one artifact's memory. Its sha256 is still checked on every shard.
_LAST_RUNNER: dict[tuple[str, str, int | None], Runner] = {}


def _open_last(path: Path, m: Manifest, threads: int | None) -> Runner:
    key = (str(path), m.sha256, threads)
    if key not in _LAST_RUNNER:
        _LAST_RUNNER.clear()
        _LAST_RUNNER[key] = open_runner(path, m, threads=threads)
    return _LAST_RUNNER[key]


def _task(shard: Shard, settings: ShardSettings) -> ShardResult:
    """Runs on a worker: the shared `run_shard`, images decoded there."""
    return run_shard(shard, settings, on_batch=_test_exit_hook(), opener=_open_last)


def _identity_task(fmt_key: str, threads: int | None) -> dict[str, Any]:
    return host_identity(next(f for f in ArtifactFormat if f.key == fmt_key), threads)


class RayExecutor:
    """Connects to the cluster at ``address`` (``"local"``: starts one here with ``num_cpus``) for its ``with`` block."""

    def __init__(self, address: str, num_cpus: int | None = None, retries: int = 3) -> None:
        self.ray = _import_ray()
        self.address = address
        self.num_cpus = num_cpus
        self.retries = retries
        self._started = False

    def __enter__(self) -> RayExecutor:
        ray = self.ray
        if not ray.is_initialized():
            _check_reachable(self.address)
            # A local cluster's workers get this process's PYTHONPATH (a checkout run without installing);
            # a remote cluster's workers have their own install, and paths of this machine mean nothing there.
            names = ("PYTHONPATH", TEST_EXIT_ENV) if self.address == LOCAL else (TEST_EXIT_ENV,)
            env = {k: os.environ[k] for k in names if os.environ.get(k)}
            kw: dict[str, Any] = {"num_cpus": self.num_cpus} if self.address == LOCAL else {}
            try:
                ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                         runtime_env={"env_vars": env} if env else None, **kw)
            except ConnectionError as e:
                raise EdgeConvNextError(f"--ray {self.address}: cannot connect to a Ray cluster ({first_line(e)}); "
                                        "give the head node's address (ray start --head prints it), or no address "
                                        "to start a local cluster") from e
            self._started = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._started:
            self.ray.shutdown()

    def max_node_cpus(self) -> int:
        return max(int(n.get("Resources", {}).get("CPU", 0)) for n in self.ray.nodes() if n.get("Alive"))

    def identity(self, fmt: ArtifactFormat, threads: int | None) -> dict[str, Any]:
        """Asked of a worker, not the driver: the driver may lack the runtime or run on another CPU."""
        task = self.ray.remote(num_cpus=0)(_identity_task)
        return dict(self.ray.get(task.remote(fmt.key, threads)))

    def run(self, shards: list[Shard], settings: ShardSettings) -> Iterator[tuple[int, ShardResult]]:
        threads = settings.threads or 1
        results = self.map(_task, [(s, settings) for s in shards], [len(s.samples) for s in shards], threads, "eval --ray")
        for i, r in results:
            if isinstance(r, Exception):  # the worker died on every attempt, or a bug
                r = ShardResult(status="error", reason=f"failed after {self.retries} retries: "
                                f"{type(r).__name__}: {first_line(r)}")
            yield i, r

    def map(self, fn: Callable[..., Any], calls: list[tuple[Any, ...]], images: list[int], threads: int,
            label: str) -> Iterator[tuple[int, Any]]:
        """``fn(*call)`` for each call as a Ray task of ``threads`` CPUs: (position, result or the RayError).

        ``images`` per call feed the progress line (shards done, images/s, ETA).
        """
        if not calls:
            return
        ray = self.ray
        if threads > self.max_node_cpus():
            raise EdgeConvNextError(f"--threads {threads}: no Ray node has that many CPUs ({self.max_node_cpus()} "
                                    "at most); a task reserves one CPU per runtime thread")
        task = ray.remote(num_cpus=threads, max_retries=self.retries)(fn)
        pending = {task.remote(*c): i for i, c in enumerate(calls)}
        with Progress(sum(images), f"{label}: 0/{len(calls)} shards", rate_unit="images") as progress:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    i = pending.pop(ref)
                    try:
                        r = ray.get(ref)
                    except ray.exceptions.RayError as e:
                        r = e
                    progress.label = f"{label}: {len(calls) - len(pending)}/{len(calls)} shards"
                    progress.advance(images[i], failed=len(getattr(r, "failed_ids", [])))  # unreadable images
                    yield i, r
