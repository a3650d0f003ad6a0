"""MME (Fu et al., "MME: A Comprehensive Evaluation Benchmark for Multimodal Large Language Models"):
14 yes/no subtasks, read from the official release folder or the Hugging Face parquet release.

The prompt is LLaVA-1.5's (" Please answer yes or no." dropped, the short-answer line added), the
answer rule and the scores (acc + acc+ per subtask, perception and cognition totals) are MME's
own, and ``export`` writes the ``SUBTASK.txt`` files its calculation script reads.

Subtask selection: ``subtasks=None`` means "all 14": subtasks absent from the source are left out
with a warning naming them (users often have only part of the release). Names given explicitly
must exist in the source, and unknown names are an error listing the valid ones.

A question pair (the two questions of one image) is kept or skipped as a unit, since acc+ scores
pairs: MME skip counts are in images (pairs).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sparsezip_pl.benchmarks.base import Benchmark, register_benchmark
from sparsezip_pl.benchmarks.metrics import (
    DeduplicatedMetric,
    category_index,
    check_lengths,
    ground_truth,
    partial_name,
    stable_id,
)
from sparsezip_pl.data.common import (
    ANSWER_SUFFIX,
    DataError,
    IssueHandler,
    RecordDataset,
    SkipLedger,
    check_names,
    image_column,
    load_hf_dataset,
    looks_like_hub_id,
    make_record,
    normalize_yes_no,
    parquet_files,
    require_columns,
    require_nonempty,
    verify_record_images,
)
from sparsezip_pl.data.images import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

MME_PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MME_SUBTASKS = MME_PERCEPTION + MME_COGNITION
MME_RELEASE_FOLDER = "MME_Benchmark_release_version"
_PLEASE = " Please answer yes or no."


def mme_prompt(question: str) -> str:
    """The LLaVA-1.5 MME prompt: drop " Please answer yes or no.", add the short-answer line."""
    return question.replace(_PLEASE, "") + ANSWER_SUFFIX


def find_mme_root(path: str | Path) -> Path | None:
    """The folder holding the subtask folders: ``path`` itself or its release sub-folder."""
    path = Path(path)
    for candidate in (path, path / MME_RELEASE_FOLDER, path / "MME_Benchmark"):
        if candidate.is_dir() and any((candidate / s).is_dir() for s in MME_SUBTASKS):
            return candidate
    return None


def _select(requested: list[str] | None, present: Iterable[str], source: str) -> list[str]:
    """Subtasks to read, in canonical order (see the module doc for the absent-subtask rule)."""
    present = set(present)
    if requested is None:
        absent = [s for s in MME_SUBTASKS if s not in present]
        if absent:
            log.warning("MME source %s lacks subtask(s) %s; evaluating the %d present",
                        source, absent, 14 - len(absent))
        return [s for s in MME_SUBTASKS if s in present]
    missing = [s for s in requested if s not in present]
    if missing:
        raise DataError(f"{source}: requested MME subtask(s) {missing} not found; present: "
                        f"{[s for s in MME_SUBTASKS if s in present]}", "unknown_subtask")
    return [s for s in MME_SUBTASKS if s in requested]


def _pair_records(
    subtask: str,
    image_name: str,
    questions: list[tuple[str, str]],
    image_file: str | None = None,
    image_rows: tuple[int, int] | None = None,
    image_path: str | None = None,
) -> list[dict[str, Any]]:
    stem = image_name.rsplit(".", 1)[0]
    pair_id = f"{subtask}/{stem}"
    return [
        make_record(
            sample_id=f"{subtask}/{image_name}#{k}",
            task="mme",
            category=subtask,
            skip_key=pair_id,
            image_file=image_file,
            image_row=None if image_rows is None else image_rows[k],
            image_path=image_path,
            question=mme_prompt(question),
            answer=answer,
            pair_id=pair_id,
        )
        for k, (question, answer) in enumerate(questions)
    ]


def _parse_txt(txt: Path, pair_key: str, handle: IssueHandler) -> list[tuple[str, str]] | None:
    """Two ``question<TAB>answer`` lines -> [(question, "yes"/"no")] or None after an issue.

    A line with another number of tab-separated fields, or an empty question, means something
    else than MME's layout says: an issue naming the file and line, never a guess.
    """
    try:
        text = txt.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        handle("malformed_pair", pair_key, f"{txt}: cannot read: {err}")
        return None
    lines = [(lineno, line) for lineno, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if len(lines) != 2:
        handle("malformed_pair", pair_key,
               f"{txt}: expected 2 lines 'question<TAB>answer', found {len(lines)}")
        return None
    pairs = []
    for lineno, line in lines:
        fields = line.split("\t")
        if len(fields) != 2:
            handle("malformed_pair", pair_key,
                   f"{txt}: line {lineno}: expected 'question<TAB>answer', found {len(fields)} tab-separated "
                   f"field{'s' if len(fields) != 1 else ''}")
            return None
        question, raw = fields[0].strip(), fields[1]
        if not question:
            handle("malformed_pair", pair_key, f"{txt}: line {lineno}: empty question")
            return None
        answer = normalize_yes_no(raw)
        if answer is None:
            handle("bad_answer", pair_key, f"{txt}: line {lineno}: answer {raw.strip()!r} is not Yes/No")
            return None
        pairs.append((question, answer))
    return pairs


def read_mme_folder(
    root: Path, subtasks: list[str] | None, handle: IssueHandler, max_per_category: int | None = None
) -> list[dict[str, Any]]:
    """Records from the official folder layout (either variant per subtask)."""
    present = [s for s in MME_SUBTASKS if (root / s).is_dir()]
    records: list[dict[str, Any]] = []
    for subtask in _select(subtasks, present, str(root)):
        folder = root / subtask
        if (folder / "questions_answers_YN").is_dir():
            txt_dir, img_dir = folder / "questions_answers_YN", folder / "images"
        else:
            txt_dir = img_dir = folder
        images: dict[str, Path] = {}
        if img_dir.is_dir():
            for f in sorted(img_dir.iterdir()):
                if f.suffix.lower() in IMAGE_EXTENSIONS:
                    images.setdefault(f.stem, f)
        n_pairs = 0
        for txt in sorted(txt_dir.glob("*.txt")):
            if max_per_category is not None and n_pairs >= max_per_category:
                break
            pair_key = f"{subtask}/{txt.stem}"
            image = images.get(txt.stem)
            if image is None:
                handle("missing_image", pair_key,
                       f"{txt}: image {txt.stem}.jpg/.png not found in {img_dir}")
                continue
            questions = _parse_txt(txt, pair_key, handle)
            if questions is None:
                continue
            records += _pair_records(subtask, image.name, questions, image_file=str(image))
            n_pairs += 1
    return records


def read_mme_parquet(
    ds: Any, source: str, subtasks: list[str] | None, handle: IssueHandler, max_per_category: int | None = None
) -> list[dict[str, Any]]:
    """Records from the Hugging Face release (question_id, image, question, answer, category)."""
    require_columns(ds, ("question_id", "image", "question", "answer", "category"), source)
    meta = ds.select_columns(["question_id", "question", "answer", "category"]).to_list()
    groups: dict[str, list[int]] = {}
    for row, item in enumerate(meta):
        groups.setdefault(str(item["question_id"]), []).append(row)
    good_groups: dict[str, list[int]] = {}
    for qid, rows in groups.items():
        bad = [r for r in rows if meta[r]["category"] not in MME_SUBTASKS]
        if bad:
            handle("unknown_subtask", qid, f"{source}: row {bad[0]} ({qid}): unknown category "
                   f"{meta[bad[0]]['category']!r}; valid: {list(MME_SUBTASKS)}")
        elif len({meta[r]["category"] for r in rows}) > 1:
            handle("bad_field", qid, f"{source}: question_id {qid}: rows {rows} disagree on 'category'")
        else:
            good_groups[qid] = rows
    chosen = _select(subtasks, {meta[rows[0]]["category"] for rows in good_groups.values()}, source)
    per_category: dict[str, list[dict[str, Any]]] = {s: [] for s in chosen}
    for qid, rows in good_groups.items():
        category = meta[rows[0]]["category"]
        if category not in per_category:
            continue
        if max_per_category is not None and len(per_category[category]) >= 2 * max_per_category:
            continue
        image_name = qid.rsplit("/", 1)[-1]
        pair_key = f"{category}/{image_name.rsplit('.', 1)[0]}"
        if len(rows) != 2:
            handle("malformed_pair", pair_key,
                   f"{source}: question_id {qid}: expected 2 questions, found {len(rows)} (rows {rows})")
            continue
        questions = []
        for r in rows:
            answer = normalize_yes_no(meta[r]["answer"])
            if answer is None:
                handle("bad_answer", pair_key,
                       f"{source}: row {r} ({qid}): answer {meta[r]['answer']!r} is not Yes/No")
                break
            if not isinstance(meta[r]["question"], str) or not meta[r]["question"].strip():
                handle("bad_field", pair_key, f"{source}: row {r} ({qid}): field 'question' is empty or not text")
                break
            questions.append((meta[r]["question"].strip(), answer))
        else:
            per_category[category] += _pair_records(
                category, image_name, questions, image_rows=(rows[0], rows[1]), image_path=qid
            )
    return [r for s in chosen for r in per_category[s]]


def build_mme_dataset(
    source: str,
    subtasks: list[str] | None = None,
    on_error: str = "raise",
    ledger: SkipLedger | None = None,
    hf_split: str = "test",
    cache_dir: str | None = None,
    max_per_category: int | None = None,
    verify_images: bool = False,
) -> RecordDataset:
    """Build the MME data set from a release folder, a folder/file of parquet, or a hub id.

    Args:
        source: ``MME_Benchmark_release_version/`` (or its parent), parquet file(s), or a hub id.
        subtasks: subtask names; None = every subtask present (see the module doc).
        on_error: ``"raise"`` or ``"skip"``.
        ledger: where skips are counted.
        hf_split: split of the parquet / hub release.
        cache_dir: ``datasets`` cache folder for parquet / hub sources.
        max_per_category: keep only the first N images (pairs) of each subtask.
        verify_images: decode every image now (no lazy skips later).
    """
    subtasks = check_names(subtasks, MME_SUBTASKS, "MME subtask")
    handle = IssueHandler(on_error, ledger, "mme")
    image_rows = None
    root = find_mme_root(source) if Path(source).is_dir() else None
    if root is not None:
        records = read_mme_folder(root, subtasks, handle, max_per_category)
    elif (Path(source).exists() and parquet_files(Path(source), hf_split)) or looks_like_hub_id(source):
        ds = load_hf_dataset(source, hf_split, cache_dir)
        records = read_mme_parquet(ds, source, subtasks, handle, max_per_category)
        image_rows = image_column(ds)
    else:
        raise DataError(
            f"{source}: not an MME source (expected a folder with subtask folders such as "
            f"'existence/', a '{MME_RELEASE_FOLDER}/' folder, parquet files, or a hub id)",
            "bad_field",
        )
    dataset = RecordDataset(records, name="mme", on_error=on_error, image_rows=image_rows)
    if verify_images:
        records = verify_record_images(records, dataset, handle)
        dataset = RecordDataset(records, name="mme", on_error=on_error, image_rows=image_rows)
    require_nonempty(records, source, handle.ledger)
    return dataset


def parse_mme_answer(text: str) -> str:
    """MME rule: returns ``"yes"``, ``"no"`` or ``"other"`` (always scored wrong).

    Lower-case, strip, drop every "."; "yes"/"no" as is; a single letter y/n maps to yes/no;
    otherwise "yes", then "no", is looked for in the first four characters; else "other".
    """
    answer = text.lower().strip().replace(".", "")
    if answer in ("yes", "no"):
        return answer
    if answer == "y":
        return "yes"
    if answer == "n":
        return "no"
    prefix = answer[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def write_mme_export(out_dir: str | Path, rows: Iterable[dict[str, Any]]) -> list[Path]:
    """Write MME's own result layout: one ``SUBTASK.txt`` per subtask, lines
    ``image<TAB>question<TAB>ground truth<TAB>prediction``.

    ``rows`` are dicts with the sample keys ``sample_id``, ``category``, ``question`` (the prompt),
    ``answer`` (ground truth) plus ``prediction`` (raw model text). The question written is the
    prompt without the short-answer line plus " Please answer yes or no."; tabs and newlines in a
    prediction become spaces. Returns the files written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines: dict[str, list[str]] = {}
    for row in rows:
        image = row["sample_id"].rsplit("#", 1)[0].rsplit("/", 1)[-1]
        question = row["question"].removesuffix(ANSWER_SUFFIX)
        if not question.endswith(_PLEASE):
            question += _PLEASE
        prediction = " ".join(str(row["prediction"]).split())
        truth = row["answer"].capitalize()
        lines.setdefault(row["category"], []).append(f"{image}\t{question}\t{truth}\t{prediction}")
    written = []
    for subtask, body in lines.items():
        path = out_dir / f"{subtask}.txt"
        path.write_text("\n".join(body) + "\n", encoding="utf-8")
        written.append(path)
    return written


MME_PREDICTIONS = {"no": 0, "yes": 1, "other": 2}


class MMEScore(DeduplicatedMetric):
    """MME scores: per subtask acc, acc+ and score = acc + acc+; perception / cognition totals.

    ``compute()`` returns floats (as 0-dim tensors) under these keys, for the subtasks seen:
    ``SUBTASK/acc``, ``SUBTASK/acc_plus``, ``SUBTASK/score``; ``perception_total`` (sum of the 10
    perception subtask scores, 0..2000) and ``cognition_total`` (the 4 cognition ones, 0..800)
    when all of theirs were seen; a sum over fewer is named for what it covers, e.g.
    ``perception_total_4of10``, never like the benchmark's total; ``num_samples`` (after
    de-duplication) and ``incomplete_pairs``. A pair counts for
    acc+ only when both of its questions were seen and answered correctly (as in MME's own script),
    so a pair cut in half by ``limit_test_batches`` or a skip counts as wrong and is reported in
    ``incomplete_pairs``.
    """

    _columns = ("pair_key", "category", "prediction", "target")

    def update(
        self,
        sample_ids: Sequence[str],
        categories: Sequence[str],
        predictions: Sequence[str],
        targets: Sequence[str],
        pair_ids: Sequence[str] | None = None,
    ) -> None:
        """Add answers.

        Args:
            sample_ids: unique sample ids (``"subtask/NAME.jpg#k"``).
            categories: MME subtask names.
            predictions: raw model text or already parsed ``yes``/``no``/``other``.
            targets: ground truths ``yes``/``no`` (any case).
            pair_ids: question-pair ids; default: ``sample_id`` without its ``#k`` suffix.
        """
        check_lengths(sample_ids=sample_ids, categories=categories, predictions=predictions,
                       targets=targets, pair_ids=pair_ids)
        if pair_ids is None:
            pair_ids = [s.rsplit("#", 1)[0] for s in sample_ids]
        self._append(
            sample_key=[stable_id(s) for s in sample_ids],
            pair_key=[stable_id(p) for p in pair_ids],
            category=category_index(categories, MME_SUBTASKS, "MME subtask"),
            prediction=[MME_PREDICTIONS[parse_mme_answer(p)] for p in predictions],
            target=ground_truth(targets),
        )

    def update_from_samples(self, samples: Sequence[dict[str, Any]], predictions: Sequence[str]) -> None:
        """``update`` from sample dicts (``task == "mme"`` ones only) and their predictions."""
        rows = [(s, p) for s, p in zip(samples, predictions, strict=True) if s["task"] == "mme"]
        if rows:
            self.update([s["sample_id"] for s, _ in rows], [s["category"] for s, _ in rows],
                        [p for _, p in rows], [s["answer"] for s, _ in rows], [s["pair_id"] for s, _ in rows])

    def compute(self) -> dict[str, Tensor]:
        """Scores of the de-duplicated answers (see the class doc for the keys)."""
        cols = self._gathered()
        correct = (cols["prediction"] == cols["target"]).long()
        out: dict[str, Tensor] = {}
        totals = {"perception_total": (MME_PERCEPTION, []), "cognition_total": (MME_COGNITION, [])}
        incomplete = 0
        for index, subtask in enumerate(MME_SUBTASKS):
            mask = cols["category"] == index
            if not bool(mask.any()):
                continue
            acc = correct[mask].double().mean() * 100
            _, pair_index = torch.unique(cols["pair_key"][mask], return_inverse=True)
            n_pairs = int(pair_index.max()) + 1
            size = torch.zeros(n_pairs, dtype=torch.long, device=correct.device).scatter_add(
                0, pair_index, torch.ones_like(pair_index))
            right = torch.zeros(n_pairs, dtype=torch.long, device=correct.device).scatter_add(
                0, pair_index, correct[mask])
            incomplete += int((size != 2).sum())
            acc_plus = ((size == 2) & (right == 2)).double().mean() * 100
            out[f"{subtask}/acc"] = acc
            out[f"{subtask}/acc_plus"] = acc_plus
            out[f"{subtask}/score"] = acc + acc_plus
            for names, scores in totals.values():
                if subtask in names:
                    scores.append(acc + acc_plus)
        for key, (names, scores) in totals.items():
            if scores:
                out[partial_name(key, len(scores), len(names))] = torch.stack(scores).sum()
        out["num_samples"] = torch.tensor(float(correct.numel()), dtype=torch.float64)
        out["incomplete_pairs"] = torch.tensor(float(incomplete), dtype=torch.float64)
        return {k: v.float() for k, v in out.items()}


@register_benchmark("mme")
class MME(Benchmark):
    """MME from the official release folder, the parquet release or its hub id.

    Args:
        root: ``MME_Benchmark_release_version/`` (or the folder holding it), a folder of the
            Hugging Face parquet files, or a hub id of that release.
        subtasks: subtask names; default: every subtask present in ``root`` (absent ones are
            logged). Explicit names must be present; unknown names are an error.
        max_per_category: only the first N images (question pairs) of each subtask.
        hf_split: split of the parquet / hub release.
        cache_dir: ``datasets`` cache folder for parquet / hub sources.
    """

    def __init__(self, root: str, subtasks: list[str] | None = None, max_per_category: int | None = None,
                 hf_split: str = "test", cache_dir: str | None = None) -> None:
        super().__init__(max_per_category, hf_split, cache_dir)
        self.root = root
        self.subtasks = subtasks

    def load(self, on_error: str = "raise", ledger: SkipLedger | None = None, verify_images: bool = False) -> RecordDataset:
        return build_mme_dataset(self.root, self.subtasks, on_error, ledger, self.hf_split, self.cache_dir,
                                 self.max_per_category, verify_images)

    def sources(self) -> dict[str, Any]:
        return {"mme_root": self.root, "mme_subtasks": self.subtasks, "max_per_category": self.max_per_category,
                "hf_split": self.hf_split}

    parse = staticmethod(parse_mme_answer)
    metric = staticmethod(MMEScore)

    @staticmethod
    def export(records: list[dict[str, Any]], folder: Path) -> list[Path]:
        return write_mme_export(Path(folder) / "mme", records)
