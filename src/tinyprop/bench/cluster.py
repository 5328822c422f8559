"""Benchmark runs as Ray tasks, on a private local Ray instance or on a running cluster.

- ``local`` starts a Ray instance for this sweep alone (``ray.init(address="local")``) and
  stops it at the end: it never attaches to a cluster that already runs on the machine.
- ``HOST:PORT`` (a cluster started with ``ray start --head``) or ``ray://HOST:PORT`` (Ray
  Client) connects with a ``runtime_env`` that carries the driver's tinyprop code (the package
  folder, uploaded as a ``py_module``) and its ``TINYPROP_*`` variables with absolute paths
  (``TINYPROP_CACHE`` above all), so the workers run this code and cache where the driver says.
  An address that does not answer within ``timeout`` seconds is one line and exit code 2.
- Tasks return their records; only the driver writes them, into its own results folder.
- A failed task is submitted again up to ``retries`` times; every record says how many attempts
  it took and what the failed ones raised (``attempts``, ``retried_errors``).

Ray Tune is not used: the sweep is a fixed grid whose every run must finish (a policy's setting
is chosen afterwards from the final validation metrics of all seeds, so stopping a setting early
would change that choice), and resuming is already one JSON record per finished run.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
from pathlib import Path

from tqdm import tqdm

import tinyprop
from tinyprop.bench import store
from tinyprop.extras import require

CONNECT_TIMEOUT_S = 10.0
ENV_PATHS = ("TINYPROP_CACHE", "TINYPROP_DATA")  # made absolute for the workers
ENV_PREFIX = "TINYPROP_"


class RayConnectionError(RuntimeError):
    """The Ray cluster could not be reached or refused the connection (one-line message)."""


def runtime_env(address: str) -> dict:
    """What every task gets: the ``TINYPROP_*`` variables of the driver (paths absolute, the
    cache always set) and, on a cluster, the driver's tinyprop package as a ``py_module``."""
    from tinyprop.data.cache import cache_dir

    env_vars = {name: value for name, value in os.environ.items() if name.startswith(ENV_PREFIX)}
    env_vars["TINYPROP_CACHE"] = str(cache_dir())
    for name in ENV_PATHS:
        if env_vars.get(name):
            env_vars[name] = str(Path(env_vars[name]).expanduser().resolve())
    env: dict = {"env_vars": env_vars}
    if address != "local":  # a local instance runs this very interpreter and package
        env["py_modules"] = [str(Path(tinyprop.__file__).resolve().parent)]
    return env


def split_address(address: str) -> tuple[str, int]:
    """``(host, port)`` of ``HOST:PORT`` or ``ray://HOST:PORT``; a clear error otherwise."""
    bare = address.removeprefix("ray://")
    host, _, port = bare.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RayConnectionError(
            f"--ray {address!r} is not an address: use 'local' (a private Ray instance here), "
            "HOST:PORT of a cluster started with `ray start --head`, or ray://HOST:PORT"
        )
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout: float) -> None:
    """Fail fast, in one line, when nothing listens at ``address`` (Ray itself would retry for
    minutes)."""
    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise RayConnectionError(
            f"no Ray cluster answers at {address} ({reason}); start one with `ray start --head` "
            "or check the address"
        ) from None


def _give_up(address: str, timeout: float, stderr: int, log: Path) -> None:
    """Called when connecting takes longer than ``timeout``: Ray cannot be interrupted while it
    waits for its control service, so print the one line and end the process."""
    line = (
        f"tinyprop bench: no answer from the Ray cluster at {address} within {timeout:g} s (is "
        "it a Ray head node? with token authentication, set RAY_AUTH_MODE=token and the "
        f"cluster's token: see docs/ray.md; Ray's messages are in {log})\n"
    )
    os.write(stderr, line.encode())
    os._exit(2)


def connect(address: str, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Start or join Ray for a sweep. Returns True when this call started Ray (then the caller
    shuts it down at the end); False when Ray was already running in this process."""
    ray = require("ray", "bench", "drop --ray to run the runs one after another here")
    if ray.is_initialized():
        return False
    env = runtime_env(address)
    if address == "local":
        ray.init(address="local", include_dashboard=False, runtime_env=env)
        return True
    check_reachable(address, timeout)
    # Ray prints a message for every retry while it connects: they go to a file, so that a
    # failure is the one line below (the file is named in it)
    log = Path(tempfile.gettempdir()) / f"tinyprop-ray-connect-{os.getpid()}.log"
    stderr = os.dup(2)
    with open(log, "w") as handle:
        os.dup2(handle.fileno(), 2)
    watchdog = threading.Timer(timeout, _give_up, (address, timeout, stderr, log))
    watchdog.daemon = True
    watchdog.start()
    try:
        ray.init(address=address, runtime_env=env, logging_level=logging.WARNING)
    except Exception as error:  # Ray raises ConnectionError, RuntimeError, AuthenticationError
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        hint = ""
        if "auth" in str(error).lower() or "token" in str(error).lower():
            hint = "; the cluster uses token authentication: set RAY_AUTH_MODE=token and "
            hint += "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to its token, see docs/ray.md"
        raise RayConnectionError(f"connecting to Ray at {address} failed: {first}{hint}") from None
    else:
        log.unlink(missing_ok=True)
    finally:
        watchdog.cancel()
        os.dup2(stderr, 2)
        os.close(stderr)
    return True


def _one_line(error: BaseException) -> str:
    """The last line of an error's text (Ray wraps a task's traceback in its own)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def run_ray(runs: list, address: str = "local", retries: int = 2,
            timeout: float = CONNECT_TIMEOUT_S) -> list[str]:  # fmt: skip
    """Run each run as a Ray task (one CPU each); only this process writes the records.

    Pretraining is one task per (dataset, seed) whose weights reach the run tasks through the
    object store. A task that fails (an exception, a worker or node lost) is submitted again,
    at most ``retries`` times, with a fresh pretraining task when that one failed.

    Args:
        runs: the :class:`~tinyprop.bench.runner.RunSpec` to run.
        address: ``"local"`` (a private instance), ``HOST:PORT`` or ``ray://HOST:PORT``;
            ignored when Ray is already initialised in this process.
        retries: how often a failed run is tried again.
        timeout: seconds to wait for the cluster before giving up.

    Returns:
        Titles of the runs that failed every attempt.
    """
    from tinyprop.bench.runner import execute_run, pretrained_state

    started = connect(address, timeout)
    ray = require("ray", "bench", "drop --ray to run the runs one after another here")
    try:
        pretrain_task = ray.remote(num_cpus=1, max_retries=0)(pretrained_state)
        run_task = ray.remote(num_cpus=1, max_retries=0)(execute_run)
        pretrained: dict[tuple[str, int], object] = {}

        def submit(spec):
            key = (spec.dataset, spec.seed)
            if spec.protocol == "finetune" and key not in pretrained:
                pretrained[key] = pretrain_task.remote(spec)
            return run_task.remote(spec, pretrained.get(key), False)

        pending = {submit(spec): spec for spec in runs}
        attempts = {spec.path: 1 for spec in runs}
        errors: dict[Path, list[str]] = {spec.path: [] for spec in runs}
        failures = []
        with tqdm(total=len(pending), unit="run", dynamic_ncols=True) as bar:
            while pending:
                (done,), _ = ray.wait(list(pending), num_returns=1)
                spec = pending.pop(done)
                try:
                    record = ray.get(done)
                except Exception as error:
                    errors[spec.path].append(_one_line(error))
                    if attempts[spec.path] > retries:
                        failures.append(spec.title)
                        tqdm.write(f"run {spec.title} failed {attempts[spec.path]} times: "
                                   f"{errors[spec.path][-1]}")  # fmt: skip
                        bar.update(1)
                        continue
                    attempts[spec.path] += 1
                    key = (spec.dataset, spec.seed)
                    if key in pretrained and _failed(ray, pretrained[key]):
                        del pretrained[key]  # pretraining failed: the retry redoes it
                    tqdm.write(f"run {spec.title} failed ({errors[spec.path][-1]}); attempt "
                               f"{attempts[spec.path]} of {retries + 1}")  # fmt: skip
                    pending[submit(spec)] = spec
                    continue
                record["attempts"] = attempts[spec.path]
                record["retried_errors"] = errors[spec.path]
                store.write_record(spec.path, record)
                bar.set_postfix_str(f"{spec.title}: {record['metric_name']} {record['metric']:.1f}")
                bar.update(1)
        return failures
    finally:
        if started:
            ray.shutdown()


def _failed(ray, reference) -> bool:
    """Whether a finished object reference holds an error."""
    ready, _ = ray.wait([reference], timeout=0)
    if not ready:
        return False
    try:
        ray.get(reference)
    except Exception:
        return True
    return False
