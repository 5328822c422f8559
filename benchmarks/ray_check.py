"""Check ``tinyprop bench --ray`` against real Ray clusters on this machine (about 3 minutes).

1. ``--ray local`` while another Ray cluster runs here (its address in ``RAY_ADDRESS``, as a
   user's own ``ray start`` would leave it): the sweep starts a private instance, and the other
   cluster's job table shows that no driver of the sweep attached to it.
2. ``--ray HOST:PORT`` on a cluster started with ``ray start --head --num-cpus 2`` (two worker
   processes) with token authentication: records equal to a local run of the same runs except
   the timings; written only where the driver said (a relative ``--results``, from another
   folder than the workers'); the pretrained weights in the driver's ``TINYPROP_CACHE``.
   Without the token the same command fails in one line.
3. An address where nothing listens, and one that accepts connections but never answers: one
   line each, timed.

Every Ray process here is started by this script (``ray start --block``, stopped by its own
process id) under a private HOME and temp folder, so no other Ray instance or token is touched.

    python benchmarks/ray_check.py --out benchmarks/results/ray_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BIN = Path(sys.executable).parent
TIMINGS = {"wall_s", "train_wall_s"}
SWEEP = ["--suite", "tiny", "--protocol", "finetune", "--datasets", "tiny-blobs"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_cluster(root: Path, name: str, cpus: int, env: dict) -> tuple[subprocess.Popen, str]:
    """``ray start --head --block`` in its own temp folder; returns the process and address."""
    port = free_port()
    temp = root / f"ray-{name}"
    command = [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}",
               f"--num-cpus={cpus}", f"--temp-dir={temp}", "--include-dashboard=false",
               "--disable-usage-stats"]  # fmt: skip
    log = open(root / f"ray-{name}.log", "w")  # noqa: SIM115 (closed with the process)
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    address = f"{socket.gethostbyname(socket.gethostname())}:{port}"
    for _ in range(120):
        if (temp / "ray_current_cluster").is_file():
            address = (temp / "ray_current_cluster").read_text().strip() or address
            break
        time.sleep(0.5)
    time.sleep(3)
    return process, address


def stop(process: subprocess.Popen) -> None:
    process.terminate()  # ray start --block stops the processes it started
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


def bench(args: list[str], env: dict, cwd: Path, timeout: float = 900) -> dict:
    start = time.perf_counter()
    run = subprocess.run([str(BIN / "tinyprop"), "bench", *args], env=env, cwd=cwd,
                         capture_output=True, text=True, timeout=timeout)  # fmt: skip
    return {"returncode": run.returncode, "seconds": round(time.perf_counter() - start, 1),
            "stdout": run.stdout, "stderr": run.stderr}  # fmt: skip


def records(folder: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def differences(first: dict, second: dict) -> dict[str, list[str]]:
    """Per record, the fields that differ (timings left out)."""
    out = {}
    for name in sorted(set(first) | set(second)):
        a, b = first.get(name, {}), second.get(name, {})
        out[name] = sorted(k for k in set(a) | set(b) if k not in TIMINGS and a.get(k) != b.get(k))
    return out


def job_count(address: str, env: dict) -> int:
    """Drivers (jobs) the cluster at ``address`` has seen, the asking one included."""
    code = (f"import ray, ray._private.state as s; ray.init(address={address!r}, "
            "log_to_driver=False); print(len(s.jobs()))")  # fmt: skip
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    return int(run.stdout.strip().splitlines()[-1]) if run.returncode == 0 else -1


def silent_listener() -> tuple[socket.socket, int]:
    """A TCP port on 127.0.0.1 that accepts connections and never says anything."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []
    threading.Thread(target=lambda: [held.append(server.accept()) for _ in range(64)],
                     daemon=True).start()  # fmt: skip
    return server, server.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ray_check.json"))
    out = parser.parse_args().out.resolve()
    root = Path(tempfile.mkdtemp(prefix="tinyprop-ray-check-"))
    (root / "home").mkdir()
    base = {**os.environ, "HOME": str(root / "home"), "TINYPROP_CACHE": str(root / "cache"),
            "RAY_USAGE_STATS_ENABLED": "0"}  # fmt: skip
    base.pop("RAY_ADDRESS", None)
    result: dict = {}
    (root / "driver").mkdir()

    # the reference: the same runs, locally
    result["local"] = bench([*SWEEP, "--results", str(root / "local")], base, root / "driver")
    local = records(root / "local")

    # 1. --ray local beside another cluster
    other, other_address = start_cluster(root, "other", 1, {**base, "RAY_AUTH_MODE": "disabled"})
    try:
        env = {**base, "RAY_ADDRESS": other_address, "RAY_AUTH_MODE": "disabled"}
        before = job_count(other_address, env)
        run = bench([*SWEEP, "--results", str(root / "private"), "--ray", "local"], env,
                    root / "driver")  # fmt: skip
        after = job_count(other_address, env)
        result["ray_local_beside_other_cluster"] = {
            "other_cluster": other_address, "RAY_ADDRESS": other_address,
            "other_cluster_jobs_before": before, "other_cluster_jobs_after": after,
            "sweep_jobs_on_other_cluster": after - before - 1,  # the second count's own driver
            "started_private_instance": "Started a local Ray instance" in run["stderr"],
            "returncode": run["returncode"], "seconds": run["seconds"],
            "differences_to_local": differences(local, records(root / "private")),
        }  # fmt: skip
    finally:
        stop(other)

    # 2. --ray ADDRESS on a `ray start --head` cluster with two workers and token authentication
    token = root / "token"
    token.write_text(os.urandom(16).hex())
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    cluster, address = start_cluster(root, "cluster", 2, {**base, **auth})
    try:
        run = bench([*SWEEP, "--results", "relative/results", "--ray", address],
                    {**base, **auth}, root / "driver")  # fmt: skip
        written = records(root / "driver" / "relative" / "results")
        expected = (root / "driver" / "relative" / "results", root / "local", root / "private")
        stray = [str(p.relative_to(root)) for p in root.rglob("finetune__*.json")
                 if p.parent not in expected]  # fmt: skip
        result["ray_address"] = {
            "address": address, "num_cpus": 2, "auth": "token",
            "returncode": run["returncode"], "seconds": run["seconds"],
            "records": len(written), "differences_to_local": differences(local, written),
            "attempts": sorted({r.get("attempts") for r in written.values()}),
            "stray_result_files": stray,
            "pretrained_in_driver_cache": len(list((root / "cache" / "pretrained").glob("*.pt"))),
        }  # fmt: skip
        no_token = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"}
        run = bench([*SWEEP, "--results", str(root / "denied"), "--ray", address], no_token,
                    root / "driver", timeout=120)  # fmt: skip
        result["ray_address_wrong_token"] = {
            "returncode": run["returncode"], "seconds": run["seconds"],
            "stderr_last_line": run["stderr"].strip().splitlines()[-1:],
        }  # fmt: skip
    finally:
        stop(cluster)

    # 3. nobody there; a port that never answers
    closed = free_port()
    run = bench([*SWEEP, "--results", str(root / "x"), "--ray", f"127.0.0.1:{closed}"], base,
                root / "driver", timeout=120)  # fmt: skip
    result["unreachable"] = {"returncode": run["returncode"], "seconds": run["seconds"],
                             "stderr": run["stderr"].strip().splitlines()}  # fmt: skip
    server, port = silent_listener()
    run = bench([*SWEEP, "--results", str(root / "y"), "--ray", f"127.0.0.1:{port}"], base,
                root / "driver", timeout=120)  # fmt: skip
    server.close()
    result["silent"] = {"returncode": run["returncode"], "seconds": run["seconds"],
                        "stderr_last_line": run["stderr"].strip().splitlines()[-1:]}  # fmt: skip
    for key in ("local",):
        result[key] = {k: v for k, v in result[key].items() if k in ("returncode", "seconds")}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
