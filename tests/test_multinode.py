"""Many nodes, simulated on one machine: two torchrun launchers (`--nnodes 2`, one process each,
loopback, gloo) are two nodes. They end where one node of two processes ends; a node whose run
folder is its own disk stops every rank in one line; a rank killed after a checkpoint is named by
the survivor, a frozen one too (after --dist-timeout), and the run resumes; `--fsdp` over the
two nodes trains as one process does, `--fsdp hybrid` over them as `--fsdp` over four processes;
sharded checkpoints move between process counts and meshes; under
`--max-restarts 1` a killed worker restarts the job, which resumes from its last checkpoint by
itself and ends bit-identical to an uninterrupted run. Each launch runs once; the uninterrupted
run is shared."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT

FLAGS = ["--dataset", "synth:derm", "--batch-prompts", "2", "--group-size", "4", "--eval-dataset", "none",
         "--threads", "1", "--steps", "6", "--save-every", "2", "--device", "cpu"]
TRAIN = os.path.join(ROOT, "train.py")
LOSING_A_NODE = os.path.join(ROOT, "tests", "train_losing_a_node.py")  # train.py whose rank MEDLOC_TEST_KILL names dies


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cwd, out, nodes=1, node=0, procs=2, port=None, extra=(), env=None, restarts=0, flags=FLAGS):
    """One torchrun launcher (a node) running train.py (with MEDLOC_TEST_KILL in `env`, the same with a
    node that fails), started, not waited for."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--node-rank", str(node),
           "--nproc-per-node", str(procs), "--master-addr", "127.0.0.1", "--master-port", str(port or free_port()),
           "--max-restarts", str(restarts), LOSING_A_NODE if "MEDLOC_TEST_KILL" in (env or {}) else TRAIN, *flags, *extra] + (["--out", str(out)] if out else [])
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)


def two_nodes(tmp_path, out0, out1, extra=(), env=None):
    """Two launchers as two nodes, each in its own working directory; their processes."""
    port = free_port()
    return [launch(tmp_path / f"node{k}", out, nodes=2, node=k, procs=1, port=port, extra=extra, env=env)
            for k, out in enumerate((out0, out1))]


def finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def processes_of(run):
    """The pids whose command line names `run` (Linux /proc)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if str(run).encode() in f.read():
                    pids.append(int(pid))
        except OSError:
            continue
    return pids


def log(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if "seconds" not in k} for line in f]


def weights(run):
    with open(os.path.join(run, "final", "model.safetensors"), "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One node, two processes, never stopped: where every other launch must end."""
    out = tmp_path_factory.mktemp("one-node") / "run"
    rc, text = finish(launch(ROOT, out))
    assert rc == 0, text[-2000:]
    return out


@pytest.fixture()
def nodes(tmp_path):
    for k in (0, 1):
        (tmp_path / f"node{k}").mkdir()
    return tmp_path


def test_two_nodes_end_where_one_node_of_two_processes_ends(nodes, uninterrupted):
    shared = nodes / "shared"
    results = [finish(p) for p in two_nodes(nodes, shared, shared)]
    assert all(rc == 0 for rc, _ in results), results[0][1][-2000:] + results[1][1][-2000:]
    assert log(shared) == log(uninterrupted) and weights(shared) == weights(uninterrupted)


def test_fsdp_over_two_nodes_trains_as_one_process_does(nodes):
    """SFT, whose numbers do not depend on the process count: --fsdp split over two launchers'
    processes ends where one process ends."""
    import train
    sft = ["--algo", "sft", "--dataset", "synth:derm", "--batch-prompts", "4", "--eval-dataset", "none", "--threads", "1",
           "--steps", "3", "--save-every", "3", "--device", "cpu"]
    one, split = nodes / "one", nodes / "split"
    train.main(sft + ["--out", str(one)])
    port = free_port()
    launchers = [launch(nodes / f"node{k}", split, nodes=2, node=k, procs=1, port=port, flags=sft, extra=["--fsdp"])
                 for k in (0, 1)]  # both started before either is waited for
    results = [finish(p) for p in launchers]
    assert all(rc == 0 for rc, _ in results), "".join(text[-1500:] for _, text in results)
    for a, b in zip(log(split), log(one), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    from safetensors.torch import load_file
    x, y = (load_file(os.path.join(r, "final", "model.safetensors")) for r in (split, one))
    assert all(torch.allclose(x[k], y[k], atol=1e-6) for k in x)


def test_hybrid_sharding_over_two_nodes_ends_where_full_sharding_over_four_processes_ends(nodes):
    """--fsdp hybrid: each node's two processes split one copy (a 2-D mesh, replicate x shard), the
    two nodes' copies replicate; the same numbers as --fsdp over all four (the gradient norm that
    clipping uses counts each shard once, not once per copy)."""
    extra = ["--batch-prompts", "4", "--steps", "3", "--grad-clip", "0.5"]
    port, hybrid, full = free_port(), nodes / "hybrid", nodes / "full"
    launchers = [launch(nodes / f"node{k}", hybrid, nodes=2, node=k, procs=2, port=port, extra=extra + ["--fsdp", "hybrid"])
                 for k in (0, 1)]
    results = [finish(p) for p in launchers] + [finish(launch(ROOT, full, procs=4, extra=extra + ["--fsdp"]))]
    assert all(rc == 0 for rc, _ in results), "".join(text[-1500:] for _, text in results)
    for a, b in zip(log(hybrid), log(full), strict=True):
        assert a.keys() == b.keys()
        for k in ("loss", "kl", "grad_norm", "reward_mean", "tau"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-7), k
    from safetensors.torch import load_file
    x, y = (load_file(os.path.join(r, "final", "model.safetensors")) for r in (hybrid, full))
    assert all(torch.allclose(x[k], y[k], atol=1e-6) for k in x)


def test_a_node_that_cannot_see_the_run_folder_stops_every_rank_in_one_line(nodes):
    results = [finish(p) for p in two_nodes(nodes, "run", "run")]  # relative: each node's own folder
    for rc, text in results:
        assert rc != 0
        assert "error: rank 1 on " in text and "cannot see the run folder run" in text
        assert "must be on storage every node sees" in text
    assert not os.path.exists(nodes / "node0" / "run" / "config.json")  # stopped before the run began


def test_a_node_that_cannot_see_the_folder_it_resumes_stops_every_rank_in_one_line(nodes):
    import dataclasses
    from config import Config
    saved = Config(dataset="synth:derm", batch_prompts=2, group_size=4, eval_dataset="none", threads=1, steps=6,
                   save_every=2, device="cpu")  # what FLAGS say: the resume changes nothing
    os.makedirs(nodes / "node0" / "res")
    (nodes / "node0" / "res" / "config.json").write_text(json.dumps(dataclasses.asdict(saved)))
    results = [finish(p, timeout=120) for p in two_nodes(nodes, None, None, extra=["--resume", "res"])]
    for rc, text in results:  # node 1 has no res/: both nodes stop with its line, neither hangs nor prints a traceback
        assert rc != 0 and "start.py\", line" not in text and "dist.py\", line" not in text, text[-1500:]
        assert "error: rank 1 on " in text and ("--resume res: this rank's host cannot see the run folder that rank 0 "
                                                "sees (no config.json there): every node needs the run folder on the "
                                                "same shared storage (docs/clusters.md)") in text
    assert os.listdir(nodes / "node0" / "res") == ["config.json"]  # nothing began


def test_a_killed_rank_is_named_by_the_survivor_and_the_run_resumes(nodes, uninterrupted):
    shared = nodes / "shared"
    node0, node1 = two_nodes(nodes, shared, shared, env={"MEDLOC_TEST_KILL": "2:1"})
    rc, text = finish(node0)
    finish(node1)
    assert rc == 1 and "error: rank 0: rank 1 of this job stopped" in text and "last checkpoint: checkpoint-000002" in text
    rc, text = finish(launch(ROOT, shared, extra=["--resume", str(shared)]))  # both ranks on one node now
    assert rc == 0, text[-2000:]
    assert log(shared) == log(uninterrupted) and weights(shared) == weights(uninterrupted)


def test_a_frozen_rank_is_named_once_the_dist_timeout_has_passed(nodes):
    shared = nodes / "shared"
    node0, node1 = two_nodes(nodes, shared, shared, extra=["--dist-timeout", "10"], env={"MEDLOC_TEST_KILL": "2:1:STOP"})
    try:
        t0 = time.time()
        while not (shared / "checkpoint-000002").exists() and time.time() - t0 < 300:
            time.sleep(0.2)
        frozen = time.time()  # rank 1 stops after this checkpoint: from here rank 0 waits out the timeout
        rc, text = finish(node0, timeout=300)
        waited = time.time() - frozen
    finally:  # the frozen worker runs in a session of its own (torchrun's): found by its run folder
        os.killpg(node1.pid, signal.SIGKILL)
        for pid in processes_of(shared):
            os.kill(pid, signal.SIGKILL)
        finish(node1)
    assert rc == 1 and "error: rank 0: rank 1 of this job stopped" in text and "Timed out" in text
    assert waited < 10 + 60, waited  # the 10 s timeout and the way out, on a busy machine; not torch's 600 s default


def test_an_elastic_restart_resumes_by_itself_and_ends_as_if_never_stopped(tmp_path, uninterrupted):
    out = tmp_path / "run"
    rc, text = finish(launch(ROOT, out, restarts=1, env={"MEDLOC_TEST_KILL": "4:1"}))
    assert rc == 0, text[-2000:]
    assert f"resumed {out} at step 4" in text  # the restarted workers, with no flag added
    assert log(out) == log(uninterrupted) and weights(out) == weights(uninterrupted)


def c10d_nodes(tmp_path, out, env, restarts=1):
    """Two launchers as two nodes under c10d (elastic) rendezvous, one process each; their processes."""
    port = free_port()
    cmd = lambda k: [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",  # noqa: E731
                     "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "medloc",
                     "--max-restarts", str(restarts), LOSING_A_NODE, *FLAGS, "--out", str(out)]
    return [subprocess.Popen(cmd(k), cwd=tmp_path / f"node{k}", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, **env}, start_new_session=True) for k in (0, 1)]


def test_rank_0_killed_after_a_checkpoint_under_c10d_restarts_ends_bit_identical(nodes, uninterrupted):
    """torchrun counts a restart only on the node whose worker died: the ranks must still agree to
    resume (dist.join counts the attempt in the store), or one resumes at step 2 while the other
    starts afresh and the run never ends (3 of 4 tries hung before the attempt was counted in the
    store; once since, as the suite's time is finite: the count leaves no race to repeat for)."""
    out = nodes / "shared"
    results = [finish(p, timeout=150) for p in c10d_nodes(nodes, out, {"MEDLOC_TEST_KILL": "2:0"})]
    assert all(rc == 0 for rc, _ in results), "".join(text[-1500:] for _, text in results)
    assert any(f"resumed {out} at step 2" in text for _, text in results)
    assert log(out) == log(uninterrupted) and weights(out) == weights(uninterrupted)


def test_sharded_checkpoints_of_four_processes_resume_in_two_in_one_and_on_another_mesh(tmp_path, capsys):
    """--checkpoint sharded: each of 4 --fsdp processes writes its own shards; copies of the run
    resume in 2 processes, in 1 and in 4 under --fsdp hybrid, and each ends where one process's
    uninterrupted run ends (SFT: the same numbers under any process count). A damaged newer
    checkpoint is skipped, a half-written one (.tmp) never looked at; final/ is streamed unit by unit."""
    import shutil
    import train
    from model import load_vlm
    sft = ["--algo", "sft", "--dataset", "synth:derm", "--batch-prompts", "4", "--eval-dataset", "none", "--threads", "1",
           "--save-every", "2", "--device", "cpu"]
    straight = tmp_path / "straight"
    train.main(sft + ["--steps", "4", "--out", str(straight)])
    four = tmp_path / "four"
    rc, text = finish(launch(ROOT, four, procs=4, flags=sft, extra=["--steps", "2", "--fsdp", "--checkpoint", "sharded"]))
    assert rc == 0, text[-2000:]
    shards = four / "checkpoint-000002" / "sharded"
    assert sorted(f for f in os.listdir(shards) if f.endswith(".distcp")) == [f"__{r}_0.distcp" for r in range(4)]
    assert not any(f.endswith(".safetensors") for f in os.listdir(four / "checkpoint-000002" / "model"))
    copies = {k: tmp_path / k for k in ("two", "one", "mesh")}
    for folder in copies.values():
        shutil.copytree(four, folder)
    damaged = copies["one"] / "checkpoint-000003"  # newer than the intact one, a shard cut short
    shutil.copytree(copies["one"] / "checkpoint-000002", damaged)
    with open(damaged / "sharded" / "__1_0.distcp", "r+b") as f:
        f.truncate(100)
    shutil.copytree(copies["one"] / "checkpoint-000002", copies["one"] / "checkpoint-000004.tmp")  # a write cut off
    runs = [launch(ROOT, None, procs=2, flags=["--resume", str(copies["two"]), "--steps", "4", "--fsdp"]),
            launch(ROOT, None, procs=4, flags=["--resume", str(copies["mesh"]), "--steps", "4", "--fsdp", "hybrid",
                                               "--shard-size", "2"])]
    results = [finish(p) for p in runs]
    assert all(rc == 0 for rc, _ in results), "".join(text[-1500:] for _, text in results)
    capsys.readouterr()
    train.main(["--resume", str(copies["one"]), "--steps", "4"])
    said = capsys.readouterr().out
    assert f"skipping a damaged checkpoint: {damaged / 'sharded' / '__1_0.distcp'}: cut short" in said
    assert f"resumed {copies['one']} at step 2" in said
    assert not (copies["one"] / "checkpoint-000004.tmp").exists()
    expected = load_vlm(str(straight / "final")).model.state_dict()
    for name, folder in copies.items():
        for a, b in zip(log(folder), log(straight), strict=True):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), name
        got = load_vlm(str(folder / "final")).model.state_dict()
        assert all(torch.allclose(got[k], expected[k], atol=1e-6) for k in expected), name
    assert (copies["mesh"] / "final" / "model.safetensors.index.json").exists()  # streamed, not gathered whole


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a GPU")
def test_device_cuda_without_a_gpu_stops_every_rank_in_one_line_before_a_process_group(tmp_path):
    rc, text = finish(launch(tmp_path, tmp_path / "run", extra=["--device", "cuda"]), timeout=120)
    assert rc != 0
    assert "ProcessGroupNCCL" not in text and "start.py\", line" not in text and "dist.py\", line" not in text, text[-1500:]
    said = [line for line in text.splitlines() if line.startswith("error: ")]
    assert said == ["error: rank 0 on " + socket.gethostname() + " (and 1 other rank(s)): --device cuda: CUDA is not "
                    "available on this machine (use --device cpu)"] * 2
    assert not os.path.exists(tmp_path / "run")
