"""The LightningModule: a frozen LLaVA plus a trainable SparseZip compressor."""

from __future__ import annotations

import dataclasses
import os
import random
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Literal

import lightning as L
import numpy as np
from lightning.pytorch.utilities import rank_zero_warn
import torch
import torch.nn.functional as F

from sparsezip_pl.compress import CompressorConfig, Geometry, build_method
from torch import nn

from sparsezip_pl.benchmarks import benchmark_names, get_benchmark
from sparsezip_pl.data.common import ANSWER_SUFFIX, SkippedSample
from sparsezip_pl.data.loader import CollatedBatch
from sparsezip_pl.models.batching import ContextLimit, llm_context_length

Objective = Literal["lm", "distill", "mix"]
_COMPRESSOR_PREFIX = "model.compressor."
_RNG_KEY = "sparsezip_rng_states"
OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


def _default_optimizer(params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)


def answer_position_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Logits that predict answer tokens, flattened in sequence order: [M, V].

    A causal LM's logits at position t predict token t + 1, so position t is kept when
    ``labels[t + 1] != -100``. Two sequences with the same answer tokens (for example the same
    sample with a different number of visual tokens) give the same M rows in the same order.
    """
    targets = labels[:, 1:] != -100
    return logits[:, :-1][targets]


def select_samples(batch: dict[str, Any], indices: list[int]) -> dict[str, Any]:
    """The rows ``indices`` of a collated batch (tensors and per-sample lists alike)."""
    size = len(batch["meta"])
    index = torch.tensor(indices, dtype=torch.long)
    picked: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size:
            picked[key] = value[index.to(value.device)]
        elif isinstance(value, list) and len(value) == size:
            picked[key] = [value[i] for i in indices]
        else:
            picked[key] = value
    return picked


class SkippingCollate:
    """A batch builder's collate for ``on_error: skip``: prompts too long for the LLM are left out
    of the batch and reported to the loader as ``prompt_too_long`` skips (picklable)."""

    def __init__(self, builder) -> None:
        self.builder = builder

    def __call__(self, samples: list[dict[str, Any]]) -> CollatedBatch:
        batch, too_long = self.builder.build(samples)
        skipped = tuple(SkippedSample(f"prompt:{e.sample_id}", e.reason, str(e)) for e in too_long)
        return CollatedBatch(batch, skipped)


class SparseZipModule(L.LightningModule):
    """Tunes a SparseZip compressor inside a frozen LLaVA and evaluates it on MME and POPE.

    The LLaVA weights load in :meth:`configure_model`, which Lightning calls after the data module
    and the callbacks are set up: a wrong data path, a run folder that is not the project's or a
    budget the tower cannot hold fails in seconds, before minutes of loading a 7B model. (Outside
    a Trainer, call ``configure_model()`` yourself.)

    Args:
        backend: a registered model family (``sparsezip_pl.models.family_names()``): ``hf``
            (transformers' llava-hf models), ``llava`` (the original LLaVA code, PyPI
            ``llava-torch``), ``llava-next`` / ``llava-next-original`` (LLaVA-1.6 in either code),
            ``llava-onevision``, ``qwen2.5-vl``; an unknown name is an error listing them.
        model_path: hub id or local folder of the LLaVA checkpoint.
        dtype: dtype of the frozen LLaVA weights. ``auto`` (the default) loads what the family's
            stock loader gives on a GPU: float16 for the original code (``load_pretrained_model``
            knows no other), the checkpoint's own dtype for llava-hf (float16 for the published
            ones); on a CPU it loads float32. ``float32``, ``bfloat16`` and ``float16`` load that
            dtype the stock way (``from_pretrained(dtype=...)``, float32 buffers kept).
        compressor: the token-reduction method and its settings (``method``, ``budget`` and the
            method's own section); the flat keys of earlier versions still read.
        visual_positions: position ids of the kept tokens, ``contiguous`` (the published methods'
            choice) or ``original`` (each token keeps its place in the stock sequence; see
            :class:`~sparsezip_pl.models.CompressedLlava`).
        objective: ``lm`` (cross-entropy on answer tokens), ``distill`` (KL from the same
            frozen model fed all visual tokens, on answer positions; needs no labels beyond the
            answer positions) or ``mix`` (``(1 - distill_weight) * lm + distill_weight * distill``).
        distill_weight: weight of the distillation term in ``mix``.
        distill_temperature: softmax temperature of the distillation KL.
        budget_target: target mean number of visual tokens per image; ``None`` disables the
            budget penalty.
        budget_weight: weight of the budget penalty ``((E[tokens] - target) / target) ** 2``.
        max_new_tokens: greedy decoding length for evaluation and prediction.
        optimizer: optimizer factory applied to the compressor's parameters only.
        family_options: options of the model family's loader, e.g. LLaVA-NeXT's
            ``{compress_views: per_view | together, newlines: occupied | all | none}``.
        compressor_path: a tuned compressor to start from (a folder written by ``python -m
            sparsezip_pl export``, or its hub id): its settings and visual positions apply and
            its weights load into the compressor. ``compressor`` settings that differ from both
            the defaults and the tuned ones are an error.
    """

    def __init__(
        self,
        backend: str = "hf",
        model_path: str = "checkpoints/tiny-llava-synth",
        dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
        compressor: CompressorConfig = CompressorConfig(),  # noqa: B008 (a default never mutated)
        visual_positions: Literal["contiguous", "original"] = "contiguous",
        objective: Objective = "distill",
        distill_weight: float = 0.5,
        distill_temperature: float = 1.0,
        budget_target: float | None = 64.0,
        budget_weight: float = 0.1,
        max_new_tokens: int = 8,
        optimizer: OptimizerFactory = _default_optimizer,
        family_options: dict[str, Any] | None = None,
        compressor_path: str | None = None,
    ) -> None:
        super().__init__()
        from sparsezip_pl.models.families import get_family, vision_patch_count

        self.save_hyperparameters(ignore=["optimizer"])
        self.tuned = None
        if compressor_path is not None:
            from sparsezip_pl.integrations.tuned import load_tuned_compressor

            self.tuned = load_tuned_compressor(compressor_path)
            compressor = self.tuned.merged_config(compressor)
            # What the run really uses (a checkpoint of it, exported, describes the tuned method).
            self.hparams["compressor"] = dataclasses.asdict(compressor)
            tuned_positions = self.tuned.visual_positions
            if tuned_positions and tuned_positions != visual_positions:
                rank_zero_warn(f"{compressor_path} was tuned with visual_positions={tuned_positions!r}; this run "
                               f"uses {visual_positions!r} (set model.visual_positions to change it)")
        compressor = CompressorConfig.coerce(compressor)
        if compressor.visual_positions is not None:
            warnings.warn("model.compressor.visual_positions is deprecated: use model.visual_positions",
                          DeprecationWarning, stacklevel=2)
            if visual_positions == "contiguous":
                visual_positions = compressor.visual_positions
        self.compressor_config = compressor
        self.visual_positions = visual_positions
        # The checkpoint a validate / test / predict run evaluates, set by the CLI before the run:
        # Lightning sets ``trainer.ckpt_path`` only after the set-up hooks that record a run's identity.
        self.evaluated_checkpoint: str | None = None
        if objective not in ("lm", "distill", "mix"):
            raise ValueError(f"objective must be 'lm', 'distill' or 'mix', got {objective!r}")
        if budget_target is not None and budget_target <= 0:
            raise ValueError(f"budget_target must be positive, got {budget_target}")
        self.objective = objective
        self.optimizer_factory = optimizer
        # The model's config alone (no weights): a budget the tower cannot hold fails now.
        num_patches = vision_patch_count(backend, model_path)
        build_method(compressor, Geometry(num_heads=1, head_dim=1, num_patches=num_patches, text_dim=1,
                                          has_cls=get_family(backend).has_cls))
        self.backend = None
        self.model = None
        # One metric per registered benchmark; each scores the records of its own task.
        self.metrics = nn.ModuleDict({name: get_benchmark(name).metric() for name in benchmark_names()})
        # Records answered by an earlier, interrupted run (``resume_from``, called by ``PredictionWriter``).
        self._completed_records: dict[str, dict[str, Any]] = {}
        #: The last evaluation's metrics, ``{"test/mme/...": value}`` (also logged).
        self.eval_results: dict[str, float] = {}
        self._rng_states_to_restore: dict[str, Any] | None = None
        self._configured_optimizer: dict[str, Any] | None = None

    def configure_model(self) -> None:
        """Load the frozen LLaVA and build the compressor (once), on the trainer's device, and
        hand the data module the backend's collate functions."""
        from sparsezip_pl.models import CompressedLlava, load_backend

        if self.model is None:
            device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
            hparams = self.hparams
            self.backend = load_backend(hparams.backend, hparams.model_path, dtype=hparams.dtype, device=device,
                                        **(hparams.family_options or {}))
            self.model = CompressedLlava(self.backend, self.compressor_config, visual_positions=self.visual_positions)
            if self.tuned is not None:
                self.tuned.load_into(self.model.compressor, self.backend.num_patches, hparams.backend,
                                     str(hparams.model_path))
        self._hand_collate_to_datamodule()

    def identity(self) -> dict[str, Any]:
        """What decides this module's answers, known without loading weights: family, checkpoint,
        dtype (and the device type ``auto`` resolves on), compressor settings, decoding and prompt
        settings. Training-only settings (objective, budget penalty, optimizer) are not part of it."""
        hparams = self.hparams
        path = str(hparams.model_path)
        device = self.trainer.strategy.root_device.type if self._trainer is not None else "cpu"
        return {
            "backend": hparams.backend,
            "model_path": os.path.abspath(path) if os.path.exists(path) else path,
            "dtype": hparams.dtype,
            "family_options": hparams.family_options or {},
            "device": device,
            "compressor": dataclasses.asdict(self.compressor_config),
            "visual_positions": self.visual_positions,
            "max_new_tokens": hparams.max_new_tokens,
            "prompt": {"answer_suffix": ANSWER_SUFFIX, "decoding": "greedy"},
            **({"tuned_compressor": self.tuned.identity()} if self.tuned is not None else {}),
        }

    def resume_from(self, records: dict[str, dict[str, Any]]) -> None:
        """Answers an earlier, interrupted run of the same identity gave (by sample id): ``test``
        and ``predict`` score them without answering those samples again."""
        self._completed_records = dict(records)

    def llm_parameter_count(self) -> int:
        """Parameters the LLM applies to every prefilled token: all of the model's minus the
        vision tower, the projector and the input and output embedding tables."""
        backend = self.backend
        model = backend.model
        excluded = {id(p) for module in (backend.vision_tower, backend.projector) for p in module.parameters()}
        for table in (model.get_input_embeddings(), model.get_output_embeddings()):
            if table is not None:
                excluded.update(id(p) for p in table.parameters())
        return sum(p.numel() for p in model.parameters() if id(p) not in excluded)

    # ----------------------------------------------------------------- batches
    def _hand_collate_to_datamodule(self) -> None:
        """Training batches (prompt, answer and labels) for instruction data, generation batches
        (prompt only) for benchmarks, including an instruction module's ``val_benchmark``."""
        from sparsezip_pl.lit.datamodules import InstructDataModule

        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "collate_fn"):
            mode = "train" if isinstance(datamodule, InstructDataModule) else "generate"
            datamodule.collate_fn = self.collate_fn(mode, getattr(datamodule, "on_error", "raise"))
            benchmark = getattr(datamodule, "val_benchmark", None)
            if benchmark is not None:
                benchmark.collate_fn = self.collate_fn("generate", benchmark.on_error)

    def collate_fn(self, mode: str, on_error: str = "raise"):
        """The backend's batch builder for ``mode``, refusing prompts that cannot fit the LLM's
        context: with ``on_error="raise"`` it raises ``PromptTooLongError`` (naming the sample
        and the lengths), with ``"skip"`` the sample is dropped and counted as ``prompt_too_long``."""
        builder = self.backend.batch_builder(mode)
        builder.context = self.context_limit(mode)
        return SkippingCollate(builder) if on_error == "skip" else builder

    def context_limit(self, mode: str) -> ContextLimit | None:
        """The length check for ``mode`` batches, with the most visual tokens an image can take:
        the family's bound under the compressor (``max_visual_tokens``), or the stock count where
        the distillation teacher runs or where tokens keep their original positions (the text
        after the image then starts that much later)."""
        positions = llm_context_length(self.backend.model, self.backend.tokenizer)
        if positions is None:
            return None
        patches = self.backend.max_stock_tokens
        visual = self.backend.max_visual_tokens(self.model.compressor)
        if (mode == "train" and self.objective != "lm") or self.visual_positions == "original":
            visual = max(visual, patches)
        new_tokens = self.hparams.max_new_tokens if mode == "generate" else 0
        return ContextLimit(positions, visual, new_tokens)

    # ---------------------------------------------------------------- training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        loss, logs, compression = self._tuning_loss(batch)
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=len(batch["input_ids"]), prog_bar=True)
        return {"loss": loss, "compression": compression}

    def _tuning_loss(self, batch: dict[str, Any]):
        """The tuning loss of a batch, its logged parts, and the compression.

        Every term is normalized over the global batch (all processes): token losses by the
        global number of answer tokens, the budget penalty on the global mean of expected tokens
        per image (text-only samples left out).
        The returned loss is scaled by the world size, so DDP's gradient average equals the
        gradient of the same global batch in one process; the logged values are the global ones.
        """
        out = self.model(batch)
        world = self._world_size()
        terms: list[tuple[str, float, torch.Tensor, torch.Tensor]] = []  # name, weight, local sum, count
        if self.objective in ("lm", "mix"):
            weight = 1.0 - self.hparams.distill_weight if self.objective == "mix" else 1.0
            terms.append(("lm", weight, *self._cross_entropy_sum(out)))
        if self.objective in ("distill", "mix"):
            with torch.no_grad():
                teacher = self.model(batch, method="none")
            weight = self.hparams.distill_weight if self.objective == "mix" else 1.0
            terms.append(("distill", weight, *self._distillation(out, teacher)))
        # The budget is per image: text-only samples (which a family may still run through the
        # compressor on a blank image; their stock count is 0) take no part in it.
        images = (out.compression.stock_tokens > 0).float()
        expected = out.compression.expected_tokens.float() * images
        local = torch.stack([t[2].detach() for t in terms] + [t[3] for t in terms]
                            + [expected.sum().detach(), images.sum()])
        totals = self._all_sum(local)
        n = len(terms)
        logs: dict[str, torch.Tensor] = {}
        loss = out.logits.new_zeros((), dtype=torch.float32)
        for i, (name, weight, total, _) in enumerate(terms):
            count = totals[n + i].clamp(min=1.0)
            logs[name] = totals[i] / count
            loss = loss + weight * world * total / count
        # The global mean of expected tokens per image, differentiable through this process's images.
        mean_expected = (expected.sum() - local[-2] + totals[-2]) / totals[-1].clamp(min=1.0)
        logs["expected_tokens"] = mean_expected.detach()
        reported = sum(weight * logs[name] for name, weight, _, _ in terms)
        if self.hparams.budget_target is not None:
            target = float(self.hparams.budget_target)
            penalty = ((mean_expected - target) / target) ** 2 * (totals[-1] > 0)  # none without images
            logs["budget_penalty"] = penalty.detach()
            loss = loss + self.hparams.budget_weight * world * penalty
            reported = reported + self.hparams.budget_weight * penalty.detach()
        logs["loss"] = reported
        # Some trainable parameters are inert for a given method (the text projection when
        # cross_beta is 0, layer gates with one layer); a zero term gives them a zero gradient so
        # that DDP's reducer finds a gradient for every parameter without find_unused_parameters.
        loss = loss + sum(p.sum() for p in self.model.trainable_parameters()) * 0.0
        return loss, logs, out.compression

    def _world_size(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def _all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over all processes (itself in a single process)."""
        if self._world_size() == 1:
            return tensor
        return self.trainer.strategy.reduce(tensor.clone(), reduce_op="sum")

    @staticmethod
    def _cross_entropy_sum(out) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed cross-entropy over the answer tokens, and their number."""
        logits = answer_position_logits(out.logits, out.labels).float()
        targets = out.labels[:, 1:][out.labels[:, 1:] != -100]
        total = F.cross_entropy(logits, targets, reduction="sum") if targets.numel() else out.logits.sum() * 0.0
        return total, logits.new_tensor(float(targets.numel()))

    def _distillation(self, student, teacher) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed KL(teacher || student) over answer positions (times T^2), and their number."""
        temperature = self.hparams.distill_temperature
        s = answer_position_logits(student.logits, student.labels).float() / temperature
        t = answer_position_logits(teacher.logits, teacher.labels).float() / temperature
        if s.shape != t.shape:
            raise RuntimeError(f"student and teacher answer positions differ: {tuple(s.shape)} vs {tuple(t.shape)}")
        count = s.new_tensor(float(s.shape[0]))
        if s.numel() == 0:
            return student.logits.sum() * 0.0, count
        kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum")
        return kl * temperature**2, count

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        if "labels" in batch:
            loss, logs, compression = self._tuning_loss(batch)
            self.log_dict({f"val/{k}": v for k, v in logs.items()}, batch_size=len(batch["input_ids"]), sync_dist=True)
            return {"loss": loss, "compression": compression}
        return self._evaluate(batch, "val")

    # ------------------------------------------------------------- evaluation
    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return self._evaluate(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return self._evaluate(batch, "predict")

    def _answer(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Greedy answers for a generation batch, with parsed answers and token counts."""
        generated, compression = self.model.generate(batch, max_new_tokens=self.hparams.max_new_tokens)
        texts = self.backend.decode(generated)
        records = []
        tokens = compression.visual_tokens.tolist()  # an LLM-side method's: the mean over decoder layers
        dominant = compression.num_dominant.tolist()
        stock = compression.stock_tokens.tolist()
        for meta, text, n_tokens, n_dominant, n_stock in zip(batch["meta"], texts, tokens, dominant, stock,
                                                             strict=True):  # one row per sample, never cut
            parser = get_benchmark(meta["task"]).parse
            records.append(
                {
                    "sample_id": meta["sample_id"],
                    "order": meta.get("order"),
                    "task": meta["task"],
                    "category": meta["category"],
                    "question": meta.get("question"),
                    "image_path": meta.get("image_path"),
                    "pair_id": meta.get("pair_id"),
                    "prediction": text,
                    "parsed": parser(text),
                    "answer": meta.get("answer"),
                    "visual_tokens": n_tokens,
                    "dominant_tokens": int(n_dominant),
                    "stock_visual_tokens": int(n_stock),
                }
            )
        return {"records": records, "compression": compression}

    def _evaluate(self, batch: dict[str, Any], stage: str) -> dict[str, Any]:
        """Answers the samples of a batch that no earlier run answered (see ``PredictionWriter``),
        and scores all of them."""
        done = self._completed_records if stage in ("test", "predict") else {}
        ids = [meta["sample_id"] for meta in batch["meta"]]
        todo = [i for i, sample_id in enumerate(ids) if sample_id not in done]
        new_records: list[dict[str, Any]] = []
        compression = None
        if todo:
            answered = self._answer(batch if len(todo) == len(ids) else select_samples(batch, todo))
            new_records, compression = answered["records"], answered["compression"]
        by_id = {record["sample_id"]: record for record in new_records}
        records = [by_id[i] if i in by_id else done[i] for i in ids]
        if stage != "predict":
            self.update_metrics(records)
        return {"records": records, "new_records": new_records, "compression": compression}

    def update_metrics(self, records: list[dict[str, Any]]) -> None:
        """Feed answered records (sample fields + ``prediction``) into the benchmarks' metrics;
        each metric keeps its own task's records and parses the raw answers itself."""
        predictions = [r["prediction"] for r in records]
        for metric in self.metrics.values():
            metric.update_from_samples(records, predictions)

    def on_validation_epoch_end(self) -> None:
        self._log_eval_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval_metrics("test")

    def _log_eval_metrics(self, stage: str) -> None:
        results: dict[str, float] = {}
        for name, metric in self.metrics.items():
            seen = metric.update_called
            if self._world_size() > 1:
                # compute() is collective: every process calls it when any process saw the task.
                seen = self.trainer.strategy.reduce_boolean_decision(seen, all=False)
                metric.prepare_for_sync()
            if seen:
                results.update({f"{stage}/{name}/{k}": float(v) for k, v in metric.compute().items()})
            metric.reset()
        self.eval_results = results
        if results:
            self.log_dict(results, sync_dist=False)

    # -------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.compressor.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"method {self.compressor_config.method!r} has no trainable parameters: there is "
                             "nothing to fit (tune sparsezip; evaluate the others with validate / test)")
        optimizer = self.optimizer_factory(params)
        # Resuming restores the optimizer's state, its settings (lr ...) included, after this;
        # on_train_start puts back the ones this run was given.
        self._configured_optimizer = [_group_settings(group) for group in optimizer.param_groups]
        return optimizer

    def on_fit_start(self) -> None:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        for logger in self.loggers:
            logger.log_hyperparams({"trainable_parameters": trainable, "frozen_parameters": frozen})
        self.print(f"SparseZip: {trainable} trainable parameters (compressor), {frozen} frozen (LLaVA)")

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the compressor's weights (the frozen LLaVA reloads from ``model_path``) and
        the random number generators' states (restored when training resumes)."""
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k: v for k, v in state.items() if k.startswith(_COMPRESSOR_PREFIX)}
        checkpoint[_RNG_KEY] = _rng_states()

    def on_train_start(self) -> None:
        # Restored here rather than at load time: the loops draw from the global generator
        # while they set up (a new DataLoader iterator takes a seed), which the interrupted run
        # had done before the checkpoint was written.
        if self._rng_states_to_restore is not None:
            _set_rng_states(self._rng_states_to_restore)
            self._rng_states_to_restore = None
        self._apply_configured_optimizer_settings()

    def _apply_configured_optimizer_settings(self) -> None:
        """A resumed fit trains with the optimizer settings it was given, not the checkpoint's.

        Lightning restores the optimizer's ``state_dict``, whose param groups carry the settings
        of the run that wrote it; a changed ``lr`` would otherwise be ignored without a word. Each
        setting that differs is set back to this run's value, with a warning naming both.
        """
        if not self._configured_optimizer or self._trainer is None or not self.trainer.optimizers:
            return
        optimizer = self.trainer.optimizers[0]
        for index, (group, wanted) in enumerate(zip(optimizer.param_groups, self._configured_optimizer)):
            for key, value in wanted.items():
                restored = group.get(key)
                if not _same_setting(restored, value):
                    rank_zero_warn(f"the checkpoint's optimizer had {key} = {restored!r} (param group {index}); "
                                   f"this run applies its own {key} = {value!r}")
                    group[key] = value

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._rng_states_to_restore = checkpoint.get(_RNG_KEY)
        # Checkpoints hold only the compressor; the frozen LLaVA weights were loaded from
        # ``model_path`` when the module was rebuilt. Fill them in so loading stays strict: a
        # half-loaded compressor would score the untuned method under the tuned name.
        state = checkpoint["state_dict"]
        _upgrade_text_gate(state)
        current = self.state_dict()
        expected = {k for k in current if k.startswith(_COMPRESSOR_PREFIX)}
        missing = sorted(expected - set(state))
        if missing:
            raise KeyError(
                f"checkpoint lacks compressor weights {missing[:5]}{' ...' if len(missing) > 5 else ''}: "
                "was it saved with a different compressor configuration (method, layers, cross_beta)?"
            )
        for key, value in current.items():
            if not key.startswith(_COMPRESSOR_PREFIX):
                state.setdefault(key, value)


def _group_settings(group: dict[str, Any]) -> dict[str, Any]:
    """An optimizer param group's settings (everything but its parameters), tensors copied."""
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in group.items() if k != "params"}


def _same_setting(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    return a == b


def _upgrade_text_gate(state: dict[str, torch.Tensor]) -> None:
    """Checkpoints written before the text term had a gate used it at full weight: gate 1."""
    for key in [k for k in state if k.endswith("scorer.text_proj.weight")]:
        gate = key.removesuffix("text_proj.weight") + "text_gate"
        if gate not in state:
            warnings.warn(f"{gate} missing from the checkpoint (saved before the text gate existed): set to 1, "
                          "the weight the text term had then", stacklevel=2)
            state[gate] = torch.ones((), dtype=state[key].dtype)


def _rng_states() -> dict[str, Any]:
    """Python's, numpy's and torch's generator states, in types that ``torch.load(weights_only=True)``
    accepts (Lightning's own helper stores numpy arrays, which it refuses)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
