"""Static checks of infra/: CI has no Docker engine or cluster, so every file is parsed instead,
and the Kubernetes job template is rendered with Prefect's own templating into the Job a worker
would submit for each deployment of deployments/prefect.yaml.
"""

import asyncio
import fnmatch
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from prefect.utilities.schema_tools import ValidationError, validate
from prefect.workers.base import BaseJobConfiguration

from darkroom.config import RetrainConfig

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
COMPOSE = INFRA / "docker-compose.yml"
COMPOSE_GPU = INFRA / "docker-compose.gpu.yml"
DOCKERFILE = INFRA / "Dockerfile"
DOCKERIGNORE = INFRA / "Dockerfile.dockerignore"
JOB_TEMPLATE = INFRA / "k8s" / "base-job-template.json"
SECRET = INFRA / "k8s" / "secret-example.yaml"
RAYCLUSTER = INFRA / "k8s" / "raycluster.yaml"
ENV_EXAMPLE = INFRA / ".env.example"
PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"

# `${VAR}`, `${VAR:-default}` / `${VAR-default}` (a default) or `${VAR:?message}` /
# `${VAR?message}` (required: compose stops with the message): the value comes from the
# environment or infra/.env.
INTERPOLATION = re.compile(
    r"\$\{(?P<var>[A-Za-z_][A-Za-z0-9_]*)"
    r"(?:(?P<op>:?-)(?P<default>[^}]*)|(?P<required>:?\?)(?P<message>[^}]*))?\}"
)
SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|API_KEY|AUTH")
# Keys whose value is a secret in itself (an access key id is not): no default in the files.
SECRET_VALUE = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH_STRING")
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
# A version tag: `16.15-bookworm`, `3.8.8-python3.11`, `RELEASE.2025-09-07T16-13-09Z`.
VERSION_TAG = re.compile(r"\d+\.\d+|RELEASE\.\d{4}-\d{2}-\d{2}T")


def load_yaml(path):
    return yaml.safe_load(path.read_text())


def load_secrets():
    """The example Secrets by name (secret-example.yaml holds several YAML documents)."""
    docs = [d for d in yaml.safe_load_all(SECRET.read_text()) if d]
    return {d["metadata"]["name"]: d for d in docs}


def command_text(service):
    command = service.get("command") or []
    return command if isinstance(command, str) else " ".join(map(str, command))


def depends_on(service):
    deps = service.get("depends_on") or {}
    return {d: {"condition": "service_started"} for d in deps} if isinstance(deps, list) else deps


def image_tag(image):
    """The tag of `[registry[:port]/]name[:tag][@digest]`, or None when it has none."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


def pyproject_version():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def pinned_version(package):
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep and name.strip().lower() == package:
            return version.strip()
    raise AssertionError(f"{package} is not pinned in constraints.txt")


def strings(node):
    """Every string in a parsed YAML document (comments are gone by then)."""
    if isinstance(node, dict):
        return [s for key, value in node.items() for s in strings(key) + strings(value)]
    if isinstance(node, list):
        return [s for item in node for s in strings(item)]
    return [node] if isinstance(node, str) else []


def deployment_pools():
    return {d["work_pool"]["name"] for d in load_yaml(PREFECT_YAML)["deployments"]}


def api_clients(services):
    """Services that talk to the Prefect API: the CLI or a worker, not the server itself."""
    return {
        name: s
        for name, s in services.items()
        if name != "prefect-server"
        and ("PREFECT_API_URL" in environment(s) or re.search(r"\bprefect\b", command_text(s)))
    }


def environment(service):
    """A service's `environment` as a dict, whichever of the two compose forms it uses."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: (None if v is None else str(v)) for k, v in env.items()}


def interpolated(value):
    """The interpolation match if `value` is exactly one `${VAR...}` expression, else None."""
    return INTERPOLATION.fullmatch(value or "")


def url_credentials(url):
    """(user, password) from `scheme://user:password@host...`, or None; `${...}` may hold `:`."""
    match = re.match(r"[A-Za-z][A-Za-z0-9+.-]*://(?P<userinfo>.*)@[^@]*$", url or "")
    if not match:
        return None
    # Split on the first colon outside `${...}`.
    parts = re.findall(r"(?:\$\{[^}]*\}|[^:$]|\$(?!\{))+", match["userinfo"])
    return (parts[0], match["userinfo"][len(parts[0]) + 1 :]) if len(parts) > 1 else None


@pytest.fixture(scope="module")
def compose():
    return load_yaml(COMPOSE)


@pytest.fixture(scope="module")
def services(compose):
    return compose["services"]


@pytest.fixture(scope="module")
def template():
    return json.loads(JOB_TEMPLATE.read_text())


@pytest.fixture(scope="module")
def dockerfile():
    return parse_dockerfile(DOCKERFILE.read_text())


# --- docker-compose ---------------------------------------------------------------------------


def test_compose_defines_the_stack(services):
    assert {"postgres", "prefect-server", "minio", "minio-setup", "deploy", "worker"} <= set(
        services
    )
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["prefect-server"]["image"].startswith("prefecthq/prefect:")
    assert "4200:4200" in " ".join(map(str, services["prefect-server"]["ports"]))


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_GPU], ids=lambda p: p.name)
def test_every_build_dockerfile_exists(path):
    builds = {name: s["build"] for name, s in load_yaml(path)["services"].items() if "build" in s}
    for name, build in builds.items():
        build = {"context": build} if isinstance(build, str) else build
        context = (path.parent / build.get("context", ".")).resolve()
        assert context.is_dir(), f"{name}: build context {context} missing"
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
    if path == COMPOSE:
        assert "worker" in builds
        assert (path.parent / builds["worker"]["context"]).resolve() == ROOT


def test_worker_reaches_prefect_and_minio_by_service_name(services):
    worker = services["worker"]
    env = environment(worker)
    api = urlsplit(env["PREFECT_API_URL"])
    assert api.hostname == "prefect-server" and api.port == 4200 and api.path == "/api"
    s3 = urlsplit(env["AWS_ENDPOINT_URL"])
    assert s3.hostname == "minio" and s3.port == 9000
    assert env["DARKROOM_STORAGE"].startswith("s3://darkroom/")
    command = worker["command"]
    command = command if isinstance(command, list) else shlex.split(command)
    assert command[:3] == ["prefect", "worker", "start"]
    assert command[command.index("--pool") + 1] == "darkroom-process"
    assert command[command.index("--type") + 1] == "process"


def test_bucket_created_by_setup_matches_worker_storage(services):
    bucket = urlsplit(environment(services["worker"])["DARKROOM_STORAGE"]).netloc
    setup = services["minio-setup"]["command"]
    setup = " ".join(setup) if isinstance(setup, list) else setup
    assert f"mc mb --ignore-existing local/{bucket}" in setup


def test_prefect_server_uses_postgres_and_no_telemetry(services):
    server = services["prefect-server"]
    env = environment(server)
    db = env["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert db.startswith("postgresql+asyncpg://")
    assert db.split("@", 1)[1].startswith("postgres:5432/")
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert env["PREFECT_UI_API_URL"] == "http://localhost:4200/api"
    command = server["command"]
    command = " ".join(command) if isinstance(command, list) else command
    assert "prefect server start" in command and "--host 0.0.0.0" in command


def test_depends_on_waits_for_health_where_a_healthcheck_exists(services):
    for name, service in services.items():
        for dep, spec in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            condition = spec["condition"]
            if "healthcheck" in services[dep]:
                assert condition == "service_healthy", f"{name} -> {dep}"
            else:
                assert condition == "service_completed_successfully", f"{name} -> {dep}"
                assert services[dep].get("restart", "no") == "no", f"{dep} is one-shot"
    for name in ("postgres", "prefect-server", "minio"):
        assert services[name]["healthcheck"]["test"], name


def test_no_hardcoded_secrets(services):
    for name, service in services.items():
        for key, value in environment(service).items():
            if SECRET_KEY.search(key):
                assert interpolated(value), f"{name}.{key} must come from ${{VAR...}}"
            if SECRET_VALUE.search(key):
                # A default would be a secret written in the file: required from infra/.env.
                assert interpolated(value)["required"], f"{name}.{key} must be ${{VAR:?...}}"
            credentials = url_credentials(value)
            if credentials:
                password = interpolated(credentials[1])
                assert password, f"{name}.{key}: password inline in URL"
                assert password["required"], f"{name}.{key}: password with a default in URL"


def test_credentials_agree_across_services(services):
    # Each side interpolates the same variable, so one override changes both.
    minio, worker = environment(services["minio"]), environment(services["worker"])
    assert worker["AWS_ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"]
    assert worker["AWS_SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"]
    setup = environment(services["minio-setup"])
    assert setup["MINIO_ROOT_PASSWORD"] == minio["MINIO_ROOT_PASSWORD"]
    postgres = environment(services["postgres"])
    db = environment(services["prefect-server"])["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert url_credentials(db) == (postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"])
    # MinIO refuses to start with a root password shorter than 8 characters: a default must be
    # long enough, a required value is documented in .env.example.
    password = interpolated(minio["MINIO_ROOT_PASSWORD"])
    if password["required"]:
        assert "8 characters" in ENV_EXAMPLE.read_text()
    else:
        assert len(password["default"] or "") >= 8


def test_gpu_override_reserves_nvidia_for_the_gpu_worker_only(services):
    override = load_yaml(COMPOSE_GPU)["services"]
    assert set(override) == {"gpu-worker"} and set(override) <= set(services)
    devices = override["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    for name in ("worker", "gpu-worker"):
        assert "deploy" not in services[name], "GPU must stay opt-in for hosts without one"


def test_a_worker_polls_every_pool_the_deployments_use(services):
    pools = deployment_pools()
    polled = {
        s["command"][s["command"].index("--pool") + 1]
        for s in services.values()
        if "worker" in s.get("command", [])
    }
    assert pools <= polled


def test_prefect_server_requires_the_auth_string(services):
    env = environment(services["prefect-server"])
    auth = interpolated(env.get("PREFECT_SERVER_API_AUTH_STRING"))
    assert auth and auth["required"], "the server must take its auth string from infra/.env"
    # The healthcheck stays credential-free: /api/health is the route auth leaves open.
    assert "/api/health" in " ".join(services["prefect-server"]["healthcheck"]["test"])


def test_every_api_client_sends_the_servers_auth_string(services):
    server = environment(services["prefect-server"])["PREFECT_SERVER_API_AUTH_STRING"]
    clients = api_clients(services)
    assert {"deploy", "worker", "gpu-worker"} <= set(clients)
    for name, service in clients.items():
        env = environment(service)
        assert urlsplit(env.get("PREFECT_API_URL")).hostname == "prefect-server", name
        auth = env.get("PREFECT_API_AUTH_STRING")
        # The same `${VAR:?...}` as the server: one value in infra/.env, never a literal.
        assert interpolated(auth) and auth == server, f"{name}: PREFECT_API_AUTH_STRING"


def test_env_example_documents_every_variable_without_secrets(compose):
    documented = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            documented[key.strip()] = value.strip()
    used = {m["var"] for s in strings(compose) for m in INTERPOLATION.finditer(s.replace("$$", ""))}
    assert used and used <= set(documented), f"undocumented: {sorted(used - set(documented))}"
    for key, value in documented.items():
        if SECRET_VALUE.search(key):
            assert value == "", f".env.example must not hold a value for {key}"
    # The filled-in copy never reaches git or a build context.
    assert ".env" in (INFRA / ".gitignore").read_text().split()
    assert "**/.env" in DOCKERIGNORE.read_text().split()


def test_deploy_service_registers_everything_once_the_server_is_healthy(services):
    deploy = services["deploy"]
    assert depends_on(deploy)["prefect-server"]["condition"] == "service_healthy"
    assert deploy.get("restart", "no") == "no", "deploy is one-shot"
    assert deploy["image"] == services["worker"]["image"], "deploy imports the flows: same image"
    script = command_text(deploy)
    # Each pool the deployments use, created as a process pool before `prefect deploy`.
    created = set(re.findall(r"work-pool create (\S+) --type process", script))
    assert deployment_pools() <= created
    deploy_lines = [line for line in script.splitlines() if re.search(r"\bdeploy\b", line)]
    deploy_line = next(line for line in deploy_lines if "prefect" in line and "--all" in line)
    assert script.index("work-pool create") < script.index(deploy_line)
    argv = shlex.split(deploy_line)
    prefect_file = argv[argv.index("--prefect-file") + 1]
    # Relative to the image's WORKDIR, which holds a copy of deployments/.
    assert prefect_file == "deployments/prefect.yaml" and (ROOT / prefect_file).is_file()
    # A failing step must fail the service (`sh -e`), so that the workers do not start.
    shell_flags = [a for a in deploy["command"][1:-1] if re.fullmatch(r"-[a-z]+", a)]
    assert "e" in "".join(shell_flags), deploy["command"][:-1]


def test_workers_start_after_the_deploy_service_completed(services):
    workers = {n: s for n, s in services.items() if "prefect worker start" in command_text(s)}
    assert {"worker", "gpu-worker"} <= set(workers)
    for name, worker in workers.items():
        assert depends_on(worker)["deploy"]["condition"] == "service_completed_successfully", name


def test_no_pythonpath_or_working_directory_convention(services):
    # Flows and tasks are installed with darkroom and the entrypoints are module paths, so
    # nothing depends on sys.path tricks or on the directory a flow run starts in.
    for name, service in services.items():
        assert "PYTHONPATH" not in environment(service), name
        assert "working_dir" not in service, name
    for name, service in load_yaml(COMPOSE_GPU)["services"].items():
        assert "PYTHONPATH" not in environment(service) and "working_dir" not in service, name
    prefect_yaml = load_yaml(PREFECT_YAML)
    steps = [s for d in [prefect_yaml, *prefect_yaml["deployments"]] for s in d.get("pull") or []]
    assert not [s for s in steps if any("set_working_directory" in k for k in s)]
    for deployment in prefect_yaml["deployments"]:
        entrypoint = deployment["entrypoint"]
        assert ":" not in entrypoint and ".py" not in entrypoint, entrypoint
        module = entrypoint.rsplit(".", 1)[0]
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), entrypoint


# --- Kubernetes -------------------------------------------------------------------------------


def job_container(template):
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    return pod["containers"][0]


def test_job_template_has_prefect_shape(template):
    assert set(template) == {"job_configuration", "variables"}
    manifest = template["job_configuration"]["job_manifest"]
    assert (manifest["apiVersion"], manifest["kind"]) == ("batch/v1", "Job")
    pod = manifest["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    container = job_container(template)
    # The Kubernetes worker fills in the run's command and image on this container, and puts
    # the run's env (`{{ env }}` of job_configuration) before the container's own env list.
    assert container["name"] == "prefect-job"
    assert (container["args"], container["image"]) == ("{{ command }}", "{{ image }}")
    assert template["job_configuration"]["env"] == "{{ env }}"
    assert isinstance(container["env"], list)


def test_job_template_placeholders_are_declared_variables(template):
    # Prefect's server rejects a template that uses an undeclared variable; catch it here.
    used = set(PLACEHOLDER.findall(json.dumps(template["job_configuration"])))
    declared = set(template["variables"]["properties"])
    assert used and not used - declared, f"undeclared: {sorted(used - declared)}"


class JobConfiguration(BaseJobConfiguration):
    """The job configuration of a Kubernetes work pool: KubernetesWorkerJobConfiguration's
    fields (prefect-kubernetes runs on the worker only and is not installed here). Its
    ``from_template_and_values`` is Prefect's own: what a worker renders for a flow run."""

    namespace: str = "default"
    job_manifest: dict[str, Any]
    cluster_config: dict | None = None
    job_watch_timeout_seconds: int | None = None
    pod_watch_timeout_seconds: int = 60
    stream_output: bool = True


class NoAPI:
    """A Prefect client that fails when used: the template renders without blocks or variables."""

    def __getattr__(self, name):
        raise AssertionError(f"rendering the job template called the API ({name})")


def rendered_job(template, job_variables: dict) -> dict:
    """The Job a Kubernetes worker submits for a flow run of a deployment with these
    ``job_variables``, after the check the server makes when the deployment is created."""
    validate(
        job_variables,
        template["variables"],
        raise_on_error=True,
        preprocess=True,
        ignore_required=True,
    )
    render = JobConfiguration.from_template_and_values(template, job_variables, client=NoAPI())
    return asyncio.run(render).job_manifest


def deployment_job_variables(deployment: dict) -> dict:
    """A deployment's job variables: `prefect deploy` reads them under `work_pool`."""
    assert "job_variables" not in deployment, "prefect deploy ignores them there"
    return deployment["work_pool"].get("job_variables") or {}


def pod_resources(template, name: str) -> dict:
    deployment = next(d for d in load_yaml(PREFECT_YAML)["deployments"] if d["name"] == name)
    pod = rendered_job(template, deployment_job_variables(deployment))["spec"]["template"]["spec"]
    return pod["containers"][0]["resources"]


def nulls(node, path="") -> list[str]:
    """Paths of every None in a rendered manifest: the API would get a JSON null there."""
    if isinstance(node, dict):
        return [p for key, value in node.items() for p in nulls(value, f"{path}.{key}")]
    if isinstance(node, list):
        return [p for i, value in enumerate(node) for p in nulls(value, f"{path}[{i}]")]
    return [path] if node is None else []


def devices_per_fold(config: RetrainConfig) -> int:
    # RetrainConfig.devices_per_fold (one fold over several GPUs) lands beside this change;
    # until it does, a fold trains on one device.
    return getattr(config, "devices_per_fold", 1)


def test_retrain_pod_requests_the_gpus_its_folds_need(template):
    spec = next(d for d in load_yaml(PREFECT_YAML)["deployments"] if d["name"] == "nightly-retrain")
    config = RetrainConfig.model_validate(spec["parameters"]["config"])
    resources = pod_resources(template, "nightly-retrain")
    if config.task_runner == "ray":  # the folds take the Ray cluster's GPUs, not the pod's
        assert "nvidia.com/gpu" not in {**resources.get("limits", {}), **resources["requests"]}
        return
    gpus = resources["limits"]["nvidia.com/gpu"]
    assert resources["requests"]["nvidia.com/gpu"] == gpus and isinstance(gpus, int)
    # Each fold training at once takes devices_per_fold of the pod's GPUs.
    per_fold = devices_per_fold(config)
    assert gpus % per_fold == 0 and gpus >= per_fold * (config.max_folds_in_flight or 1)


@pytest.mark.parametrize("deployment", ["score-new-images", "watch-incoming"])
def test_scoring_and_watching_pods_ask_for_cpu_and_no_gpu(template, deployment):
    resources = pod_resources(template, deployment)
    assert "nvidia.com/gpu" not in {**resources.get("limits", {}), **resources["requests"]}
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]


@pytest.mark.parametrize("job_variables", [{}, {"gpu_count": 0}, {"gpu_count": 2}], ids=str)
def test_rendered_jobs_follow_kubernetes_resource_rules(template, job_variables):
    manifest = rendered_job(template, job_variables)
    assert not nulls(manifest), nulls(manifest)
    resources = manifest["spec"]["template"]["spec"]["containers"][0]["resources"]
    gpus = {side: resources[side].get("nvidia.com/gpu") for side in ("limits", "requests")}
    # An extended resource is a whole number >= 0 with request == limit (Kubernetes rejects
    # the Job otherwise); no gpu_count means no GPU key at all.
    assert gpus["limits"] == gpus["requests"] == job_variables.get("gpu_count")
    with pytest.raises(ValidationError):
        rendered_job(template, {"gpu_count": -1})


def test_job_variables_are_accepted_by_the_process_pools_of_the_compose_stack():
    # The same prefect.yaml deploys to process pools (docker-compose.yml), whose worker ignores
    # variables it does not know; the server must still accept them.
    from prefect.workers.process import ProcessWorker

    schema = ProcessWorker.get_default_base_job_template()["variables"]
    for deployment in load_yaml(PREFECT_YAML)["deployments"]:
        validate(
            deployment_job_variables(deployment), schema, raise_on_error=True, ignore_required=True
        )


def test_job_env_comes_from_the_example_secret(template):
    secrets = load_secrets()
    names = [ref["secretRef"]["name"] for ref in job_container(template)["envFrom"]]
    assert names == ["darkroom-s3"] and set(names) <= set(secrets)
    assert "DARKROOM_STORAGE" in secrets["darkroom-s3"]["stringData"]


def test_secret_example_parses_and_holds_placeholders_only():
    text = SECRET.read_text()
    secrets = load_secrets()
    assert set(secrets) == {"darkroom-s3", "darkroom-prefect-auth"}
    assert "EXAMPLE" in text.splitlines()[0]
    for secret in secrets.values():
        assert (secret["apiVersion"], secret["kind"], secret["type"]) == ("v1", "Secret", "Opaque")
        for key, value in secret["stringData"].items():
            if SECRET_KEY.search(key):
                assert value == "REPLACE_ME", key
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(
        secrets["darkroom-s3"]["stringData"]
    )
    assert set(secrets["darkroom-prefect-auth"]["stringData"]) == {"PREFECT_API_AUTH_STRING"}


def test_job_template_takes_the_auth_string_from_a_secret(template):
    secrets = load_secrets()
    env = {e["name"]: e for e in job_container(template)["env"]}
    auth = env["PREFECT_API_AUTH_STRING"]
    assert "value" not in auth, "a literal auth string in the template"
    ref = auth["valueFrom"]["secretKeyRef"]
    assert ref["name"] in secrets and ref["key"] in secrets[ref["name"]]["stringData"]
    # The worker copies its own settings into every Job as plain values and drops the
    # template's entry of the same name; a null default drops the worker's copy instead.
    env_variable = template["variables"]["properties"]["env"]
    assert env_variable["default"] == {"PREFECT_API_AUTH_STRING": None}
    assert "PREFECT_API_AUTH_STRING" not in json.dumps(template["job_configuration"]).replace(
        json.dumps(auth), ""
    )


def test_job_template_runs_flows_like_the_compose_workers(template):
    container = job_container(template)
    assert "workingDir" not in container and "command" not in container
    names = [e["name"] for e in container["env"]]
    defaults = template["variables"]["properties"]["env"].get("default") or {}
    assert "PYTHONPATH" not in names and "PYTHONPATH" not in defaults


# --- KubeRay --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raycluster():
    return load_yaml(RAYCLUSTER)


def ray_containers(raycluster) -> dict:
    """The Ray container of the head and of each worker group, by group name."""
    groups = {"head": raycluster["spec"]["headGroupSpec"]}
    groups |= {g["groupName"]: g for g in raycluster["spec"]["workerGroupSpecs"]}
    return {name: g["template"]["spec"]["containers"][0] for name, g in groups.items()}


def test_raycluster_pins_kuberay_v1_and_the_ray_of_constraints(raycluster):
    assert (raycluster["apiVersion"], raycluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert raycluster["spec"]["rayVersion"] == pinned_version("ray")


def test_raycluster_runs_darkrooms_image_everywhere(raycluster, template):
    # The Ray client refuses a cluster of another Ray or Python version, and workers import
    # darkroom's tasks: head, workers and flow-run pods share one image.
    images = {name: c["image"] for name, c in ray_containers(raycluster).items()}
    assert set(images.values()) == {template["variables"]["properties"]["image"]["default"]}


def test_raycluster_has_gpu_workers_and_a_head_that_trains_nothing(raycluster):
    head = raycluster["spec"]["headGroupSpec"]["rayStartParams"]
    assert (head["num-cpus"], head["num-gpus"]) == ("0", "0")
    ports = {p["name"]: p["containerPort"] for p in ray_containers(raycluster)["head"]["ports"]}
    assert ports["client"] == 10001  # ray://<name>-head-svc:10001
    gpu_groups = [
        c["resources"]
        for name, c in ray_containers(raycluster).items()
        if name != "head" and c["resources"]["limits"].get("nvidia.com/gpu")
    ]
    assert gpu_groups
    for resources in gpu_groups:
        gpus = resources["limits"]["nvidia.com/gpu"]
        assert isinstance(gpus, int) and gpus >= 1
        assert resources["requests"]["nvidia.com/gpu"] == gpus


def test_ray_workers_reach_storage_and_prefect_like_flow_run_pods(raycluster, template):
    secrets = load_secrets()
    for name, container in ray_containers(raycluster).items():
        env = {e["name"]: e for e in container.get("env", [])}
        ref = env["PREFECT_API_AUTH_STRING"]["valueFrom"]["secretKeyRef"]
        assert ref["name"] in secrets and ref["key"] in secrets[ref["name"]]["stringData"]
        assert [s["secretRef"]["name"] for s in container["envFrom"]] == ["darkroom-s3"]
        # The API address comes from the flow run with each task (Ray's runtime_env), so a
        # copy here could only disagree with it.
        assert "PREFECT_API_URL" not in env, name
    worker_groups = raycluster["spec"]["workerGroupSpecs"]
    for group in worker_groups:
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        cache = next(e["value"] for e in container["env"] if e["name"] == "DARKROOM_CACHE")
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == cache)
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert "emptyDir" in volume, "the image cache lives on the node's local disk"


def test_raycluster_address_in_the_docs_is_its_head_service(raycluster):
    # KubeRay names the head's Service <metadata.name>-head-svc.
    address = f"ray://{raycluster['metadata']['name']}-head-svc"
    for path in (RAYCLUSTER, INFRA / "README.md", ROOT / "docs" / "scaling.md"):
        assert address in path.read_text(), path


# --- Dockerfile -------------------------------------------------------------------------------


def parse_dockerfile(text):
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            keyword, _, args = full.partition(" ")
            instructions.append((keyword.upper(), args.strip()))
    return instructions


def copy_sources(args):
    if args.startswith("["):
        parts = json.loads(args)
    else:
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
    return parts[:-1]


def env_vars(dockerfile):
    found = {}
    for keyword, args in dockerfile:
        if keyword == "ENV":
            parts = shlex.split(args)
            if "=" in parts[0]:
                found.update(p.split("=", 1) for p in parts)
            else:
                found[parts[0]] = " ".join(parts[1:])
    return found


def test_dockerfile_base_and_layout(dockerfile):
    keyword, base = dockerfile[0]
    # A Python patch release on a named Debian release, not the floating `3.11-slim`.
    assert keyword == "FROM" and re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", base), base
    workdirs = [args for keyword, args in dockerfile if keyword == "WORKDIR"]
    assert workdirs[-1] == "/opt/darkroom"
    env = env_vars(dockerfile)
    assert "PYTHONPATH" not in env  # flows/ and tasks/ are installed with darkroom
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    cmd = [args for keyword, args in dockerfile if keyword == "CMD"][-1]
    assert json.loads(cmd)[0] == "darkroom"


def test_dockerfile_copy_sources_exist(dockerfile):
    copies = [args for keyword, args in dockerfile if keyword in ("COPY", "ADD")]
    assert copies
    sources = [s for args in copies if "--from=" not in args for s in copy_sources(args)]
    missing = [s for s in sources if not (ROOT / s).exists()]
    assert not missing, f"COPY sources missing from the repo root: {missing}"
    copied = {s.rstrip("/") for s in sources}
    assert {"pyproject.toml", "src", "flows", "tasks", "deployments"} <= copied


def test_dockerfile_copies_what_pip_needs_before_installing(dockerfile):
    install = next(i for i, (k, a) in enumerate(dockerfile) if k == "RUN" and "/opt/darkroom" in a)
    run = dockerfile[install][1]
    assert "pip install" in run and " -e " not in f" {run} " and "--editable" not in run
    before = {
        s.rstrip("/") for k, a in dockerfile[:install] if k == "COPY" for s in copy_sources(a)
    }
    readme = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("readme")
    needed = {"pyproject.toml", "src", "flows", "tasks", "constraints.txt"}
    needed |= {readme} if isinstance(readme, str) else set()
    assert "-c constraints.txt" in run  # the versions the tests passed with
    assert needed <= before, f"not copied before pip install: {sorted(needed - before)}"


def test_dockerfile_installs_the_ray_extra_at_the_pinned_versions(dockerfile):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extra = project["optional-dependencies"]["ray"]
    assert {re.split(r"[\[<>=]", r)[0] for r in extra} == {"prefect-ray", "ray"}
    install = next(a for k, a in dockerfile if k == "RUN" and "/opt/darkroom" in a)
    argv = shlex.split(install)
    assert "/opt/darkroom[ray]" in argv and "-c" in argv
    assert argv[argv.index("-c") + 1] == "constraints.txt"
    assert pinned_version("prefect-ray") and pinned_version("ray")


def test_dockerfile_does_not_run_as_root(dockerfile):
    users = [args for keyword, args in dockerfile if keyword == "USER"]
    assert users, "no USER line: the container would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")


def test_dockerignore_keeps_venv_out_but_not_copied_sources(dockerfile):
    patterns = [
        line.strip().lstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith(("#", "!"))
    ]

    def ignored(path):
        parts = path.strip("/").split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        return any(
            fnmatch.fnmatch(p, pat) or (pat.startswith("**/") and fnmatch.fnmatch(p, pat[3:]))
            for p in prefixes
            for pat in patterns
        )

    assert ignored(".venv") and ignored("data") and ignored(".git")
    sources = [s for k, a in dockerfile if k == "COPY" for s in copy_sources(a)]
    assert not [s for s in sources if ignored(s)]


# --- pinned images ----------------------------------------------------------------------------


def compose_images():
    images = {}
    for path in (COMPOSE, COMPOSE_GPU):
        for name, service in load_yaml(path)["services"].items():
            if "image" in service:
                images[f"{path.name}:{name}"] = service["image"]
    return images


def test_compose_runs_every_service_from_an_image():
    services = load_yaml(COMPOSE)["services"]
    assert not [name for name, s in services.items() if "image" not in s]


@pytest.mark.parametrize(
    "where, image",
    [
        *compose_images().items(),
        *(
            ("Dockerfile", args.split()[-1])
            for k, args in parse_dockerfile(DOCKERFILE.read_text())
            if k == "FROM"
        ),
        (
            "base-job-template.json",
            json.loads(JOB_TEMPLATE.read_text())["variables"]["properties"]["image"]["default"],
        ),
    ],
    ids=lambda value: str(value),
)
def test_every_image_has_a_pinned_version_tag(where, image):
    # A literal tag anyone can read, not `latest`, no tag at all, or a floating major.
    assert "$" not in image, f"{where}: {image} is interpolated"
    tag = image_tag(image)
    assert tag, f"{where}: {image} has no tag"
    assert "latest" not in tag.lower(), f"{where}: {image}"
    assert VERSION_TAG.search(tag), f"{where}: {image} is not a version tag"


def test_object_store_images_come_from_minios_registry(services):
    # Docker Hub's minio/* images are gone; quay.io/minio is the registry MinIO documents.
    for name in ("minio", "minio-setup"):
        assert services[name]["image"].startswith("quay.io/minio/"), name


def test_prefect_server_image_matches_the_pinned_client(services, dockerfile):
    image = services["prefect-server"]["image"]
    assert image.startswith("prefecthq/prefect:")
    base = next(args for keyword, args in dockerfile if keyword == "FROM")
    python = re.match(r"python:(\d+\.\d+)", base).group(1)
    assert image_tag(image) == f"{pinned_version('prefect')}-python{python}"


def test_darkroom_image_tag_is_the_package_version(services, template):
    version = pyproject_version()
    built = {name: s["image"] for name, s in services.items() if "build" in s}
    assert {"deploy", "worker", "gpu-worker"} <= set(built)
    assert set(built.values()) == {f"darkroom:{version}"}
    assert template["variables"]["properties"]["image"]["default"] == f"darkroom:{version}"
