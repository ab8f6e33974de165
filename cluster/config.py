"""The deployment config: one YAML file, frozen dataclasses inside, checked by pydantic on load.

The dataclasses are the only thing the rest of diptych sees. They hold the defaults, and their field
types hold the rules a value must pass: pydantic validates a file straight into them, strictly (YAML's
"2", true and 2.0 are not integers; unknown keys are errors), and the end of this module words its
errors. Environment variables are not read here. examples/cpu.yaml documents every key.
"""

from __future__ import annotations

import difflib
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal, get_type_hints

import yaml
from pydantic import AfterValidator, ConfigDict, Field, StrictBool, TypeAdapter, ValidationError
from pydantic_core import ErrorDetails

from diptych.engine.config import PRESETS, RANDOM_PREFIX
from diptych.router.policy import DEFAULT_POLICY, POLICIES
from diptych.router.settings import GatewaySettings

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
TransportBackend = Literal["auto", "nccl", "gloo"]
EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
MAX_GPUS_PER_WORKER = 1  # more arrive with pipeline parallel prefill and context parallel decode


class ConfigError(ValueError):
    """A deployment config that cannot be used: the file, then one line per problem with its key path."""

    def __init__(self, source: str, problems: Iterable[tuple[str, str]]) -> None:
        self.source = source
        self.problems = tuple(problems)  # (key path, what is wrong); the path is "" for the file itself
        super().__init__(
            "\n".join(f"{source}: {key}: {msg}" if key else f"{source}: {msg}" for key, msg in self.problems)
        )


# ---- the rules a value must pass, as the field types of the dataclasses below ----


def _model_path(value: str) -> str:
    if value.startswith(RANDOM_PREFIX) and value[len(RANDOM_PREFIX) :] not in PRESETS:
        shape = value[len(RANDOM_PREFIX) :]
        raise ValueError(
            f"unknown model shape {shape!r} after {RANDOM_PREFIX!r}; known: {', '.join(sorted(PRESETS))}"
        )
    return value


def _routing_policy(value: str) -> str:
    if value not in POLICIES:
        raise ValueError(f"must be one of {', '.join(map(repr, sorted(POLICIES)))}, got {value!r}")
    return value


def _api_key(value: str) -> str:
    # The key travels as "Authorization: Bearer <key>", where whitespace cannot survive.
    if not value or any(c.isspace() for c in value):
        raise ValueError("must be a non-empty string without whitespace")
    return value


def _power_of_two(value: int) -> int:
    if value < 1 or value & (value - 1):
        raise ValueError(
            f"must be a power of two (the GPU attention kernels address pages by shifts), got {value}"
        )
    return value


def _absolute_path(value: str) -> str:
    if not Path(value).is_absolute():
        raise ValueError(f"must be an absolute path, got {value!r}")
    return value


# Every type is strict (Literal and StrictBool are by nature); the test of wrong types covers each key.
_NonEmpty = Annotated[str, Field(strict=True, min_length=1)]
_PositiveInt = Annotated[int, Field(strict=True, ge=1)]
_PositiveFloat = Annotated[float, Field(strict=True, gt=0)]
_Fraction = Annotated[float, Field(strict=True, gt=0, le=1)]
_GpuCount = Annotated[int, Field(strict=True, ge=0, le=MAX_GPUS_PER_WORKER)]
_Port = Annotated[int, Field(strict=True, ge=0, le=65535)]
_Grace = Annotated[float, Field(strict=True, ge=0)]
_ModelPath = Annotated[_NonEmpty, AfterValidator(_model_path)]
_BlockSize = Annotated[int, Field(strict=True), AfterValidator(_power_of_two)]
_ApiKey = Annotated[str, Field(strict=True), AfterValidator(_api_key)]
_Policy = Annotated[str, Field(strict=True), AfterValidator(_routing_policy)]
_AbsolutePath = Annotated[_NonEmpty, AfterValidator(_absolute_path)]


@dataclass(frozen=True)
class ModelSection:
    path: _ModelPath | None = None  # a HF dir, a .gguf file, "random:<preset>"; None: the embedded model
    name: _NonEmpty | None = None  # served model name; default: served_name derives it from the path
    dtype: Dtype = "auto"
    max_model_len: _PositiveInt | None = None  # default: the model's own
    # CPU fp32 workers: GGUF Q4_0/Q4_1/Q8_0 projections also keep their blocks for decode-sized products
    cpu_quantized_weights: StrictBool = True

    @property
    def served_name(self) -> str:
        if self.name is not None:
            return self.name
        if self.path is None:
            return EMBEDDED_MODEL_NAME
        if self.path.startswith(RANDOM_PREFIX):
            return self.path
        # The rule of engine.loader.resolve_model, without touching the file system or importing torch.
        last = PurePosixPath(self.path.replace("\\", "/"))
        return last.name.split(".")[0] if last.suffix.lower() == ".gguf" else last.name


@dataclass(frozen=True)
class PrefillSection:
    workers: _PositiveInt = 1
    gpus_per_worker: _GpuCount = 0  # 0: the workers run on the CPU
    chunk_size: _PositiveInt = 512  # tokens of one sequence per prefill chunk
    token_budget: _PositiveInt = 2048  # tokens per prefill step across sequences
    max_num_seqs: _PositiveInt = 16
    kv_cache_gib: _PositiveFloat = 0.5  # on the CPU; on a GPU gpu_memory_fraction applies
    gpu_memory_fraction: _Fraction = 0.5

    @property
    def on_gpu(self) -> bool:
        return self.gpus_per_worker > 0


@dataclass(frozen=True)
class DecodeSection:
    workers: _PositiveInt = 1
    gpus_per_worker: _GpuCount = 0
    max_batch: _PositiveInt = 64  # running sequences per decode worker
    kv_cache_gib: _PositiveFloat = 1.0
    gpu_memory_fraction: _Fraction = 0.85
    block_size: _BlockSize = 16  # KV block size of both pools: a handoff lands block for block
    async_scheduling: StrictBool = True  # GPU workers launch a decode step before the last one's tokens land

    @property
    def on_gpu(self) -> bool:
        return self.gpus_per_worker > 0


@dataclass(frozen=True)
class TransportSection:
    backend: TransportBackend = "auto"  # DeploymentConfig.resolved_transport decides auto
    layers_per_message: _PositiveInt = 4
    timeout_s: _PositiveFloat = 30.0
    stream_layers: StrictBool = True  # send each layer's KV as it is computed; false: after the whole forward
    lanes: _PositiveInt = 2  # NCCL only: communicators per channel that messages alternate over


@dataclass(frozen=True)
class GatewaySection:
    host: _NonEmpty = "127.0.0.1"
    port: _Port = 8000  # 0: any free port
    # The gateway's own settings (router.settings.GatewaySettings): its defaults are the only ones.
    api_keys: tuple[_ApiKey, ...] = GatewaySettings.api_keys  # empty: no authentication
    max_body_bytes: _PositiveInt = GatewaySettings.max_body_bytes
    max_pending: _PositiveInt = GatewaySettings.max_pending  # requests in flight before new ones get 429
    request_timeout_s: _PositiveFloat = GatewaySettings.request_timeout_s


@dataclass(frozen=True)
class RoutingSection:
    policy: _Policy = DEFAULT_POLICY  # a name in router.policy.POLICIES


@dataclass(frozen=True)
class RaySection:
    address: _NonEmpty | None = None  # join this cluster; None: start a local one
    temp_dir: _AbsolutePath | None = None  # None: the controller picks a dir under the system temp dir
    num_cpus: _PositiveInt | None = None
    shutdown_grace_s: _Grace = 30.0  # on SIGTERM, how long in-flight requests get to finish


@dataclass(frozen=True)
class DeploymentConfig:
    # pydantic's settings for checking a file, which the sections inherit (a class attribute, not a field)
    __pydantic_config__ = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: ModelSection = field(default_factory=ModelSection)
    prefill: PrefillSection = field(default_factory=PrefillSection)
    decode: DecodeSection = field(default_factory=DecodeSection)
    kv_transport: TransportSection = field(default_factory=TransportSection)
    gateway: GatewaySection = field(default_factory=GatewaySection)
    routing: RoutingSection = field(default_factory=RoutingSection)
    ray: RaySection = field(default_factory=RaySection)

    @property
    def resolved_transport(self) -> Literal["nccl", "gloo"]:
        if self.kv_transport.backend == "auto":
            return "nccl" if self.prefill.on_gpu and self.decode.on_gpu else "gloo"
        return self.kv_transport.backend

    @property
    def resolved_dtype(self) -> Literal["float32", "bfloat16", "float16"]:
        """One dtype for both pools, as KV crosses between them: auto is bfloat16 if either pool has a GPU."""
        if self.model.dtype == "auto":
            return "bfloat16" if self.prefill.on_gpu or self.decode.on_gpu else "float32"
        return self.model.dtype


_CHECK = TypeAdapter(DeploymentConfig)  # validates a mapping of sections into the dataclasses


def load_config(path: str | Path | None) -> DeploymentConfig:
    """Read and check a deployment file; None gives the defaults (the embedded model on the CPU)."""
    if path is None:
        return DeploymentConfig()
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, [("", "no such file")]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(source, [("", f"cannot read the file: {e}")]) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise ConfigError(source, [("", _describe_yaml_error(e))]) from None
    return parse_config({} if data is None else data, source)


def parse_config(data: Mapping[str, Any], source: str = "<dict>") -> DeploymentConfig:
    """Check a parsed config (a mapping of sections) and freeze it; a null section means its defaults."""
    if not isinstance(data, Mapping):
        raise ConfigError(source, [("", f"the top level must be a mapping of sections, got {_show(data)}")])
    sections = {key: {} if value is None else value for key, value in data.items()}
    try:
        config = _CHECK.validate_python(sections)
    except ValidationError as e:
        raise ConfigError(source, _problems(e)) from None
    problems = _cross_field_problems(config)
    if problems:
        raise ConfigError(source, problems)
    return config


def with_overrides(
    cfg: DeploymentConfig, *, host: str | None = None, port: int | None = None, address: str | None = None
) -> DeploymentConfig:
    """Apply command-line flags (None: keep the file's value), checked by the same rules as the file."""
    gateway = _given(host=host, port=port)
    ray = _given(address=address)
    try:
        _CHECK.validate_python({"gateway": gateway, "ray": ray})  # the keys not given take valid defaults
    except ValidationError as e:
        raise ConfigError("command line", _problems(e)) from None
    return replace(cfg, gateway=replace(cfg.gateway, **gateway), ray=replace(cfg.ray, **ray))


def _given(**values: Any) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def _cross_field_problems(cfg: DeploymentConfig) -> list[tuple[str, str]]:
    problems = []
    prefill = cfg.prefill
    if prefill.token_budget < prefill.chunk_size:
        message = f"must be >= prefill.chunk_size ({prefill.chunk_size}), got {prefill.token_budget}"
        problems.append(("prefill.token_budget", message))
    if cfg.kv_transport.backend == "nccl":
        cpu_pools = [name for name in ("prefill", "decode") if not getattr(cfg, name).on_gpu]
        if cpu_pools:
            pools = " and ".join(f"{name}.gpus_per_worker" for name in cpu_pools)
            verb = "is" if len(cpu_pools) == 1 else "are"
            problems.append(("kv_transport.backend", f"nccl needs GPUs on both pools, but {pools} {verb} 0"))
    return problems


# ---- error wording: pydantic's error types to messages in the file's own terms ----

_YAML_KINDS = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "mapping"}
_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "tuple_type": "a list",  # the dataclasses hold tuples, a file writes lists
    "dataclass_type": "a mapping of keys",
}
_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
_BOUND_KEYS = {"greater_than_equal": "ge", "greater_than": "gt", "less_than_equal": "le", "less_than": "lt"}


def _problems(error: ValidationError) -> list[tuple[str, str]]:
    return [(_key_path(_owner(e)), _message(e)) for e in error.errors()]


def _owner(error: ErrorDetails) -> tuple[Any, ...]:
    # A key that is not a string is a problem of the mapping that holds it.
    return tuple(error["loc"][:-1] if error["type"] == "invalid_key" else error["loc"])


def _key_path(loc: tuple[Any, ...]) -> str:
    parts = [f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc]  # list items as [i]
    return "".join(parts).removeprefix(".")


def _message(error: ErrorDetails) -> str:
    kind, value, ctx = error["type"], error["input"], error.get("ctx", {})
    if kind == "unexpected_keyword_argument":
        return _unknown_key(tuple(error["loc"]))
    if kind in _EXPECTED:
        return f"must be {_EXPECTED[kind]}, got {_show(value)}"
    if kind in _BOUNDS:
        return f"must be {_BOUNDS[kind]} {_number(ctx[_BOUND_KEYS[kind]])}, got {value!r}"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']}, got {_show(value)}"
    if kind == "invalid_key":
        return f"keys must be strings, got {_show(value)}"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "finite_number":
        return f"must be a finite number, got {value!r}"
    if kind == "value_error":
        return str(ctx["error"])
    return str(error["msg"])


def _unknown_key(loc: tuple[Any, ...]) -> str:
    section: Any = DeploymentConfig
    for part in loc[:-1]:
        section = get_type_hints(section)[part]
    known = [f.name for f in fields(section)]
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    if close:
        return f"unknown key; did you mean {close[0]!r}?"
    return f"unknown key; known keys: {', '.join(known)}"


def _show(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)
    kind = _YAML_KINDS.get(type(value), type(value).__name__)
    return f"{kind} {text if len(text) <= 60 else text[:57] + '...'}"


def _number(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


def _describe_yaml_error(error: yaml.YAMLError) -> str:
    if not isinstance(error, yaml.MarkedYAMLError) or error.problem_mark is None:
        return f"not valid YAML: {error}"
    mark = error.problem_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}"
    context = f" ({error.context} from line {error.context_mark.line + 1})" if error.context_mark else ""
    return f"{where}: {error.problem}{context}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that rejects a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Hashable] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *base" keys may be overridden: that is what a merge is for
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # SafeLoader rejects it below, with its own message
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)
