"""The one home for where things live in a project checkout. dvc.yaml mirrors these names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "test", "public")
# The models compared: owner-side baselines (`raw` upper bound, `plain_random`), then the trainer's.
MODELS = ("raw", "plain_random", "plain", "masknet")


@dataclass(frozen=True)
class Paths:
    root: Path = Path(".")

    @property
    def raw(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def reference_model(self) -> Path:
        return self.root / "models" / "reference.npz"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    def report(self, stage: str) -> Path:
        """A stage's whole record (desensitize.reporting.records); metrics/<stage>.json holds its headline figures."""
        return self.root / "reports" / stage / "report.json"

    @property
    def reference_metrics(self) -> Path:
        return self.metrics / "reference.json"

    @property
    def reference_history(self) -> Path:
        return self.root / "plots" / "reference_history.csv"

    @property
    def release(self) -> Path:
        return self.root / "data" / "release"

    @property
    def masks_metrics(self) -> Path:
        return self.metrics / "masks.json"

    @property
    def masks_reports(self) -> Path:
        return self.root / "reports" / "masks"

    @property
    def attack_metrics(self) -> Path:
        return self.metrics / "attack.json"

    @property
    def attack_reports(self) -> Path:
        return self.root / "reports" / "attack"

    @property
    def attack_cache(self) -> Path:
        """Full attack-suite results by the digest of their inputs (desensitize.attack.cache):
        the attack stage reuses the mask search's run on the candidate it released. Not versioned."""
        return self.root / ".cache" / "attack"

    def model(self, name: str) -> Path:
        """A model of the train / baselines stages: raw, plain_random, plain, masknet."""
        return self.root / "models" / f"{name}.npz"

    def train_history(self, name: str) -> Path:
        return self.root / "plots" / "train" / f"{name}.csv"

    @property
    def evaluate_metrics(self) -> Path:
        return self.metrics / "evaluate.json"

    @property
    def evaluate_reports(self) -> Path:
        return self.root / "reports" / "evaluate"

    @property
    def cards(self) -> Path:
        """The model card and the data card of the release (the `register` stage)."""
        return self.root / "reports" / "cards"

    @property
    def dvc_lock(self) -> Path:
        return self.root / "dvc.lock"

    @property
    def params_file(self) -> Path:
        return self.root / "params.yaml"

    @property
    def mlruns(self) -> Path:
        """The default MLflow store: `mlflow.db` (SQLite) and `artifacts/`; never committed."""
        return self.root / "mlruns"
