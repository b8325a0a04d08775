"""cluster/ and jobs/: the cluster-launcher YAML, the Serve configs and the runtime envs pass Ray's own schemas; the
KubeRay manifests (whose CRDs are not installed here) agree with each other and with the config they run (GPUs per
engine = tensor parallel size, shared run folder, shared model cache and credentials on every pod that runs Ray
work, ...), and their node groups are what preflight reads for `cluster.manifest` (tests/test_preflight.py)."""

import copy
import fnmatch
import re
import shlex
from pathlib import PurePosixPath

import pytest
import yaml
from conftest import REPO

from llambert_ray.config_load import load_config

KUBERAY = REPO / "cluster" / "kuberay"
CFG_70B = load_config(REPO / "configs" / "imdb-llama2-70b.yaml")


def _load(name):
    return yaml.safe_load((KUBERAY / name).read_text())


def _groups(spec):
    return {g["groupName"]: g for g in spec["workerGroupSpecs"]}


def _limits(group):
    return group["template"]["spec"]["containers"][0]["resources"]["limits"]


def _pods(spec):
    """(group name, pod spec) of the head and every worker group of a RayCluster spec."""
    yield "head", spec["headGroupSpec"]["template"]["spec"]
    for g in spec["workerGroupSpecs"]:
        yield g["groupName"], g["template"]["spec"]


def _env(pod):
    return {e["name"]: e for e in pod["containers"][0].get("env", [])}


def _mounts(pod):
    return [m["mountPath"] for m in pod["containers"][0].get("volumeMounts", [])]


def _claims(pod):
    return {v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}


def _on_a_mount(path, pod):
    return any(PurePosixPath(path).is_relative_to(m) for m in _mounts(pod) if m != "/dev/shm")


RUNTIME_ENV = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())


def test_rayjob_runs_on_the_cluster_of_raycluster_yaml_and_a_real_entrypoint():
    job, cluster = _load("rayjob.yaml"), _load("raycluster.yaml")
    # one cluster spec: the RayJob selects raycluster.yaml's cluster by name (KubeRay reads only ray.io/cluster)
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert "rayClusterSpec" not in job["spec"]
    # what KubeRay's validation refuses with a clusterSelector, and what it ignores there (it never deletes a
    # cluster it did not create, so a shutdown or TTL setting would only mislead)
    assert not job["spec"].get("suspend") and job["spec"].get("submissionMode") != "SidecarMode"
    assert job["spec"].get("backoffLimit", 0) <= 0
    assert not {"shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "deletionStrategy"} & set(job["spec"])
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python"
    for arg in argv[1:]:
        if arg.startswith("/home/ray/llambert-ray/"):  # where cluster/Dockerfile copies the repo
            assert (REPO / arg.removeprefix("/home/ray/llambert-ray/")).exists(), arg
    from ray.runtime_env import RuntimeEnv

    # the RayJob runs with the same runtime_env as `make submit` on the project's image
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"]) == RUNTIME_ENV
    for f in ["runtime_env.yaml", "runtime_env-cpu.yaml", "runtime_env-stock-ray.yaml"]:
        RuntimeEnv(**yaml.safe_load((REPO / "jobs" / f).read_text()))


def test_default_runtime_env_installs_nothing_and_the_stock_image_one_pins_the_projects_versions():
    # the project's image has every package; pip per job would reinstall vLLM + DeepSpeed on every node
    assert set(RUNTIME_ENV) == {"env_vars"}, RUNTIME_ENV
    env = RUNTIME_ENV["env_vars"]
    assert env["HF_HOME"].startswith("/mnt/shared/") and env["LLAMBERT_CACHE"].startswith("/mnt/shared/")
    assert "HF_TOKEN" not in env  # a runtime_env is shown in the dashboard; the token comes from the pods' env
    stock = yaml.safe_load((REPO / "jobs" / "runtime_env-stock-ray.yaml").read_text())
    assert stock["env_vars"] == env
    image = _image_requirements()
    for pin in [p for p in stock["pip"] if "==" in p]:
        assert pin in image, f"{pin} in runtime_env-stock-ray.yaml but not in cluster/Dockerfile's packages"
    assert {p.split("==")[0] for p in stock["pip"]} >= {"vllm", "deepspeed", "transformers"}


def test_every_ray_pod_gets_the_token_and_the_shared_caches():
    """Ray Data's tokenizer stages and the job driver run on the cpu / train-1gpu groups and load the (gated)
    tokenizer there, so every group, not only the engines', gets HF_TOKEN; every one reads the one HF cache on
    the shared volume, the cache that model-mirror.yaml fills, so weights are downloaded once per volume."""
    spec = _load("raycluster.yaml")["spec"]
    mirror = yaml.safe_load((KUBERAY / "model-mirror.yaml").read_text())["spec"]["template"]["spec"]
    for name, pod in [*_pods(spec), ("model-mirror", mirror)]:
        env = _env(pod)
        assert env.get("HF_TOKEN", {}).get("valueFrom") == {"secretKeyRef": {"name": "hf-token", "key": "token",
                                                                             "optional": True}}, name
        for key in ["HF_HOME", "LLAMBERT_CACHE"]:
            assert env.get(key, {}).get("value") == RUNTIME_ENV["env_vars"][key], (name, key)
            assert _on_a_mount(env[key]["value"], pod), f"{name}: {key} is not on a mounted volume"
        assert _claims(pod) == {"llambert-shared"}, name
        # object storage: the pod identity (IRSA / Workload Identity) or static keys from an optional secret
        assert pod["serviceAccountName"] == "llambert", name
        assert {"secretRef": {"name": "object-store-credentials", "optional": True}} in pod["containers"][0]["envFrom"]
        res = pod["containers"][0]["resources"]
        assert "ephemeral-storage" in res["requests"] and "ephemeral-storage" in res["limits"], name
    prereqs = {d["kind"]: d for d in yaml.safe_load_all((KUBERAY / "prereqs.yaml").read_text())}
    assert prereqs["ServiceAccount"]["metadata"]["name"] == "llambert"
    assert prereqs["PersistentVolumeClaim"]["metadata"]["name"] == "llambert-shared"
    assert prereqs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_model_mirror_pulls_the_model_the_70b_config_annotates_with():
    job = yaml.safe_load((KUBERAY / "model-mirror.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in {"Never", "OnFailure"}
    assert pod["containers"][0]["command"] == ["llambert", "models", "pull", CFG_70B.annotate.model]


def test_model_mirror_command_exists_in_the_cli():
    """The Job's command line is this CLI's `models pull`: `llambert` is the project's console script for the app,
    and the Job's arguments parse (without running it) to the model to pull, nothing else needed."""
    import tomllib
    import typer
    from typer.testing import CliRunner

    from llambert_ray.cli import app

    job = yaml.safe_load((KUBERAY / "model-mirror.yaml").read_text())
    argv = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"][argv[0]] == "llambert_ray.cli:app"
    assert argv[1:3] == ["models", "pull"]
    pull = typer.main.get_command(app).commands["models"].commands["pull"]
    assert pull.make_context("pull", argv[3:]).params == {"ref": CFG_70B.annotate.model, "to": None}
    res = CliRunner().invoke(app, ["models", "pull", "--help"])
    assert res.exit_code == 0, res.output
    # the model is the required argument of its Arguments panel, documented as a hub id
    assert re.search(r"^╭─ Arguments ─.*\n│ \*\s+ref\s+<str>\s+hub id \(", res.output, re.M), res.output


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayservice.yaml"])
def test_each_group_carries_a_ray_node_label_naming_it(name):
    from ray._private.label_utils import validate_node_label_syntax

    doc = _load(name)
    spec = doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig") or doc["spec"]
    assert spec["headGroupSpec"]["labels"] == {"llambert/group": "head"}
    for g in spec["workerGroupSpecs"]:
        assert g["labels"]["llambert/group"] == g["groupName"]
        validate_node_label_syntax(g["labels"])  # Ray's own check, as `ray start --labels` applies it


def test_groups_are_sized_for_the_70b_config():
    spec = _load("raycluster.yaml")["spec"]
    groups = _groups(spec)
    a, t, lab = CFG_70B.annotate, CFG_70B.train, CFG_70B.label
    assert spec["enableInTreeAutoscaling"] is True
    llm = groups["llm-4gpu"]
    assert int(_limits(llm)["nvidia.com/gpu"]) == a.tensor_parallel_size * a.pipeline_parallel_size
    assert llm["minReplicas"] == 0 and llm["maxReplicas"] >= a.concurrency
    train = groups["train-1gpu"]
    assert train["minReplicas"] == 0 and train["maxReplicas"] * int(_limits(train)["nvidia.com/gpu"]) >= t.workers
    assert train["maxReplicas"] >= lab.concurrency * lab.gpus_per_actor
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    # the run folder (and Ray Train's checkpoints under it) is on the volume every pod mounts
    for g in [spec["headGroupSpec"], *groups.values()]:
        mounts = [m["mountPath"] for m in g["template"]["spec"]["containers"][0].get("volumeMounts", [])]
        assert any(CFG_70B.output_dir.startswith(m) for m in mounts), g.get("groupName", "head")


def test_cluster_launcher_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))
    types = raw["available_node_types"]
    assert types[raw["head_node_type"]]["resources"] == {"CPU": 0}
    assert types["llm_4gpu"]["min_workers"] == 0 and types["llm_4gpu"]["max_workers"] >= 1
    assert "/mnt/shared" in " ".join(raw["docker"]["run_options"])
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["llm_4gpu"]["min_worker"] = 0
    with pytest.raises(Exception, match="min_worker"):
        validate_config(prepare_config(bad))


def test_cluster_launcher_nodes_get_the_token_caches_labels_and_an_instance_profile():
    from ray._private.label_utils import validate_node_label_syntax

    raw = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    opts = raw["docker"]["run_options"]
    for key in ["HF_HOME", "LLAMBERT_CACHE"]:
        assert f"-e {key}={RUNTIME_ENV['env_vars'][key]}" in opts, key
    (env_file,) = [o.split()[1] for o in opts if o.startswith("--env-file")]
    # the file docker reads must always exist (empty without a token), or no container starts
    assert any(c.rstrip().endswith(f"> {env_file}") and "HF_TOKEN=" in c for c in raw["initialization_commands"])
    kuberay_groups = {"head"} | set(_groups(_load("raycluster.yaml")["spec"]))
    types = raw["available_node_types"]
    for name, t in types.items():
        validate_node_label_syntax(t["labels"])
        assert t["labels"]["llambert/group"] in kuberay_groups, name  # one vocabulary on both launchers
        if name != raw["head_node_type"]:
            assert "instance-profile/" in t["node_config"]["IamInstanceProfile"]["Arn"], name
    assert len({t["labels"]["llambert/group"] for t in types.values()}) == len(types)


def _serve_app(doc):
    from ray.serve.schema import ServeDeploySchema

    from llambert_ray.config import ServeConfig

    schema = ServeDeploySchema.model_validate(doc)
    (app,) = schema.applications
    assert app.import_path == "llambert_ray.serve:build_app"
    args = dict(app.args)
    cfg = ServeConfig(**{k: v for k, v in args.items() if k != "model_dir"})
    return schema, args, cfg


def test_serve_yaml_is_a_cluster_serve_config_for_the_70b_runs_model():
    schema, args, cfg = _serve_app(yaml.safe_load((REPO / "configs" / "serve.yaml").read_text()))
    assert schema.http_options.host == "0.0.0.0"  # `serve deploy` on a cluster: reachable beyond the node
    assert PurePosixPath(args["model_dir"]).is_absolute(), "model_dir is read on the cluster's nodes"
    variant = CFG_70B.train.variants[0].replace("+", "_")
    assert args["model_dir"] == f"{CFG_70B.output_dir}/{CFG_70B.name}/models/{variant}/model"
    assert cfg.max_length == CFG_70B.train.max_length  # serve texts as the model was trained
    assert cfg.gpus_per_replica == 0


def test_rayservice_serves_the_shared_model_on_gpu_replicas_that_fit_its_groups():
    svc = _load("rayservice.yaml")
    schema, args, cfg = _serve_app(yaml.safe_load(svc["spec"]["serveConfigV2"]))
    assert schema.http_options.host == "0.0.0.0"
    serve_yaml = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
    assert args["model_dir"] == serve_yaml["applications"][0]["args"]["model_dir"]
    spec = svc["spec"]["rayClusterConfig"]
    for name, pod in _pods(spec):
        # the app is built (model_dir checked) in a 0-CPU task that may land on any pod, the head included
        assert _on_a_mount(args["model_dir"], pod), f"{name} does not mount {args['model_dir']}"
    assert cfg.gpus_per_replica > 0 and cfg.max_replicas > cfg.min_replicas  # GPU replicas, Serve autoscaling
    assert spec["enableInTreeAutoscaling"] is True
    (group,) = spec["workerGroupSpecs"]
    gpus, cpus = int(_limits(group)["nvidia.com/gpu"]), float(_limits(group)["cpu"])
    per_pod = min(int(gpus // cfg.gpus_per_replica), int(cpus // cfg.cpus_per_replica))
    assert per_pod >= 1 and group["maxReplicas"] * per_pod >= cfg.max_replicas
    assert group["minReplicas"] * per_pod >= cfg.min_replicas


def test_dockerignore_keeps_local_state_out_of_the_image():
    patterns = [ln.strip().strip("/") for ln in (REPO / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]

    def ignored(path):
        return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, p.removeprefix("**/")) for p in patterns)

    for path in [".venv", "runs", "data", ".git", "llambert_ray/__pycache__"]:
        assert ignored(path), path
    # what cluster/Dockerfile's `pip install -e` and the RayJob entrypoint need stays in
    for path in ["pyproject.toml", "llambert_ray", "jobs", "configs", "README.md"]:
        assert not ignored(path), path


def _image_requirements() -> list[str]:
    """What cluster/Dockerfile's requirements step writes, run here on this checkout's pyproject.toml."""
    import subprocess
    import sys

    docker = (REPO / "cluster" / "Dockerfile").read_text()
    m = re.search(r'RUN python -c "(.+?)" > (\S+)', docker)
    assert m, "cluster/Dockerfile has no requirements step"
    code = m.group(1).replace("/tmp/llambert-pyproject.toml", str(REPO / "pyproject.toml"))  # as sh passes it
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert f"pip install --no-cache-dir -r {m.group(2)}" in docker  # the list it writes is what it installs
    return out.split()


def test_the_image_installs_the_projects_own_dependencies():
    """The image's packages come from pyproject.toml itself (its dependencies and the gpu extra), so none can be
    missing there: cleanlab (train.label_issues) once was, and failed after the LLM work was paid for."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = _image_requirements()
    assert reqs == project["dependencies"] + project["optional-dependencies"]["gpu"]
    assert {"cleanlab==2.9.0", "vllm==0.32.0", "numpy==2.3.5", "fastapi==0.136.3"} <= set(reqs)
    assert "rayproject/ray:2.60.0-" in (REPO / "cluster" / "Dockerfile").read_text()
