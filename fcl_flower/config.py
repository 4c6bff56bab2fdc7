"""One configuration object, composed once and passed down.

Values live in ``conf/*.yaml`` only; this module holds the *types* of the keys (the
schema) and the rules that tie values together. ``load_config`` composes the default
YAML, an optional user YAML file and dotlist overrides (``data.root=/x sites=4``),
rejects unknown keys and wrong types with a message naming the key, and checks the
allowed choices.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
DEFAULT_CONFIG = CONF_DIR / "default.yaml"


class ConfigError(ValueError):
    """A configuration value or key is not valid; the message names the key."""


@dataclass
class AugmentSchema:
    crop_scale: list[float] = MISSING
    rotate_deg: float = MISSING
    scale: float = MISSING
    flip_prob: float = MISSING
    intensity_shift: float = MISSING
    intensity_scale: float = MISSING
    gamma: list[float] = MISSING
    noise_std: float = MISSING


@dataclass
class DataSchema:
    format: str = MISSING
    root: Optional[str] = MISSING
    split: str = MISSING
    dirichlet_alpha: float = MISSING
    cache_dir: Optional[str] = MISSING
    num_partitions: int = MISSING
    spatial_dims: int = MISSING
    slab_depth: int = MISSING
    target_spacing: list[float] = MISSING
    image_size: list[int] = MISSING
    intensity_percentiles: list[float] = MISSING
    use_4d_frames: bool = MISSING
    holdout_fraction: float = MISSING
    augment: AugmentSchema = field(default_factory=AugmentSchema)


@dataclass
class SyntheticSchema:
    patients_per_site: int = MISSING
    image_size: int = MISSING
    spacing: float = MISSING
    patient_variation: float = MISSING
    anatomy_variation: float = MISSING
    cache_root: Optional[str] = MISSING


@dataclass
class ModelSchema:
    in_channels: int = MISSING
    num_classes: int = MISSING
    channels: list[int] = MISSING
    num_res_units: int = MISSING
    norm: str = MISSING
    proj_hidden: int = MISSING
    proj_dim: int = MISSING


@dataclass
class PretrainSchema:
    batch_volumes: int = MISSING
    local_epochs: int = MISSING
    max_steps_per_round: int = MISSING
    optimizer: str = MISSING
    lr: float = MISSING
    momentum: float = MISSING
    weight_decay: float = MISSING
    temperature: float = MISSING
    ema_momentum: float = MISSING
    queue_size: int = MISSING
    bank_sample_size: int = MISSING
    use_feature_exchange: bool = MISSING
    use_remote_positives: bool = MISSING
    exclude_same_partition_negatives: bool = MISSING
    keep_optimizer_state: bool = MISSING
    precision: str = MISSING
    threads: int = MISSING


@dataclass
class RelaySchema:
    enabled: bool = MISSING
    max_rows_per_site: int = MISSING
    max_remote_rows: int = MISSING
    float16: bool = MISSING
    stale_after_rounds: int = MISSING
    max_rows: int = MISSING
    norm_tolerance: float = MISSING


@dataclass
class StrategySchema:
    name: str = MISSING
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class FederationSchema:
    fraction_fit: float = MISSING
    min_fit_sites: int = MISSING
    min_available_sites: int = MISSING
    fraction_evaluate: float = MISSING
    min_evaluate_sites: int = MISSING
    round_timeout: Optional[float] = MISSING
    accept_failures: bool = MISSING
    client_cpus: int = MISSING
    client_gpus: float = MISSING


@dataclass
class FinetuneAugmentSchema:
    rotate_deg: float = MISSING
    scale: float = MISSING
    intensity_scale: float = MISSING


@dataclass
class FinetuneSchema:
    encoder: Optional[str] = MISSING
    init: str = MISSING
    tasks: list[str] = MISSING
    n_labeled: list[int] = MISSING
    folds: int = MISSING
    run_folds: int = MISSING
    local_steps: int = MISSING
    rounds: int = MISSING
    fed_local_steps: int = MISSING
    batch_size: int = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    freeze_encoder: bool = MISSING
    frozen_encoder_steps: int = MISSING
    federated_norm: str = MISSING
    augment: FinetuneAugmentSchema = field(default_factory=FinetuneAugmentSchema)
    overlay_slices: int = MISSING
    local_timeout: Optional[float] = MISSING
    threads: int = MISSING


@dataclass
class DeploySchema:
    host: str = MISSING
    port: int = MISSING
    startup_timeout: float = MISSING
    run_timeout: float = MISSING


@dataclass
class ConfigSchema:
    sites: int = MISSING
    rounds: int = MISSING
    method: str = MISSING
    seed: int = MISSING
    output_dir: str = MISSING
    resume: bool = MISSING
    stages: list[str] = MISSING
    data: DataSchema = field(default_factory=DataSchema)
    synthetic: SyntheticSchema = field(default_factory=SyntheticSchema)
    model: ModelSchema = field(default_factory=ModelSchema)
    pretrain: PretrainSchema = field(default_factory=PretrainSchema)
    relay: RelaySchema = field(default_factory=RelaySchema)
    strategy: StrategySchema = field(default_factory=StrategySchema)
    federation: FederationSchema = field(default_factory=FederationSchema)
    finetune: FinetuneSchema = field(default_factory=FinetuneSchema)
    deploy: DeploySchema = field(default_factory=DeploySchema)


CHOICES: dict[str, tuple[Any, ...]] = {
    "method": ("fcl", "local_cl", "simclr", "rotation", "none"),
    "data.format": ("synthetic", "acdc", "msd"),
    "data.split": ("iid", "dirichlet"),
    "data.spatial_dims": (2, 3),
    "model.norm": ("instance", "batch"),
    "pretrain.optimizer": ("sgd", "adam"),
    "pretrain.precision": ("float32", "bfloat16"),
    "finetune.init": ("auto", "random", "local_pretrain"),
    "finetune.federated_norm": ("shared", "local"),
    "strategy.name": (
        "fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm",
        "fedmedian", "fedtrimmedavg", "krum",
    ),
}
STAGES = ("pretrain", "finetune")
POSITIVE = (
    "sites", "rounds", "data.num_partitions", "data.slab_depth", "pretrain.batch_volumes",
    "pretrain.local_epochs", "pretrain.queue_size", "pretrain.bank_sample_size", "pretrain.threads",
    "synthetic.patients_per_site", "synthetic.image_size", "model.proj_hidden", "model.proj_dim",
    "relay.max_rows", "federation.client_cpus",
    "finetune.folds", "finetune.local_steps", "finetune.rounds", "finetune.fed_local_steps",
    "finetune.batch_size", "finetune.threads",
)
NON_NEGATIVE = (
    "seed", "pretrain.max_steps_per_round", "pretrain.weight_decay", "relay.max_rows_per_site",
    "relay.max_remote_rows", "relay.stale_after_rounds", "relay.norm_tolerance", "finetune.weight_decay",
    "finetune.frozen_encoder_steps",
)
UNIT_INTERVAL = ("federation.fraction_fit", "federation.fraction_evaluate")
# (lowest, highest) draws of an augmentation range, each kept inside these bounds
AUGMENT_RANGES = {"data.augment.crop_scale": (0.0, 1.0), "data.augment.gamma": (0.0, float("inf"))}
FINETUNE_TASKS = ("local", "federated")


@functools.lru_cache(maxsize=1)
def _default_layer() -> DictConfig:
    """``conf/default.yaml``, read once per process (read-only; merging never changes it)."""
    layer = OmegaConf.load(DEFAULT_CONFIG)
    OmegaConf.set_readonly(layer, True)
    return layer


def load_config(
    overrides: Sequence[str] = (), config_file: str | Path | None = None
) -> DictConfig:
    """Compose ``conf/default.yaml``, an optional YAML file and dotlist overrides.

    Args:
        overrides: ``key=value`` strings, e.g. ``["sites=3", "data.root=/data/acdc"]``.
        config_file: a YAML file with a subset of the keys, applied before overrides.

    Returns:
        A read-only ``DictConfig`` that follows ``ConfigSchema``.

    Raises:
        ConfigError: unknown key, wrong type, value outside its choices, or an
            unreadable file; the message names the key or the file.
    """
    layers = [_default_layer()]
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            layers.append(OmegaConf.load(path))
        except Exception as exc:  # yaml errors come in several types
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.merge(OmegaConf.structured(ConfigSchema), *layers)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(f"config key '{key}': {str(exc).splitlines()[0]}") from exc
    validate_config(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def validate_config(cfg: DictConfig) -> None:
    """Check choices, positivity and cross-key rules; raise ``ConfigError`` naming the key."""
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {list(allowed)}")
    for key in POSITIVE:
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"config key '{key}': must be at least 1, got {OmegaConf.select(cfg, key)}")
    for key in NON_NEGATIVE:
        if OmegaConf.select(cfg, key) < 0:
            raise ConfigError(f"config key '{key}': must be >= 0, got {OmegaConf.select(cfg, key)}")
    for key in UNIT_INTERVAL:
        if not 0.0 <= OmegaConf.select(cfg, key) <= 1.0:
            raise ConfigError(f"config key '{key}': must be in [0, 1], got {OmegaConf.select(cfg, key)}")
    for stage in cfg.stages:
        if stage not in STAGES:
            raise ConfigError(f"config key 'stages': {stage!r} is not one of {list(STAGES)}")
    if len(cfg.data.image_size) != 2 or len(cfg.data.target_spacing) != 2:
        raise ConfigError("config keys 'data.image_size' and 'data.target_spacing' need two in-plane values")
    if min(cfg.data.image_size) < 1 or not min(cfg.data.target_spacing) > 0:
        raise ConfigError("config keys 'data.image_size' and 'data.target_spacing' must be positive, got "
                          f"{list(cfg.data.image_size)} and {list(cfg.data.target_spacing)}")
    for key, (least, most) in AUGMENT_RANGES.items():
        draws = list(OmegaConf.select(cfg, key))
        if len(draws) != 2 or not least < draws[0] <= draws[1] <= most:
            raise ConfigError(f"config key '{key}': needs [low, high] with {least} < low <= high <= {most}, got {draws}")
    if not cfg.model.channels or min(cfg.model.channels) < 1:
        raise ConfigError(f"config key 'model.channels': needs one or more widths >= 1, got {list(cfg.model.channels)}")
    if cfg.model.in_channels != 1:
        raise ConfigError(f"config key 'model.in_channels': the data layer reads one channel, got {cfg.model.in_channels}")
    if not cfg.pretrain.lr > 0:
        raise ConfigError("config key 'pretrain.lr': must be positive")
    if not 0.0 < cfg.pretrain.temperature:
        raise ConfigError("config key 'pretrain.temperature': must be positive")
    if not 0.0 <= cfg.pretrain.ema_momentum < 1.0:
        raise ConfigError("config key 'pretrain.ema_momentum': must be in [0, 1)")
    if not 0.0 <= cfg.data.holdout_fraction < 1.0:
        raise ConfigError("config key 'data.holdout_fraction': must be in [0, 1)")
    from fcl_flower.data.synthetic import PatientVariation

    problem = PatientVariation.of(cfg.synthetic).problem()
    if problem:
        raise ConfigError(f"config key {problem}")
    _validate_finetune(cfg)
    _validate_federation(cfg)


def _validate_federation(cfg: DictConfig) -> None:
    fed = cfg.federation
    if fed.min_fit_sites > cfg.sites or fed.min_available_sites > cfg.sites or fed.min_evaluate_sites > cfg.sites:
        raise ConfigError(
            "config keys 'federation.min_fit_sites'/'federation.min_available_sites'/'federation.min_evaluate_sites' "
            f"exceed 'sites' = {cfg.sites}"
        )
    if not fed.fraction_fit > 0:
        raise ConfigError("config key 'federation.fraction_fit': 0 asks no site to train, so no round would run")
    if "pretrain" in cfg.stages and cfg.method == "none":
        raise ConfigError("config key 'method': 'none' (random init) has no pre-training; use stages=[finetune]")
    if relays_banks(cfg) and cfg.pretrain.queue_size > cfg.relay.max_rows:
        raise ConfigError(f"config key 'pretrain.queue_size': {cfg.pretrain.queue_size} rows exceed 'relay.max_rows' = "
                          f"{cfg.relay.max_rows}, so the server would reject every bank")


def _validate_finetune(cfg: DictConfig) -> None:
    ft = cfg.finetune
    for task in ft.tasks:
        if task not in FINETUNE_TASKS:
            raise ConfigError(f"config key 'finetune.tasks': {task!r} is not one of {list(FINETUNE_TASKS)}")
    if not ft.n_labeled or any(n < 1 for n in ft.n_labeled) or len(set(ft.n_labeled)) != len(ft.n_labeled):
        raise ConfigError(f"config key 'finetune.n_labeled': needs distinct values >= 1, got {list(ft.n_labeled)}")
    if ft.folds < 2:
        raise ConfigError(f"config key 'finetune.folds': k-fold needs at least 2 folds, got {ft.folds}")
    if not 0 <= ft.run_folds <= ft.folds:
        raise ConfigError(f"config key 'finetune.run_folds': must be in [0, finetune.folds = {ft.folds}], got {ft.run_folds}")
    if not ft.lr > 0:
        raise ConfigError("config key 'finetune.lr': must be positive")
    if ft.overlay_slices < 0:
        raise ConfigError("config key 'finetune.overlay_slices': must be >= 0")
    if ft.init == "local_pretrain" and cfg.method == "none":
        raise ConfigError("config key 'finetune.init': local_pretrain needs a pre-training 'method', not 'none'")
    if ft.federated_norm == "local" and cfg.model.norm != "batch":
        raise ConfigError("config key 'finetune.federated_norm': local (FedBN) keeps each site's BatchNorm layers, "
                          f"but model.norm = {cfg.model.norm!r} has none with state; use model.norm=batch")


def config_to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML text: what the server sends to clients and saves."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def config_from_yaml(text: str) -> DictConfig:
    """Rebuild a validated, read-only config from ``config_to_yaml`` output.

    Keys that ``text`` lacks take their value from ``conf/default.yaml``: a config stored
    by an earlier version (e.g. in a checkpoint) predates keys added since.
    """
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(ConfigSchema), _default_layer(), OmegaConf.create(text))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"received config is not valid: {str(exc).splitlines()[0]}") from exc
    validate_config(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def config_differences(a: DictConfig, b: DictConfig) -> list[str]:
    """Dotted keys whose values differ between two configs (sorted)."""

    def flat(node: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(node, dict):
            return {prefix: node}
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flat(value, f"{prefix}{key}."))
        return out or {prefix: node}

    left, right = (flat(OmegaConf.to_container(c, resolve=True)) for c in (a, b))
    return sorted(k.rstrip(".") for k in left.keys() | right.keys() if left.get(k) != right.get(k))


def relays_banks(cfg: DictConfig) -> bool:
    """Whether feature banks travel: the relay is on and the method uses the other sites' banks.

    Only ``method=fcl`` with ``pretrain.use_feature_exchange`` does; for every other setting no
    bank leaves a site, whatever ``relay.enabled`` says.
    """
    return bool(cfg.relay.enabled and cfg.method == "fcl" and cfg.pretrain.use_feature_exchange)


def with_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """A new validated config: ``cfg`` with dotlist ``overrides`` applied."""
    return config_from_yaml(
        config_to_yaml(OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides))))
    )
