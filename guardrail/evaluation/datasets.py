"""Readers for the evaluation and anchor data sets users have. Nothing is downloaded.

* VLSafe JSONL: ``image_id`` (a COCO file name), ``caption``, ``query``; images from ``images``.
* JailbreakLLMs forbidden questions CSV: ``content_policy_id, content_policy_name, q_id,
  question``; images from ``images`` via a mapping file (JSON ``{q_id: file}``) or, without one,
  ``<q_id>.jpg|.png`` in the folder.
* LLaVA-Bench JSONL: ``question_id``, ``image``, ``text``, optional ``category``.
* Generic JSONL: ``prompt``, optional ``image``, ``caption``, ``label``.

A malformed row or a missing image raises :class:`DataError` naming the file and line, unless
``skip_bad`` is set; then it is skipped and counted in :attr:`DataReport.skipped`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from guardrail.errors import InvalidInputError

Format = Literal["vlsafe", "jailbreakllms", "llava-bench", "jsonl"]


class DataError(InvalidInputError):
    """A data file row is malformed or names an image that does not exist."""


@dataclass(frozen=True)
class EvalSample:
    """One evaluation or anchor item."""

    id: str
    prompt: str
    image: Path | None = None
    caption: str | None = None
    label: str | None = None


@dataclass
class DataReport:
    """What reading a file skipped (with ``skip_bad``)."""

    skipped: int = 0
    reasons: list[str] = field(default_factory=list)


def _image(folder: Path | None, name: str | None, where: str) -> Path | None:
    if not name:
        return None
    path = Path(name) if folder is None else folder / name
    if not path.is_file():
        raise DataError(f"{where}: image file {path} not found")
    return path


def _vlsafe(row: dict[str, Any], images: Path | None, where: str, _: dict[str, Any]) -> EvalSample:
    return EvalSample(
        id=str(row.get("id", row["image_id"])),
        prompt=row["query"],
        image=_image(images, row["image_id"], where),
        caption=row.get("caption"),
        label="harmful",
    )


def _llava_bench(
    row: dict[str, Any], images: Path | None, where: str, _: dict[str, Any]
) -> EvalSample:
    return EvalSample(
        id=str(row["question_id"]),
        prompt=row["text"],
        image=_image(images, row["image"], where),
        label=row.get("category"),
    )


def _generic(row: dict[str, Any], images: Path | None, where: str, _: dict[str, Any]) -> EvalSample:
    return EvalSample(
        id=str(row.get("id", where)),
        prompt=row["prompt"],
        image=_image(images, row.get("image"), where),
        caption=row.get("caption"),
        label=row.get("label"),
    )


def _jailbreak(
    row: dict[str, Any], images: Path | None, where: str, mapping: dict[str, str]
) -> EvalSample:
    q_id = str(row["q_id"]).strip()
    name = mapping.get(q_id)
    if name is None and images is not None:
        name = next(
            (
                f"{q_id}{ext}"
                for ext in (".jpg", ".png", ".jpeg")
                if (images / f"{q_id}{ext}").is_file()
            ),
            None,
        )
        if name is None:
            raise DataError(f"{where}: no image for q_id {q_id} in {images}")
    return EvalSample(
        id=q_id,
        prompt=row["question"].strip(),
        image=_image(images, name, where),
        label=row["content_policy_name"].strip(),
    )


_ROW_READERS: dict[
    str, Callable[[dict[str, Any], Path | None, str, dict[str, Any]], EvalSample]
] = {
    "vlsafe": _vlsafe,
    "llava-bench": _llava_bench,
    "jsonl": _generic,
    "jailbreakllms": _jailbreak,
}


def _rows(path: Path, data_format: Format) -> Iterator[tuple[str, dict[str, Any] | None, str]]:
    """(location, row or None, error) for each line of the file."""
    with path.open(encoding="utf-8", newline="") as f:
        if data_format == "jailbreakllms":
            for number, row in enumerate(csv.DictReader(f), start=2):
                yield f"{path}:{number}", row, ""
            return
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                yield (
                    f"{path}:{number}",
                    row if isinstance(row, dict) else None,
                    "not an object",
                )
            except json.JSONDecodeError as e:
                yield f"{path}:{number}", None, f"invalid JSON ({e.msg})"


def read_samples(
    path: str | Path,
    data_format: Format = "jsonl",
    *,
    images: str | Path | None = None,
    mapping: str | Path | None = None,
    skip_bad: bool = False,
    report: DataReport | None = None,
) -> Iterator[EvalSample]:
    """Stream the samples of ``path`` (see the module docstring for the formats)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} not found")
    folder = Path(images) if images is not None else None
    names = json.loads(Path(mapping).read_text(encoding="utf-8")) if mapping else {}
    read_row = _ROW_READERS[data_format]
    report = report if report is not None else DataReport()
    for where, row, error in _rows(path, data_format):
        try:
            if row is None:
                raise DataError(f"{where}: {error}")
            yield read_row(row, folder, where, names)
        except (KeyError, AttributeError, TypeError) as e:
            problem: DataError = DataError(f"{where}: malformed row (missing or bad field {e})")
            if not skip_bad:
                raise problem from e
            report.skipped += 1
            report.reasons.append(str(problem))
        except DataError as e:
            if not skip_bad:
                raise
            report.skipped += 1
            report.reasons.append(str(e))
