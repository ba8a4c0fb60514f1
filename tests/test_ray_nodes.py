"""A node of a multi-node Ray cluster dies mid-run: its actor restarts on another node, its shard is redone, and
the store comes out complete with every image once.

The cluster is real and multi-node on one machine (`ray.cluster_utils.Cluster`: a head and three worker nodes,
each its own raylet, in our own temp dir and ports); removing a node kills its raylet and every worker process on
it, as a lost machine or an evicted pod would. The cluster and its driver live in a subprocess: a Ray client's
native threads must not stay in the test process, whose later tests fork DataLoader workers. Stopped by
`cluster.shutdown()`, never `ray stop`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tree

from embedfit.storage import FeatureStore

pytestmark = [pytest.mark.slow, pytest.mark.ray]

_DRIVER = textwrap.dedent("""
    import json, os, socket, sys, threading, time
    from pathlib import Path

    import ray
    from ray.cluster_utils import Cluster

    from embedfit.extraction.ray import extract_ray

    tree, out, temp = sys.argv[1:4]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "gcs_server_port": port,
                                                            "temp_dir": f"{temp}/ray"})
    try:
        nodes = [cluster.add_node(num_cpus=1, temp_dir=f"{temp}/ray") for _ in range(3)]  # 2 actors, one spare
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {"EMBEDFIT_OFFLINE": "1"}})
        result = {}
        run = threading.Thread(target=lambda: result.update(summary=extract_ray(
            tree, out, num_workers=2, shard_size=4, batch_size=2)))
        run.start()
        shards = Path(f"{out}.shards")
        deadline = time.monotonic() + 240
        while not (shards.is_dir() and list(shards.glob("shard-*.h5"))) and time.monotonic() < deadline:
            time.sleep(0.02)
        # The node of a running actor (Ray's GCS actor table), taken down while the actors are mid-run.
        busy = {a["Address"]["NodeID"] for a in ray._private.state.actors().values()
                if a["ActorClassName"].endswith("_ShardWorker") and a["State"] == "ALIVE"}
        victim = next(n for n in nodes if n.node_id in busy)
        alive_at_kill = run.is_alive()
        cluster.remove_node(victim, allow_graceful=False)
        run.join(timeout=300)
        s = result["summary"]
        print(json.dumps({"alive_at_kill": alive_at_kill, "embedded": s.embedded, "failed": s.failed,
                          "complete": s.complete, "dead": sum(not n["Alive"] for n in ray.nodes())}))
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


def test_a_node_that_dies_mid_run_loses_nothing_and_duplicates_nothing(tmp_path: Path, short_tmp: Path) -> None:
    pytest.importorskip("ray")
    from embedfit.extraction.local import extract

    tree = write_tree(tmp_path / "images", per_class=80, seed=3)  # 240 images: the run outlasts the kill
    temp = str(short_tmp)  # short: Ray's socket paths have a length limit
    (Path(temp) / "ray").mkdir()
    out = tmp_path / "ray.h5"
    # RAY_TMPDIR: Ray's address file goes to $RAY_TMPDIR/ray, beside the sessions, never the user's.
    run = subprocess.run([sys.executable, "-c", _DRIVER, str(tree), str(out), temp], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "RAY_TMPDIR": temp, "RAY_ADDRESS": ""})
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["alive_at_kill"], "the run finished before the node could be killed: give it more images"
    assert (report["embedded"], report["failed"], report["complete"]) == (240, 0, True)
    assert report["dead"] == 1  # a node really died
    store = FeatureStore.open(out)
    assert len(store) == 240 and len(set(store.paths)) == 240 and store.n_ok == 240
    extract(tree, tmp_path / "local.h5", workers=0)
    local = FeatureStore.open(tmp_path / "local.h5")
    assert list(store.paths) == list(local.paths)
    np.testing.assert_allclose(store.features(), local.features(), rtol=1e-5, atol=1e-5)
