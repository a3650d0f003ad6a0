"""lmms-eval's ``sparsezip`` model: a checkpoint of any registered family with a token-reduction
method between its vision tower and its LLM, answering lmms-eval's generation tasks.

    pip install "sparsezip_pl[lmms-eval]"
    python -m lmms_eval --model sparsezip \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=visionzip,budget=64 --tasks mme,pope

``--model_args`` (comma-separated ``key=value``):

* ``pretrained``: hub id or folder of the checkpoint (required);
* ``family``: the model family (``hf``, ``llava`` ...); default: read from the checkpoint's config;
* ``method`` (default ``sparsezip``), ``budget`` (visual tokens per image, or a fraction) and any
  option of the method by name (``dominant=54,contextual=10``; nested ones dotted:
  ``merging.contextual_num=8``);
* ``compressor``: a tuned compressor (folder from ``python -m sparsezip_pl export``, or its hub
  id), whose settings, weights and visual positions apply (``budget`` and options may still be
  given over them);
* ``visual_positions`` (``contiguous`` / ``original``), ``dtype`` (``auto``), ``device``,
  ``vision_tower`` and ``conv_template`` (family ``llava``);
* ``stats_path``: a JSON file to write the run's compression figures to (see below).

Prompts are built with the family's own template, exactly as ``python -m sparsezip_pl test``
builds them (the task's text as the user turn, the image first), batched with left padding, and
decoded greedily unless the task asks for sampling; the answer is cut at the task's ``until``
strings. One image per request; requests with several images or videos are refused.

What the output records: ``--model_args`` itself is stored verbatim in the results' ``config``
(so the method, budget or tuned compressor are there); the visual tokens the LLM saw are
logged through lmms-eval's throughput metrics, which land in ``results["throughput"]`` as
``avg_visual_tokens/TASK`` (mean per request), ``avg_visual_tokens`` and
``avg_stock_visual_tokens``; every logged sample (``--log_samples``) carries ``token_counts``
with the LLM's input length after compression. ``stats_path`` adds a JSON with the method's
full settings and per-task figures (one file per process, ``.rankN`` appended beyond rank 0).

Image processors: the family's processor is loaded by ``AutoProcessor`` as for the stock model,
so it uses the backend the environment offers (transformers picks torchvision's when
torchvision imports, PIL's otherwise), the same one ``python -m sparsezip_pl`` uses there.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from lmms_eval import utils as lmms_utils
from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from loguru import logger as eval_logger

from sparsezip_pl.api import build_config
from sparsezip_pl.integrations.families import detect_checkpoint_family
from sparsezip_pl.integrations.tuned import compact_config, load_tuned_compressor
from sparsezip_pl.models import CompressedLlava, load_family
from sparsezip_pl.models.batching import IMAGE_MARKER, ContextLimit, llm_context_length

DEFAULT_MAX_NEW_TOKENS = 1024  # what lmms-eval's own models use when a task sets none


def _nested(options: dict[str, Any]) -> dict[str, Any]:
    """``{"merging.contextual_num": 8}`` -> ``{"merging": {"contextual_num": 8}}``."""
    nested: dict[str, Any] = {}
    for key, value in options.items():
        target = nested
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return nested


class SparseZipLMM(lmms):
    """The ``sparsezip`` model of lmms-eval (see the module doc for its ``--model_args``)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        method: str | None = None,
        budget: int | float | None = None,
        compressor: str | None = None,
        family: str | None = None,
        visual_positions: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | str | None = None,
        vision_tower: str | None = None,
        conv_template: str | None = None,
        stats_path: str | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        from accelerate import Accelerator

        accelerator = Accelerator()
        if accelerator.num_processes > 1:
            device = f"cuda:{accelerator.local_process_index}"
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        self.accelerator = accelerator
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.pretrained = str(pretrained)
        self.family_name = family or detect_checkpoint_family(self.pretrained)
        extra = {k: v for k, v in (("vision_tower", vision_tower), ("conv_template", conv_template)) if v is not None}
        self.family = load_family(self.family_name, self.pretrained, dtype=dtype, device=device, **extra)
        options = _nested(options)
        tuned = None
        if compressor is not None:
            tuned = load_tuned_compressor(str(compressor))
            if method is not None and method != tuned.config.method:
                raise ValueError(f"method={method!r}, but the tuned compressor {compressor} is a "
                                 f"{tuned.config.method!r} compressor")
            config = build_config(tuned.config, None, budget=budget, **options)
            visual_positions = visual_positions or tuned.visual_positions
        else:
            config = build_config(None, method or "sparsezip", budget=budget, **options)
        self.model = CompressedLlava(self.family, config, visual_positions=visual_positions)
        if tuned is not None:
            tuned.load_into(self.model.compressor, self.family.num_patches, self.family_name, self.pretrained)
        self.model.eval()
        self.tuned = tuned
        self.batch_size_per_gpu = int(batch_size)
        self.builder = self.family.batch_builder("generate")
        self.stats_path = stats_path
        self._totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        settings = compact_config(config)
        self.settings = {
            "model": "sparsezip",
            "pretrained": self.pretrained,
            "family": self.family_name,
            "method": settings["method"],
            "budget": settings["budget"],
            "compressor": settings,
            "tuned_compressor": tuned.identity() if tuned is not None else None,
            "visual_positions": self.model.visual_positions,
            "dtype": str(self.family.dtype).removeprefix("torch."),
            "image_processor": type(self.family.image_processor).__name__,
        }
        eval_logger.info(f"sparsezip: {self.family_name} model {self.pretrained}, method {settings['method']}, "
                         f"budget {settings['budget']}, {self.family.num_patches} patches per image, image "
                         f"processor {self.settings['image_processor']}, device {self.family.device}")

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self.family.device

    # ------------------------------------------------------------------ requests
    def _sample(self, context: str, doc_to_visual, doc_id: int, task: str, split: str) -> dict[str, Any]:
        """A request as a sample dict of the project's data contract (the family's prompt is built from it)."""
        from PIL import Image

        doc = self.task_dict[task][split][doc_id]
        visuals = [v for v in (doc_to_visual(doc) if doc_to_visual is not None else []) or [] if v is not None]
        if len(visuals) > 1:
            raise NotImplementedError(f"{task} document {doc_id}: {len(visuals)} images; the sparsezip model "
                                      "answers one image per question")
        if visuals and not isinstance(visuals[0], Image.Image):
            raise NotImplementedError(f"{task} document {doc_id}: a {type(visuals[0]).__name__} visual; the "
                                      "sparsezip model takes images")
        return {
            "sample_id": f"{task}/{split}/{doc_id}",
            "task": task,
            "category": task,
            "image": visuals[0].convert("RGB") if visuals else None,
            "image_path": None,
            "question": context.replace(IMAGE_MARKER, "").strip(),
            "answer": None,
            "conversations": None,
            "pair_id": None,
        }

    def _context_limit(self, max_new_tokens: int) -> ContextLimit | None:
        """The project's prompt-length check: a prompt is refused, never cut."""
        positions = llm_context_length(self.family.model, self.family.tokenizer)
        if positions is None:
            return None
        visual = self.family.max_visual_tokens(self.model.compressor)
        if self.model.visual_positions == "original":
            visual = max(visual, self.family.max_stock_tokens)
        return ContextLimit(positions, visual, max_new_tokens)

    def _generated_lengths(self, generated: torch.Tensor) -> list[int]:
        """New tokens per row before the first end-of-sequence (or padding) token."""
        eos = self.family.eos_token_id
        ends = [self.family.pad_token_id] + (eos if isinstance(eos, list) else [] if eos is None else [eos])
        stop = torch.isin(generated, torch.tensor(ends, device=generated.device))
        first = torch.where(stop.any(1), stop.int().argmax(1), torch.full_like(stop[:, 0], generated.shape[1],
                                                                                dtype=torch.long))
        return first.tolist()

    def generate_until(self, requests) -> list[GenerationResult]:
        """Greedy (or the task's sampling) answers, cut at the task's ``until`` strings, batched
        ``batch_size`` at a time among requests with the same generation settings."""
        collator = lmms_utils.Collator([request.args for request in requests], lambda x: (-len(x[0]), x[3]),
                                       grouping=True)
        results: list[GenerationResult] = []
        started = time.perf_counter()
        generated_tokens = 0
        totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            contexts, all_kwargs, doc_to_visuals, doc_ids, tasks, splits = zip(*chunk)
            kwargs = dict(all_kwargs[0])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new_tokens = int(kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
            temperature = float(kwargs.get("temperature") or 0.0)
            sample = temperature > 0  # as lmms-eval's own models: temperature 0 is greedy decoding
            decoding: dict[str, Any] = {"do_sample": sample, "num_beams": int(kwargs.get("num_beams") or 1)}
            if sample:
                decoding["temperature"] = temperature
                if kwargs.get("top_p") is not None:
                    decoding["top_p"] = float(kwargs["top_p"])
            samples = [self._sample(c, v, d, t, s) for c, v, d, t, s in zip(contexts, doc_to_visuals, doc_ids,
                                                                            tasks, splits)]
            self.builder.context = self._context_limit(max_new_tokens)
            batch = self.builder(samples)
            with torch.no_grad():
                generated, compression = self.model.generate(batch, max_new_tokens=max_new_tokens, **decoding)
            texts = self.family.decode(generated)
            lengths = self._generated_lengths(generated)
            generated_tokens += sum(lengths)
            # Per sample (a tiled family's views summed): the visual tokens the LLM worked on (an
            # LLM-side method's: the mean over its layers), those its input held, the stock count.
            visual = compression.visual_tokens.cpu().tolist()
            entering = compression.num_tokens if compression.input_tokens is None else compression.input_tokens
            inputs = (batch["attention_mask"].sum(1) - batch["has_image"].long() + entering.cpu()).tolist()
            stock = compression.stock_tokens.cpu().tolist()
            for text, task, n_visual, n_input, n_stock, n_output, has_image in zip(
                    texts, tasks, visual, inputs, stock, lengths, batch["has_image"].tolist(), strict=True):
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
                results.append(GenerationResult(text, TokenCounts(input_tokens=int(n_input), output_tokens=int(n_output))))
                if has_image:
                    totals[task]["images"] += 1
                    totals[task]["visual_tokens"] += n_visual
                    totals[task]["stock_visual_tokens"] += n_stock
        elapsed = time.perf_counter() - started
        self._report(totals, elapsed, generated_tokens)
        return collator.get_original(results)

    def _report(self, totals: dict[str, dict[str, float]], elapsed: float, generated_tokens: int) -> None:
        """Per-task mean visual tokens into lmms-eval's throughput metrics, and the stats file."""
        extra: dict[str, float] = {}
        images = sum(t["images"] for t in totals.values())
        for task, figures in sorted(totals.items()):
            extra[f"visual_tokens/{task}"] = figures["visual_tokens"] / figures["images"]
            for key, value in figures.items():
                self._totals[task][key] += value
        if images:
            extra["visual_tokens"] = sum(t["visual_tokens"] for t in totals.values()) / images
            extra["stock_visual_tokens"] = sum(t["stock_visual_tokens"] for t in totals.values()) / images
        log_metrics(total_elapsed_time=elapsed, total_gen_tokens=generated_tokens,
                    avg_speed=generated_tokens / elapsed if elapsed > 0 else 0.0, additional_metrics=extra)
        eval_logger.info(f"sparsezip: {self.settings['method']} (budget {self.settings['budget']}): "
                         + ", ".join(f"{k} {v:.2f}" for k, v in extra.items()))
        if self.stats_path:
            path = Path(self.stats_path)
            if self.world_size > 1 and self.rank > 0:
                path = path.with_name(f"{path.name}.rank{self.rank}")
            per_task = {task: {"samples_with_image": int(t["images"]),
                               "visual_tokens_mean": t["visual_tokens"] / t["images"],
                               "stock_visual_tokens_mean": t["stock_visual_tokens"] / t["images"]}
                        for task, t in sorted(self._totals.items()) if t["images"]}
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({**self.settings, "tasks": per_task}, indent=2) + "\n", encoding="utf-8")

    def loglikelihood(self, requests):
        raise NotImplementedError("the sparsezip model answers generation tasks (generate_until: MME, POPE ...), "
                                  "not log-likelihood ones")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("the sparsezip model answers single-round generation tasks")
