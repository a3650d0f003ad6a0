"""A tuned compressor as a small folder to share: its settings, its weights and a model card.

    python -m sparsezip_pl export --ckpt_path runs/fit/version_0/checkpoints/best.ckpt tuned/
    model = sparsezip(model, compressor="tuned/")                  # or a hub id: "user/repo"
    python -m sparsezip_pl test ... --model.compressor_path tuned/
    python -m lmms_eval --model sparsezip --model_args pretrained=...,compressor=tuned/ ...

The folder holds three files:

* ``compressor.json``: the compressor's settings (the ``CompressorConfig`` as a dict: ``method``,
  ``budget`` and that method's section), the visual positions it was tuned with, the base model
  it was tuned on (``model_path``, ``family``, ``dtype``, patch count), its training data and the
  scores measured for it (see :func:`export_checkpoint`);
* ``compressor.safetensors``: the compressor's own weights, nothing of the frozen model (kilobytes);
* ``README.md``: the same facts for people (a model card).

Loading it onto a model of another architecture (another hidden size or vision tower: a weight
shape or the patch count differs) is an error; onto another checkpoint of the same shapes (another
``model_path`` or family) a warning, since the tuned weights may not carry over.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsezip_pl.compress import CompressorConfig

FORMAT = "sparsezip_pl.tuned_compressor"
FORMAT_VERSION = 1
CONFIG_FILE = "compressor.json"
WEIGHTS_FILE = "compressor.safetensors"
CARD_FILE = "README.md"
FILES = (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE)
_PREFIX = "model.compressor."


class TunedCompressorError(ValueError):
    """A tuned compressor that cannot be read, written or loaded onto the given model."""


class BaseModelWarning(UserWarning):
    """A tuned compressor loaded onto another checkpoint than the one it was tuned on."""


# ----------------------------------------------------------------------------- helpers
def compact_config(config: Any) -> dict[str, Any]:
    """The compressor settings that matter: ``method``, ``budget`` and that method's section."""
    config = CompressorConfig.coerce(config)
    compact: dict[str, Any] = {"method": config.method, "budget": config.budget}
    section = getattr(config, config.method, None)
    if section is not None and dataclasses.is_dataclass(section):
        compact[config.method] = dataclasses.asdict(section)
    return compact


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_name(path: str | os.PathLike | None) -> str | None:
    """A comparable name of a checkpoint: a hub id as given; a folder of the Hugging Face cache
    (``models--owner--name/snapshots/...``) as ``owner/name``; another folder by its own name."""
    if path is None:
        return None
    from sparsezip_pl.models.loading import _looks_like_local_path

    text = str(path).rstrip("/\\")
    parts = Path(text).parts
    for i, part in enumerate(parts[:-1]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            return part[len("models--"):].replace("--", "/")
    if os.path.exists(text) or _looks_like_local_path(text):
        return Path(text).name
    return text


def same_model(a: str | os.PathLike | None, b: str | os.PathLike | None) -> bool:
    """Whether two ``model_path`` values name the same checkpoint (a hub id and a downloaded copy
    of it count as the same: they end in the same name)."""
    if a is None or b is None:
        return True  # unknown: nothing to compare
    if str(a) == str(b):
        return True
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    name_a, name_b = model_name(a), model_name(b)
    return name_a == name_b or name_a.rsplit("/", 1)[-1] == name_b.rsplit("/", 1)[-1]


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, Path):
        return str(value)
    return str(value)


# ----------------------------------------------------------------------------- loading
def resolve_source(source: str | os.PathLike) -> Path:
    """The local folder of a tuned compressor: ``source`` itself, or the snapshot of a hub id
    (``owner/name``, optionally ``owner/name@revision``) downloaded with
    ``huggingface_hub.snapshot_download``; offline mode (``HF_HUB_OFFLINE``) uses the cache only."""
    from sparsezip_pl.models.loading import (
        DOWNLOAD_COMMAND,
        ModelNotAvailableError,
        _looks_like_local_path,
        is_offline,
    )

    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise TunedCompressorError(f"{path} is not a tuned compressor folder: no {CONFIG_FILE} "
                                       "(write one with `python -m sparsezip_pl export --ckpt_path CKPT OUT/`)")
        return path
    if path.exists() or _looks_like_local_path(text):
        raise TunedCompressorError(f"tuned compressor folder {text!r} does not exist")
    import huggingface_hub

    repo_id, _, revision = text.partition("@")
    offline = is_offline()
    try:
        folder = huggingface_hub.snapshot_download(repo_id=repo_id, revision=revision or None,
                                                   allow_patterns=list(FILES), local_files_only=offline)
    except Exception as error:  # noqa: BLE001 - the hub client raises many types
        where = "offline mode is on (HF_HUB_OFFLINE) and it is not in the Hugging Face cache" if offline else str(error)
        raise ModelNotAvailableError(
            f"The tuned compressor {text!r} is neither a local folder nor available from the Hugging Face hub: "
            f"{where}.\nOn a machine with network access run\n    {DOWNLOAD_COMMAND} {repo_id} --local-dir "
            f"{repo_id.split('/')[-1]}\nand pass that folder."
        ) from None
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise TunedCompressorError(f"hub repository {repo_id!r} holds no {CONFIG_FILE}: not a tuned compressor")
    return folder


@dataclasses.dataclass
class TunedCompressor:
    """A tuned compressor read from its folder (see the module doc)."""

    source: str
    folder: Path
    info: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    weights_sha256: str

    @classmethod
    def load(cls, source: str | os.PathLike) -> TunedCompressor:
        """Read a tuned compressor from a folder or a hub id (see :func:`resolve_source`)."""
        from safetensors.torch import load_file

        folder = resolve_source(source)
        try:
            info = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise TunedCompressorError(f"{folder / CONFIG_FILE}: unreadable ({error})") from None
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            raise TunedCompressorError(f"{folder / CONFIG_FILE} is not a tuned compressor description "
                                       f"(no \"format\": \"{FORMAT}\")")
        if int(info.get("format_version", 0)) > FORMAT_VERSION:
            raise TunedCompressorError(f"{folder / CONFIG_FILE} has format_version {info['format_version']}; this "
                                       f"version of sparsezip_pl reads up to {FORMAT_VERSION}: upgrade sparsezip_pl")
        weights = folder / WEIGHTS_FILE
        if not weights.is_file():
            raise TunedCompressorError(f"{folder} has no {WEIGHTS_FILE}")
        digest = _sha256(weights)
        recorded = info.get("weights", {}).get("sha256")
        if recorded and recorded != digest:
            raise TunedCompressorError(f"{weights}: sha256 {digest} differs from the {recorded} recorded in "
                                       f"{CONFIG_FILE} (a damaged or edited file)")
        try:
            CompressorConfig.coerce(info.get("compressor"))
        except Exception as error:  # noqa: BLE001 - a config error of any kind, named with the file
            raise TunedCompressorError(f"{folder / CONFIG_FILE}: bad \"compressor\" settings: {error}") from None
        return cls(str(source), folder, info, load_file(str(weights)), digest)

    @property
    def config(self) -> CompressorConfig:
        """The compressor settings it was tuned with."""
        return CompressorConfig.coerce(self.info["compressor"])

    @property
    def visual_positions(self) -> str | None:
        return self.info.get("visual_positions")

    @property
    def base_model(self) -> dict[str, Any]:
        return dict(self.info.get("base_model") or {})

    def identity(self) -> dict[str, Any]:
        """What a run using it must record: where it came from and its weights' digest."""
        source = os.path.abspath(self.source) if os.path.exists(self.source) else self.source
        return {"source": source, "sha256": self.weights_sha256}

    def merged_config(self, given: Any = None) -> CompressorConfig:
        """The settings to run with: the tuned ones. ``given`` settings that are neither the
        defaults nor the tuned ones are an error naming them (they would silently replace the
        settings the weights were tuned with)."""
        tuned = self.config
        if given is None:
            return tuned
        given = CompressorConfig.coerce(given)
        if given == CompressorConfig() or given == tuned:
            return tuned
        ours, theirs = compact_config(given), compact_config(tuned)
        differences = _differences(ours, theirs)
        raise TunedCompressorError(
            f"the compressor settings given differ from those of the tuned compressor {self.source}: "
            + "; ".join(f"{key}: given {a!r}, tuned {b!r}" for key, (a, b) in sorted(differences.items()))
            + ". Leave the compressor settings out (the tuned ones apply), or export another compressor."
        )

    def check_model(self, compressor: nn.Module, num_patches: int | None, family: str | None,
                    model_path: str | None) -> None:
        """Refuse a model of another architecture (error) and warn about another checkpoint."""
        base = self.base_model
        where = f"{self.source} was tuned on {base.get('model_path')!r} (family {base.get('family')!r})"
        expected = compressor.state_dict()
        missing = sorted(set(expected) - set(self.state_dict))
        unexpected = sorted(set(self.state_dict) - set(expected))
        if missing or unexpected:
            raise TunedCompressorError(
                f"{where}; its weights do not match the method its settings build (missing {missing}, unexpected "
                f"{unexpected}): was it written by another version of sparsezip_pl?")
        tuned_patches = base.get("num_patches")
        if tuned_patches is not None and num_patches is not None and int(tuned_patches) != int(num_patches):
            raise TunedCompressorError(
                f"{where} with {tuned_patches} patches per image; this model ({model_path!r}) has {num_patches}: "
                "another vision tower. A tuned compressor loads only onto the architecture it was tuned on.")
        shapes = [(key, tuple(self.state_dict[key].shape), tuple(value.shape)) for key, value in expected.items()
                  if tuple(self.state_dict[key].shape) != tuple(value.shape)]
        if shapes:
            listed = "; ".join(f"{key}: {a} tuned, {b} here" for key, a, b in shapes[:4])
            raise TunedCompressorError(
                f"{where}; it does not fit this model ({model_path!r}): weight shapes differ ({listed}), so the "
                "model has another hidden size or vision tower. A tuned compressor loads only onto the "
                "architecture it was tuned on.")
        if family is not None and base.get("family") is not None and _family(base["family"]) != _family(family):
            warnings.warn(f"{where}; loading it onto a model of family {family!r} ({model_path!r}): the shapes fit, "
                          "but the tuned weights may not carry over", BaseModelWarning, stacklevel=3)
        elif not same_model(base.get("model_path"), model_path):
            warnings.warn(f"{where}; loading it onto another checkpoint, {model_path!r}: the shapes fit, but the "
                          "tuned weights may not carry over", BaseModelWarning, stacklevel=3)

    def load_into(self, compressor: nn.Module, num_patches: int | None = None, family: str | None = None,
                  model_path: str | None = None) -> nn.Module:
        """Check the model (:meth:`check_model`) and copy the tuned weights into ``compressor``
        (a method module built from :attr:`config` for the model)."""
        self.check_model(compressor, num_patches, family, model_path)
        expected = compressor.state_dict()
        compressor.load_state_dict({key: value.to(device=expected[key].device, dtype=expected[key].dtype)
                                    for key, value in self.state_dict.items()}, strict=True)
        return compressor


def load_tuned_compressor(source: str | os.PathLike | TunedCompressor) -> TunedCompressor:
    """A :class:`TunedCompressor` from a folder, a hub id, or itself."""
    return source if isinstance(source, TunedCompressor) else TunedCompressor.load(source)


def model_path_of(model: nn.Module) -> str | None:
    """The ``from_pretrained`` path of a loaded model (``config._name_or_path``), if known."""
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or None


def _family(name: str) -> str:
    """A family's registered name (aliases resolved; an unknown name as given)."""
    from sparsezip_pl.models.families import get_family

    try:
        return get_family(name).family
    except ValueError:
        return name


def _differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
    out: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out.update(_differences(x, y, f"{prefix}{key}."))
        elif x != y:
            out[f"{prefix}{key}"] = (x, y)
    return out


# ----------------------------------------------------------------------------- export
def _run_dir_of(ckpt_path: Path) -> Path:
    """A logger's version folder holds ``checkpoints/X.ckpt``; otherwise the checkpoint's folder."""
    return ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent


def _training_data(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The training data a datamodule saved in the checkpoint (``InstructDataModule.state_dict``)."""
    for key, value in checkpoint.items():
        if isinstance(value, dict) and isinstance(value.get("train"), dict) and "train_source" in value["train"]:
            return {"datamodule": key, **value["train"]}
    return None


def _monitored_scores(checkpoint: dict[str, Any], ckpt_path: Path) -> list[dict[str, Any]]:
    """What the checkpoint's ``ModelCheckpoint`` callbacks monitored, and the value when it was saved."""
    scores = []
    for state in (checkpoint.get("callbacks") or {}).values():
        if not isinstance(state, dict) or not state.get("monitor"):
            continue
        best_path = state.get("best_model_path") or ""
        current = state.get("current_score")
        best = state.get("best_model_score")
        scores.append({
            "metric": state["monitor"],
            "value": None if current is None else float(current),
            "best_value": None if best is None else float(best),
            "is_best": bool(best_path) and Path(best_path).name == ckpt_path.name,
        })
    return scores


def _evaluates(record: dict[str, Any], folder: Path, ckpt_path: Path, ckpt_sha256: str,
               settings: dict[str, Any]) -> bool:
    """Whether the run recorded in ``folder`` evaluated this checkpoint with its own settings.

    The checkpoint is recognised by the sha256 in the run's identity; a record without one (the
    trainer learns its ``ckpt_path`` only after the callbacks' set-up) by the ``ckpt_path`` of the
    run's ``config.yaml`` naming the same file, unchanged since the run started. The run's model
    settings (compressor, model, visual positions) must be the checkpoint's: a test of the same
    weights with another budget is not this compressor's score.
    """
    identity = record.get("identity") or {}
    model = identity.get("model") or {}
    try:
        same_settings = (compact_config(model.get("compressor")) == settings["compressor"]
                         and same_model(model.get("model_path"), settings["model_path"])
                         and model.get("visual_positions", "contiguous") == settings["visual_positions"])
    except Exception:  # noqa: BLE001 - a record of another version: not comparable
        return False
    if not same_settings:
        return False
    checkpoint = identity.get("checkpoint")
    if checkpoint:
        return checkpoint.get("sha256") == ckpt_sha256
    config_file = folder / "config.yaml"
    if not config_file.is_file():
        return False
    import yaml

    try:
        given = (yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}).get("ckpt_path")
        if not given or not os.path.isfile(given) or not os.path.samefile(given, ckpt_path):
            return False
        started = min(time.mktime(time.strptime(run["started"], "%Y-%m-%d %H:%M:%S")) for run in record["runs"])
    except Exception:  # noqa: BLE001 - an unreadable config or record: not this checkpoint's
        return False
    return ckpt_path.stat().st_mtime <= started + 1.0  # not rewritten after the run started


def _evaluations(ckpt_path: Path, ckpt_sha256: str, settings: dict[str, Any], roots: list[Path]) -> list[dict[str, Any]]:
    """``results.json`` / ``results-validate.json`` of the runs under ``roots`` that evaluated
    this checkpoint (see :func:`_evaluates`)."""
    from sparsezip_pl.lit.run_folder import RECORD_NAME

    records: set[Path] = set()
    for root in roots:
        for pattern in (RECORD_NAME, f"*/{RECORD_NAME}", f"*/*/{RECORD_NAME}"):
            records.update(path.resolve() for path in root.glob(pattern))
    found = []
    for record_path in sorted(records):
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if not _evaluates(record, record_path.parent, ckpt_path, ckpt_sha256, settings):
            continue
        identity = record.get("identity") or {}
        for name, stage in (("results.json", "test"), ("results-validate.json", "validate")):
            path = record_path.parent / name
            if not path.is_file():
                continue
            found.append({
                "stage": stage,
                "status": record.get("status"),
                "run": str(record_path.parent),
                "data": (identity.get("data") or {}).get("sources", identity.get("data")),
                "metrics": json.loads(path.read_text(encoding="utf-8")),
            })
    return found


def export_checkpoint(ckpt_path: str | os.PathLike, out_dir: str | os.PathLike,
                      runs: list[str | os.PathLike] | None = None, overwrite: bool = False) -> Path:
    """Write the tuned compressor of a training checkpoint to ``out_dir`` (see the module doc).

    The model card's facts come from the checkpoint (the model settings, the compressor's
    weights, the training data its datamodule saved, the metric its ``ModelCheckpoint``
    monitored), from the run folder that wrote it (the validation data) and from the finished
    ``test`` / ``validate`` runs of this very checkpoint (same sha256) found under ``runs``
    (default: the logger's folder above the checkpoint's run, e.g. ``runs/``).
    """
    from safetensors.torch import save_file

    from sparsezip_pl import __version__
    from sparsezip_pl.cli import read_checkpoint

    ckpt_path = Path(ckpt_path)
    checkpoint = read_checkpoint(ckpt_path)
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    if "compressor" not in hparams or "model_path" not in hparams:
        raise TunedCompressorError(f"{ckpt_path} was not written by sparsezip_pl's SparseZipModule "
                                   "(no compressor / model_path hyperparameters)")
    weights = {key[len(_PREFIX):]: value.detach().cpu().contiguous()
               for key, value in checkpoint["state_dict"].items() if key.startswith(_PREFIX)}
    if not weights:
        raise TunedCompressorError(f"{ckpt_path} holds no compressor weights: nothing was tuned")
    config = compact_config(hparams["compressor"])
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise TunedCompressorError(f"{out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise TunedCompressorError(f"{out} is not empty; choose a new folder, or pass --overwrite "
                                   f"(it replaces only {', '.join(FILES)})")
    out.mkdir(parents=True, exist_ok=True)

    family, model_path = hparams.get("backend"), str(hparams["model_path"])
    try:
        from sparsezip_pl.models.families import vision_patch_count

        num_patches = vision_patch_count(family, model_path)
    except Exception:  # noqa: BLE001 - the base model need not be on this machine
        num_patches = None
    ckpt_sha256 = _sha256(ckpt_path)
    run_dir = _run_dir_of(ckpt_path.resolve())
    roots = [Path(r) for r in runs] if runs else [run_dir.parent.parent if ckpt_path.parent.name == "checkpoints"
                                                  else run_dir]
    fit_record = run_dir / "sparsezip_run.json"
    fit_data = None
    if fit_record.is_file():
        try:
            fit_data = json.loads(fit_record.read_text(encoding="utf-8")).get("identity", {}).get("data")
        except (OSError, json.JSONDecodeError):
            fit_data = None
    validation = (fit_data or {}).get("val_benchmark") or (fit_data or {}).get("val")

    save_file(weights, str(out / WEIGHTS_FILE), metadata={"format": "pt", "producer": "sparsezip_pl",
                                                          "method": config["method"]})
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sparsezip_pl_version": __version__,
        "compressor": config,
        "visual_positions": hparams.get("visual_positions", "contiguous"),
        "base_model": {"model_path": model_path, "family": family, "dtype": hparams.get("dtype"),
                       "num_patches": num_patches},
        "weights": {"file": WEIGHTS_FILE, "sha256": _sha256(out / WEIGHTS_FILE),
                    "parameters": int(sum(v.numel() for v in weights.values())),
                    "shapes": {k: list(v.shape) for k, v in sorted(weights.items())}},
        "training": {
            "checkpoint": {"file": ckpt_path.name, "sha256": ckpt_sha256},
            "global_step": checkpoint.get("global_step"),
            "epoch": checkpoint.get("epoch"),
            "objective": hparams.get("objective"),
            "budget_target": hparams.get("budget_target"),
            "data": _training_data(checkpoint),
            "validation_data": validation,
        },
        "scores": {
            "monitored": _monitored_scores(checkpoint, ckpt_path),
            "evaluations": _evaluations(ckpt_path, ckpt_sha256, {
                "compressor": config, "model_path": model_path,
                "visual_positions": hparams.get("visual_positions", "contiguous")}, roots),
        },
    }
    info = json.loads(json.dumps(info, default=_jsonable))
    (out / CONFIG_FILE).write_text(json.dumps(info, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    (out / CARD_FILE).write_text(model_card(info), encoding="utf-8")
    return out


_HEADLINE = ("perception_total", "cognition_total", "/accuracy", "/f1", "tokens_mean")


def _headline(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics worth a line in the card: MME totals, POPE accuracy / F1 (averages), tokens."""
    shown = {k: v for k, v in metrics.items()
             if any(h in k for h in _HEADLINE) and ("/pope/" not in k or "/avg" in k)}
    return shown or dict(list(metrics.items())[:8])


def model_card(info: dict[str, Any]) -> str:
    """The README.md of a tuned compressor folder, from its ``compressor.json``."""
    config, base, training = info["compressor"], info["base_model"], info["training"]
    scores = info["scores"]
    method, budget = config["method"], config.get("budget")
    budget_text = "the method's default budget" if budget is None else (
        f"{budget} visual tokens per image" if isinstance(budget, int) else f"{budget:g} of the stock visual tokens")
    from sparsezip_pl.models.loading import _looks_like_local_path

    path = base.get("model_path")
    hub_base = path if path and not os.path.exists(path) and not _looks_like_local_path(path) else None
    lines = ["---", "library_name: sparsezip_pl", "tags:", "- visual-token-compression", f"- {method}"]
    if hub_base:
        lines.append(f"base_model: {hub_base}")
    lines += ["---", "", f"# Tuned `{method}` compressor for {base.get('model_path')}", "",
              f"A visual-token compressor tuned with sparsezip_pl: method `{method}`, {budget_text}, "
              f"{info['weights']['parameters']} tuned parameters (`{WEIGHTS_FILE}`; the frozen model is not "
              "included). The settings and these facts are in `compressor.json`.", "",
              "## Use", "", "```python", "from sparsezip_pl import sparsezip",
              "model = sparsezip(model, compressor=\"THIS_FOLDER_OR_HUB_ID\")", "```", "", "```bash",
              "python -m sparsezip_pl test --config CONFIG.yaml --model.compressor_path THIS_FOLDER_OR_HUB_ID",
              f"python -m lmms_eval --model sparsezip --model_args pretrained={base.get('model_path')},"
              "compressor=THIS_FOLDER_OR_HUB_ID --tasks mme,pope", "```", "",
              "## Base model", "",
              "| model_path | family | dtype | patches per image | visual positions |", "|---|---|---|---|---|",
              f"| {base.get('model_path')} | {base.get('family')} | {base.get('dtype')} | "
              f"{base.get('num_patches') if base.get('num_patches') is not None else 'not recorded'} | "
              f"{info.get('visual_positions')} |", "",
              "Loading it onto another architecture (hidden size, vision tower) is an error; onto another "
              "checkpoint of the same shapes, a warning.", "", "## Training", ""]
    data = training.get("data")
    if data:
        lines.append(f"- data: `{data.get('train_source')}` ({(data.get('train') or {}).get('samples')} samples, "
                     f"sha256 `{(data.get('train') or {}).get('digest')}`, max_samples {data.get('max_samples')}, "
                     f"split {data.get('hf_split')})")
    else:
        lines.append("- data: not recorded in the checkpoint")
    if training.get("validation_data"):
        sources = training["validation_data"].get("sources", training["validation_data"])
        lines.append(f"- validated on: `{json.dumps(sources, sort_keys=True)}`")
    lines += [f"- objective: {training.get('objective')}, budget target {training.get('budget_target')}, "
              f"{training.get('global_step')} steps (epoch {training.get('epoch')})",
              f"- checkpoint: `{training['checkpoint']['file']}` (sha256 `{training['checkpoint']['sha256']}`)",
              "", "## Scores", ""]
    if not scores["monitored"] and not scores["evaluations"]:
        lines.append("No measured scores were found: the checkpoint monitored no metric, and no finished "
                     "`test` / `validate` run of this checkpoint was found beside it.")
    for item in scores["monitored"]:
        value = "not recorded" if item["value"] is None else f"{item['value']:.4g}"
        best = "" if item["best_value"] is None else f" (best of the run: {item['best_value']:.4g}" + (
            ", this checkpoint)" if item["is_best"] else ")")
        lines.append(f"- monitored during training: `{item['metric']}` = {value} when this checkpoint was saved{best}")
    for item in scores["evaluations"]:
        lines += ["", f"`{item['stage']}` run `{item['run']}` ({item['status']}), data "
                  f"`{json.dumps(item['data'], sort_keys=True)}`:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in sorted(_headline(item["metrics"]).items())]
    lines += ["", "## Settings", "", "```json", json.dumps(config, indent=2), "```", ""]
    return "\n".join(lines)
