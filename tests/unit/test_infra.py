"""Static checks of infra/: CI has no Docker engine or cluster, so every file is parsed instead.

Only PyYAML and the standard library are needed.
"""

import fnmatch
import json
import re
import shlex
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
COMPOSE = INFRA / "docker-compose.yml"
COMPOSE_GPU = INFRA / "docker-compose.gpu.yml"
DOCKERFILE = INFRA / "Dockerfile"
DOCKERIGNORE = INFRA / "Dockerfile.dockerignore"
JOB_TEMPLATE = INFRA / "k8s" / "base-job-template.json"
SECRET = INFRA / "k8s" / "secret-example.yaml"

# `${VAR}` or `${VAR:-default}` / `${VAR-default}`: the value comes from the environment.
INTERPOLATION = re.compile(r"\$\{(?P<var>[A-Za-z_][A-Za-z0-9_]*)(?::?-(?P<default>[^}]*))?\}")
SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|API_KEY")
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def load_yaml(path):
    return yaml.safe_load(path.read_text())


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
    assert {"postgres", "prefect-server", "minio", "minio-setup", "worker"} <= set(services)
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
                assert interpolated(value), f"{name}.{key} must come from ${{VAR:-default}}"
            credentials = url_credentials(value)
            if credentials:
                assert interpolated(credentials[1]), f"{name}.{key}: password inline in URL"


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
    # MinIO refuses to start with a root password shorter than 8 characters.
    assert len(interpolated(minio["MINIO_ROOT_PASSWORD"])["default"] or "") >= 8


def test_gpu_override_reserves_nvidia_for_the_gpu_worker_only(services):
    override = load_yaml(COMPOSE_GPU)["services"]
    assert set(override) == {"gpu-worker"} and set(override) <= set(services)
    devices = override["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    for name in ("worker", "gpu-worker"):
        assert "deploy" not in services[name], "GPU must stay opt-in for hosts without one"


def test_a_worker_polls_every_pool_the_deployments_use(services):
    import yaml

    deployments = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    pools = {d["work_pool"]["name"] for d in deployments["deployments"]}
    polled = {
        s["command"][s["command"].index("--pool") + 1]
        for s in services.values()
        if "worker" in s.get("command", [])
    }
    assert pools <= polled


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
    # The Kubernetes worker fills in the run's command, image and env on this container.
    assert container["name"] == "prefect-job"
    assert (container["args"], container["env"]) == ("{{ command }}", "{{ env }}")


def test_job_template_placeholders_are_declared_variables(template):
    # Prefect's server rejects a template that uses an undeclared variable; catch it here.
    used = set(PLACEHOLDER.findall(json.dumps(template["job_configuration"])))
    declared = set(template["variables"]["properties"])
    assert used and not used - declared, f"undeclared: {sorted(used - declared)}"


def test_job_template_requests_one_gpu(template):
    resources = job_container(template)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"]
    value = resources["limits"]["nvidia.com/gpu"]
    variable = PLACEHOLDER.fullmatch(str(value))
    if variable:  # what a flow run gets unless its deployment overrides the variable
        value = template["variables"]["properties"][variable.group(1)]["default"]
    assert int(value) == 1


def test_job_env_comes_from_the_example_secret(template):
    secret = load_yaml(SECRET)
    names = [ref["secretRef"]["name"] for ref in job_container(template)["envFrom"]]
    assert names == [secret["metadata"]["name"]] == ["darkroom-s3"]


def test_secret_example_parses_and_holds_placeholders_only():
    text = SECRET.read_text()
    secret = yaml.safe_load(text)
    assert (secret["apiVersion"], secret["kind"], secret["type"]) == ("v1", "Secret", "Opaque")
    assert "EXAMPLE" in text.splitlines()[0]
    data = secret["stringData"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(data)
    for key, value in data.items():
        if SECRET_KEY.search(key):
            assert value == "REPLACE_ME", key


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
    assert dockerfile[0] == ("FROM", "python:3.11-slim")
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
