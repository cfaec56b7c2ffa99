"""deploy/: the RayService manifest against KubeRay's CRD schema, and the deploy files' agreement.

The CRD schemas live in ../shared/kuberay (beside the repository, not in it); the tests that
need them skip when that folder is absent.
"""

from __future__ import annotations

import copy
import importlib
import re
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema comes with the dev extra")

ROOT = Path(__file__).absolute().parents[1]
DEPLOY = ROOT / "deploy"
KUBERAY = Path(__file__).absolute().parents[2] / "shared" / "kuberay"
CRD = KUBERAY / "ray.io_rayservices.yaml"


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def manifest() -> dict:
    return load_yaml(DEPLOY / "rayservice.yaml")


def serve_config() -> dict:
    return load_yaml(DEPLOY / "serve_config.yaml")


def the_app(config: dict) -> dict:
    (app,) = config["applications"]
    return app


def cluster_spec(m: dict) -> dict:
    return m["spec"]["rayClusterConfig"]


def pod_specs(m: dict) -> list[dict]:
    spec = cluster_spec(m)
    groups = [spec["headGroupSpec"]] + spec.get("workerGroupSpecs", [])
    return [g["template"]["spec"] for g in groups]


def containers(m: dict) -> list[dict]:
    return [c for pod in pod_specs(m) for c in pod["containers"]]


def env_of(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


# ---- the CRD's OpenAPI v3 schema as a JSON Schema ------------------------------------------


def to_json_schema(s: dict) -> dict:
    """Structural OpenAPI v3 (what a CRD holds) -> JSON Schema (Draft 7), as the API server reads it.

    `x-kubernetes-*` keys go (int-or-string fields already carry an `anyOf` of both types);
    `nullable` becomes a null type; and objects with `properties` get `additionalProperties:
    false`, since `kubectl apply` rejects unknown fields (--validate=strict, the default) where
    the API server would otherwise drop them silently: a misspelt field is an error here too.
    """
    preserve = s.get("x-kubernetes-preserve-unknown-fields", False)
    out = {k: v for k, v in s.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if "properties" in out:
        out["properties"] = {name: to_json_schema(sub) for name, sub in out["properties"].items()}
        if not preserve:
            out.setdefault("additionalProperties", False)
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = to_json_schema(out["additionalProperties"])
    if isinstance(out.get("items"), dict):
        out["items"] = to_json_schema(out["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [to_json_schema(sub) for sub in out[key]]
    if s.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


@pytest.fixture(scope="module")
def validator():
    if not CRD.is_file():
        pytest.skip(
            f"KubeRay CRD schemas not found at {KUBERAY} (the shared/ folder beside the repo)"
        )
    crd = load_yaml(CRD)
    assert crd["spec"]["names"]["kind"] == "RayService"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert version["served"]
    schema = to_json_schema(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def problems(validator, doc: dict) -> list[str]:
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


def test_rayservice_matches_the_crd(validator):
    m = manifest()
    assert (m["apiVersion"], m["kind"]) == ("ray.io/v1", "RayService")
    found = problems(validator, m)
    assert not found, "\n".join(found)


_DELETE = object()
RC = ("spec", "rayClusterConfig")
HEAD = (*RC, "headGroupSpec")
WORKER = (*RC, "workerGroupSpecs", 0)
GPU_LIMIT = (*WORKER, "template", "spec", "containers", 0, "resources", "limits", "nvidia.com/gpu")


def _set(path: tuple, value):
    def change(m: dict) -> None:
        *parents, last = path
        node = m
        for key in parents:
            node = node[key]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value

    return change


@pytest.mark.parametrize(
    "change, where",
    [
        (_set((*WORKER, "replicas"), "one"), "workerGroupSpecs.0.replicas"),  # wrong type
        (_set((*HEAD, "rayStartParams", "num-cpus"), 0), "rayStartParams.num-cpus"),  # not a str
        (_set((*RC, "authOptions", "mode"), "tokens"), "authOptions.mode"),  # not in the enum
        (_set(GPU_LIMIT, "eight"), "limits.nvidia.com/gpu"),  # not a quantity
        (_set((*WORKER, "groupName"), _DELETE), "workerGroupSpecs.0"),  # required
        (_set(("spec", "serveConfigV2"), {"applications": []}), "spec.serveConfigV2"),
        (_set((*HEAD, "rayStartParam"), {}), "headGroupSpec"),  # a misspelt field
    ],
)
def test_the_validator_rejects_bad_manifests(validator, change, where):
    m = copy.deepcopy(manifest())
    change(m)
    found = problems(validator, m)
    assert found, "a broken manifest passed the schema: the validator is not checking"
    assert any(where in p.split(":")[0] for p in found), found


# ---- the Serve config, its embedded copy and the code it names -----------------------------


def test_serve_config_v2_is_the_serve_config():
    embedded = manifest()["spec"]["serveConfigV2"]
    assert isinstance(embedded, str), "serveConfigV2 must be a YAML string"
    embedded, config = yaml.safe_load(embedded), serve_config()
    app, ours = the_app(embedded), the_app(config)
    assert app["import_path"] == ours["import_path"]
    assert app["args"] == ours["args"]
    assert embedded == config, "serveConfigV2 and deploy/serve_config.yaml differ"


def test_serve_config_is_a_serve_config():
    from ray.serve.schema import ServeDeploySchema  # what `serve deploy` validates against

    config = ServeDeploySchema.parse_obj(serve_config())
    assert [a.name for a in config.applications] == ["expertmesh"]


def test_serve_config_names_real_code_and_args():
    app = the_app(serve_config())
    assert (app["name"], app["route_prefix"]) == ("expertmesh", "/")
    module_name, _, attr = app["import_path"].partition(":")
    module = importlib.import_module(module_name)
    assert callable(getattr(module, attr, None)), f"{app['import_path']} is not a callable"
    args = app["args"]
    assert "api_keys" not in args, "API keys come from EXPERTMESH_API_KEYS, not from the file"
    serve_args = module.ServeArgs
    unknown = set(args) - set(serve_args.model_fields)
    assert not unknown, f"args that ServeArgs does not have: {sorted(unknown)}"
    parsed = serve_args.model_validate(args)
    assert (parsed.workers, parsed.transport, parsed.dtype, parsed.device) == (
        4,
        "collective",
        "bfloat16",
        "cuda",
    )
    assert parsed.min_replicas <= parsed.max_replicas
    gateway_keys = {"gateways", "min_gateways", "max_gateways", "target_gateway_requests"}
    assert gateway_keys | {"gateway_timeout_s"} <= set(args), "the multi-gateway keys are shown"
    assert parsed.min_gateways <= parsed.max_gateways


def test_serve_port_agrees():
    config = serve_config()
    port = config["http_options"]["port"]
    assert the_app(config)["args"]["port"] == port
    assert config["http_options"]["host"] == "0.0.0.0"  # reachable from the Service
    for c in containers(manifest()):
        serve_ports = [p["containerPort"] for p in c["ports"] if p.get("name") == "serve"]
        assert serve_ports == [port], c["name"]


# ---- the Dockerfile ------------------------------------------------------------------------


def dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def test_dockerfile_ray_is_the_installed_ray():
    import ray

    froms = re.findall(r"^FROM\s+(\S+)", dockerfile(), re.MULTILINE)
    assert len(froms) == 1, froms
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3\d+-(gpu|cu\d+)", froms[0])
    assert match, f"base image {froms[0]}: expected rayproject/ray:<version>-py3XX-gpu"
    assert match[1] == ray.__version__, "the image's Ray differs from the tested one"
    assert cluster_spec(manifest())["rayVersion"] == ray.__version__
    assert re.search(r"^EXPOSE\s+8000\b", dockerfile(), re.MULTILINE)


def test_dockerfile_copies_every_package():
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = pyproject["tool"]["setuptools"]["package-dir"].values()
    copied = set()
    for line in re.findall(r"^COPY\s+(.+)$", dockerfile(), re.MULTILINE):
        sources = [w for w in line.split() if not w.startswith("--")][:-1]
        copied |= {s.rstrip("/") for s in sources}
    missing = {"pyproject.toml", "README.md", *folders} - copied
    assert not missing, f"deploy/Dockerfile does not COPY {sorted(missing)}"
    assert "pip install" in dockerfile()
    assert not re.search(r"safetensors|huggingface|hf download", dockerfile().split("FROM")[1])


# ---- the pods ------------------------------------------------------------------------------


def test_auth_mode_is_the_same_on_every_pod():
    m = manifest()
    modes = {env_of(c).get("RAY_AUTH_MODE", {}).get("value") for c in containers(m)}
    assert modes == {cluster_spec(m)["authOptions"]["mode"]}, modes
    for c in containers(m):
        keys = env_of(c)["EXPERTMESH_API_KEYS"]["valueFrom"]["secretKeyRef"]
        assert keys["name"] and keys["key"], c["name"]


def test_head_takes_no_work_and_serves_the_dashboard():
    m = manifest()
    head = cluster_spec(m)["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    (c,) = head["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["gcs-server"] == 6379 and ports["dashboard"] == 8265 and ports["serve"] == 8000
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})


def test_a_gpu_pod_holds_the_gateways_and_their_workers():
    from expertmesh.cluster.config import ServeArgs

    args = ServeArgs.model_validate(the_app(serve_config())["args"])
    gateways = args.max_gateways if args.gateways == "auto" else int(args.gateways)
    needed = args.workers + gateways  # one GPU for each gateway and each expert worker
    m = manifest()
    images = {c["image"] for c in containers(m)}
    assert len(images) == 1, images
    gpus = []
    for group in cluster_spec(m)["workerGroupSpecs"]:
        for c in group["template"]["spec"]["containers"]:
            gpus.append(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)))
            assert c["resources"]["limits"].get("nvidia.com/gpu") == c["resources"]["requests"].get(
                "nvidia.com/gpu"
            )
    assert max(gpus) >= needed, f"no worker pod has {needed} GPUs: {gpus}"


def test_the_model_volume_is_mounted_read_only():
    model = the_app(serve_config())["args"]["model"]
    for pod in pod_specs(manifest()):
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in pod["containers"]:
            (mount,) = [v for v in c["volumeMounts"] if v["mountPath"] == "/models"]
            assert mount["readOnly"] is True
            claim = volumes[mount["name"]]["persistentVolumeClaim"]
            assert claim == {"claimName": "ernie-models", "readOnly": True}
    assert model.startswith("/models/")
