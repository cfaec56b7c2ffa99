"""The one config chain: every ClusterConfig field reaches the cluster from each front door.

`serve` flags, a Serve config's `args` and a RayService's `serveConfigV2` all validate into
`ServeArgs`, a ClusterConfig plus the HTTP edge; unknown keys are refused by name.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml
from expertmesh.cluster.api.app import build_app, gateway_deployment, pool_deployment
from expertmesh.cluster.cli.args import EngineArgs, GenerateArgs, add_args, parse
from expertmesh.cluster.cli.main import build_parser
from expertmesh.cluster.config import ClusterConfig, ServeArgs
from pydantic import ValidationError

ROOT = Path(__file__).resolve().parents[1]


def serve_config_args(path: Path) -> dict:
    return yaml.safe_load(path.read_text())["applications"][0]["args"]


def rayservice_args() -> dict:
    manifest = yaml.safe_load((ROOT / "deploy" / "rayservice.yaml").read_text())
    return yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"][0]["args"]


def cpu(args: dict, **changes) -> dict:
    return {**args, "device": "cpu", **changes}


SOURCES = {
    "serve_config.yaml": lambda: serve_config_args(ROOT / "deploy" / "serve_config.yaml"),
    "serveConfigV2": rayservice_args,
}


@pytest.mark.parametrize("source", SOURCES)
def test_strategy_from_a_serve_config_reaches_the_placement_group(source):
    args = ServeArgs.model_validate(cpu(SOURCES[source](), strategy="SPREAD"))
    assert args.cluster_config().strategy == "SPREAD"
    deployment = pool_deployment(args)  # the workers are placed once, by the shared pool
    assert deployment._replica_config.placement_group_strategy == "SPREAD"
    bundles = deployment._replica_config.placement_group_bundles
    assert len(bundles) == 1 + args.workers  # the pool's own, then one per worker
    gateways = gateway_deployment(args)._replica_config
    assert gateways.placement_group_bundles is None  # gateways are placed one by one


def test_unknown_key_is_refused_by_name():
    args = cpu(serve_config_args(ROOT / "deploy" / "serve_config.yaml"), stratgey="SPREAD")
    with pytest.raises(ValidationError, match="stratgey"):
        build_app(args)


def serve_flags(*argv: str) -> ServeArgs:
    parser = build_parser()
    ns = parser.parse_args(["serve", *argv])
    return parse(parser, ns.args_model, ns)


def test_every_cluster_field_is_a_serve_flag_and_a_config_key():
    flags = {a.dest for a in build_parser()._subparsers._group_actions[0].choices["serve"]._actions}
    for name in ClusterConfig.model_fields:
        assert name in flags, f"--{name.replace('_', '-')} is missing from `serve`"
        assert name in ServeArgs.model_fields


@pytest.mark.parametrize(
    "argv, field, value",
    [
        (["--strategy", "SPREAD"], "strategy", "SPREAD"),
        (["--block-size", "32"], "block_size", 32),
        (["--max-tokens-per-step", "512"], "max_tokens_per_step", 512),
        (["--rpc-timeout-s", "7.5"], "rpc_timeout_s", 7.5),
        (["--worker-cpus", "2"], "worker_cpus", 2.0),
        (["--gateway-threads", "4"], "gateway_threads", 4),
        (["--torch-threads", "3"], "torch_threads", 3),
        (["--expert-map", "0", "1", "0", "1"], "expert_map", [0, 1, 0, 1]),
    ],
)
def test_serve_flags_reach_the_cluster_config(argv, field, value):
    cfg = serve_flags(*argv).cluster_config("/some/model")
    assert getattr(cfg, field) == value
    assert cfg.model == "/some/model"


def test_engine_config_is_derived_from_the_cluster_config():

    cfg = ClusterConfig(model="m", block_size=32, max_tokens_per_step=100, kv_cache_tokens=512)
    e = cfg.engine_config("cpu")
    assert (e.block_size, e.max_tokens_per_step, e.kv_cache_tokens) == (32, 100, 512)


@pytest.mark.parametrize(
    "fields, gateways, cores, threads",
    [
        (dict(transport="local"), 1, 2, 1),  # one core left to the HTTP side and Ray
        (dict(transport="local"), 1, 16, 15),
        (dict(transport="local"), 2, 16, 7),
        (dict(transport="grpc", workers=2), 1, 2, 1),  # never below one
        (dict(transport="grpc", workers=2), 1, 16, 5),
        (dict(transport="local", gateway_threads=4), 1, 2, 4),  # given: kept
    ],
)
def test_gateway_threads_default_leaves_a_core_to_the_rest(fields, gateways, cores, threads):
    cfg = ClusterConfig(model="m", **fields)
    assert cfg.gateway_torch_threads(gateways, cores) == threads


def test_grpc_experiments_reach_the_gateway_and_workers_env_on_grpc_only(monkeypatch):
    monkeypatch.delenv("GRPC_EXPERIMENTS", raising=False)
    grpc = ClusterConfig(model="m", transport="grpc")
    assert grpc.runtime_env() == {
        "env_vars": {"GRPC_EXPERIMENTS": "-event_engine_client,-event_engine_listener"}
    }
    assert ClusterConfig(model="m", transport="tcp").runtime_env() == {}
    assert ClusterConfig(model="m", grpc_experiments="").runtime_env() == {}  # gRPC's defaults
    mine = ClusterConfig(model="m", grpc_experiments="-event_engine_client")
    assert mine.runtime_env() == {"env_vars": {"GRPC_EXPERIMENTS": "-event_engine_client"}}
    monkeypatch.setenv("GRPC_EXPERIMENTS", "")  # the environment's own setting wins
    assert grpc.runtime_env() == {}
    options = gateway_deployment(ServeArgs(model="m", transport="grpc")).ray_actor_options
    assert options["runtime_env"] == {}


def test_generate_flags_are_cluster_fields_too():
    parser = argparse.ArgumentParser()
    add_args(parser, GenerateArgs)
    ns = parser.parse_args(["--prompt", "hi", "--strategy", "SPREAD", "--transport", "grpc"])
    args = parse(parser, GenerateArgs, ns)
    cfg = args.cluster_config("/m")
    assert (cfg.strategy, cfg.transport, cfg.workers) == ("SPREAD", "grpc", 1)
    assert issubclass(GenerateArgs, EngineArgs) and issubclass(EngineArgs, ClusterConfig)


def test_cluster_config_refuses_unknown_keys():
    with pytest.raises(ValidationError, match="workerz"):
        ClusterConfig(model="m", workerz=2)


def test_a_rule_over_several_flags_is_a_usage_error(capsys):
    from pydantic import BaseModel, Field, model_validator

    class Args(BaseModel):
        low: int = Field(1, description="low")
        high: int = Field(2, description="high")

        @model_validator(mode="after")
        def _order(self):
            if self.low > self.high:
                raise ValueError("--low must not exceed --high")
            return self

    parser = argparse.ArgumentParser(prog="x")
    add_args(parser, Args)
    with pytest.raises(SystemExit) as e:
        parse(parser, Args, parser.parse_args(["--low", "5"]))
    assert e.value.code == 2 and "--low must not exceed --high" in capsys.readouterr().err
