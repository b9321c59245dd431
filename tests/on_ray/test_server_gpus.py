"""runtime.server_gpus: the Server actor holds a GPU share on the driver's node, where GFMFR's
group fusion model trains, and the pools are planned on the cluster's other GPUs. On this CPU
machine the node declares a GPU it does not have: Ray schedules by the declared resources, so the
test sees the Server given GPU 0 and the pools planned without it (torch, seeing no CUDA device,
still computes on the CPU)."""

import pytest
import ray
from ray.cluster_utils import Cluster

from pipeline.config import load_config
from pipeline.data.datasets import data_root
from pipeline.federated.runtime.placement import plan_pools
from pipeline.federated.runtime.server import pool_resources

KU = ["data.name=ku", "model.dim=16", "model.backbone=fcf", "train.local_epochs=1", "train.participation=0.5",
      "train.eval_ks=[10, 50]", "runtime.backend=ray", "runtime.pools=1", "runtime.progress=false",
      "runtime.tensorboard=false",
      "model.gfmfr={group_num: 3, server_epochs: 2, group_emb_dim: 32, server_batch: 512}"]


@pytest.mark.parametrize("extra, reason", [
    (["model.gfmfr=null"], "model.gfmfr is not set"),
    (["runtime.backend=local"], "runtime.backend=local"),
    (["runtime.device=cpu"], "runtime.device=cpu keeps the server on the CPU"),
])
def test_a_server_gpu_share_that_would_do_nothing_is_refused(extra, reason):
    with pytest.raises(ValueError, match=reason):
        load_config(None, [*KU, "runtime.server_gpus=0.5", *extra])


def test_the_pools_are_planned_on_the_gpus_the_server_leaves():
    runtime = load_config(None, [*KU, "runtime.pools=null", "runtime.server_gpus=0.5"]).runtime
    cluster = {"CPU": 8.0, "GPU": 2.0}
    assert pool_resources(cluster, runtime) == {"CPU": 8.0, "GPU": 1.5}
    assert cluster["GPU"] == 2.0  # not changed in place
    plan = plan_pools(pool_resources(cluster, runtime), runtime)
    assert plan.pools == 1 and plan.gpus_per_pool == 1.0  # 1.5 GPUs left: one whole GPU for one pool
    untouched = load_config(None, [*KU, "runtime.pools=null"]).runtime
    assert pool_resources(cluster, untouched) == cluster


@pytest.fixture(scope="module")
def declared_gpu():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 1, "include_dashboard": False})
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.skipif(not (data_root() / "ku").is_dir(), reason="KU data not available")
def test_the_server_actor_holds_its_gpu_share_and_a_share_it_cannot_get_is_refused(declared_gpu, tmp_path):
    from pipeline.federated.runtime.run import train

    config = load_config(None, [*KU, "train.rounds=2", "runtime.server_gpus=0.5", f"runtime.out={tmp_path / 'run'}"])
    summary = train(config, quiet=True)
    assert summary["server"]["gpu_ids"] == ["0"]  # Ray gave the Server the node's GPU
    assert summary["server"]["device"] == "cpu"   # torch sees no CUDA device on this machine
    assert summary["rounds_run"] == 2 and summary["pools"] == 1

    too_many = load_config(None, [*KU, "train.rounds=1", "runtime.server_gpus=2", f"runtime.out={tmp_path / 'no'}"])
    with pytest.raises(ValueError, match=r"the driver's node, where the Server lives, has 1 GPU"):
        train(too_many, quiet=True)
    assert not (tmp_path / "no").exists()  # refused before anything was written
