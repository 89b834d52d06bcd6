"""Batch inference from a JSON-lines file: ``dmmi predict --jobs jobs.jsonl --out results.jsonl``.

Each line of the jobs file is one image and its expressions::

    {"image": "photos/a.jpg", "expressions": ["the two dogs", "a red car"]}

(a relative ``image`` path is read from the jobs file's folder). Each finished job appends one line
to the results file, flushed at once::

    {"line": 1, "image": "photos/a.jpg", "results": [{"expression": "the two dogs",
      "rle": {"size": [H, W], "counts": "..."}, "score": 0.98, "no_target": false, "foreground": 0.12}, ...]}

``rle`` is COCO's compressed run-length encoding (``pycocotools.mask.decode`` gives the (H, W) mask
back). A re-run skips the lines already in the results file, so a killed run resumes where it
stopped (a last line cut short by the kill is dropped and done again); a results line of another jobs
file (another image or other expressions on that line) is refused, not taken as done. A bad line (not JSON, a
missing field, an unreadable image, an empty expression) is reported with its line number and
skipped; it is not written, so a later run tries it again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from dmmi.errors import DmmiError, printable


@dataclass
class Job:
    line: int  # 1-based line number in the jobs file
    image: str  # as written in the jobs file
    path: Path  # where it is read from
    expressions: list[str]


@dataclass
class JobsReport:
    done: int = 0
    skipped_done: int = 0  # already in the results file
    bad: list[str] = field(default_factory=list)  # "jobs.jsonl:7: why"

    def summary(self, out: Path) -> str:
        text = f"{self.done} job(s) done, {self.skipped_done} already in {out}"
        if self.bad:
            text += f"; {len(self.bad)} bad line(s) skipped (first: {self.bad[0]})"
        return text


def parse_job(text: str, line: int, base: Path, where: str) -> Job:
    """One jobs line -> Job; DmmiError naming ``where:line`` for anything malformed."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise DmmiError(f"{where}:{line}: not JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise DmmiError(f"{where}:{line}: expected an object {{\"image\": ..., \"expressions\": [...]}}")
    image, expressions = record.get("image"), record.get("expressions")
    if not isinstance(image, str) or not image:
        raise DmmiError(f"{where}:{line}: \"image\" must be a file path")
    if isinstance(expressions, str):
        expressions = [expressions]
    if not isinstance(expressions, list) or not expressions or not all(isinstance(e, str) for e in expressions):
        raise DmmiError(f"{where}:{line}: \"expressions\" must be a non-empty list of strings")
    if not all(e.strip() for e in expressions):
        raise DmmiError(f"{where}:{line}: an expression is empty")
    path = Path(image) if Path(image).is_absolute() else base / image
    return Job(line=line, image=image, path=path, expressions=list(expressions))


def read_jobs(jobs_path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of the non-blank lines."""
    try:
        with open(jobs_path, encoding="utf-8") as f:
            for n, text in enumerate(f, start=1):
                if text.strip():
                    yield n, text
    except FileNotFoundError:
        raise DmmiError(f"jobs file not found: {jobs_path}") from None
    except UnicodeDecodeError:
        raise DmmiError(f"{jobs_path}: not UTF-8 text (a JSON-lines jobs file is)") from None


RECORD_START = b'{"line": '  # how every results line begins (json.dumps of _record)


def done_lines(results_path: Path) -> dict[int, tuple[str, list[str]]]:
    """The jobs lines already in the results file -> (image, expressions) each was run with. A last
    line cut short (a killed run) is removed, once every whole line has been read as a dmmi result:
    a file that is not a results file is refused untouched."""
    if not results_path.is_file():
        return {}
    data = results_path.read_bytes()
    whole, cut = data[: data.rfind(b"\n") + 1], data[data.rfind(b"\n") + 1:]
    refuse = f"{results_path}: not a dmmi results file (JSON lines written by --jobs); give another --out"
    try:
        lines = whole.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise DmmiError(refuse) from None
    done = {}
    for n, text in enumerate(lines, start=1):
        try:
            record = json.loads(text)
            done[int(record["line"])] = (str(record["image"]), [str(r["expression"]) for r in record["results"]])
        except (ValueError, KeyError, TypeError):
            raise DmmiError(f"{results_path}:{n}: not a dmmi results line; give another --out") from None
    if cut:  # the write of the last result was cut: drop it, redo that job
        if not (cut.startswith(RECORD_START) or RECORD_START.startswith(cut)):  # not the start of a result
            raise DmmiError(refuse)
        results_path.write_bytes(whole)
    return done


def check_same_job(job: Job, done: tuple[str, list[str]], results_path: Path, where: str) -> None:
    """A results line counts as this job done only if it was run with the same image and expressions."""
    image, expressions = done
    if image != job.image or expressions != job.expressions:
        what = f"image {image}" if image != job.image else f"other expressions for {image}"
        raise DmmiError(f"{results_path} holds {what} as line {job.line}, but {where}:{job.line} is "
                        f"{job.image} {job.expressions}: these results come from another jobs file; give another --out")


def encode_rle(mask: np.ndarray) -> dict:
    """(H, W) bool -> COCO compressed RLE {"size": [H, W], "counts": str}."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def run_jobs(predictor, jobs_path: str | Path, out_path: str | Path, *, batch_jobs: int = 8, progress: bool = True,
             log=print) -> JobsReport:
    """Run every job of ``jobs_path`` not yet in ``out_path``; ``batch_jobs`` jobs share the model's batches
    (:meth:`dmmi.inference.Predictor.predict_prepared`)."""
    jobs_path, out_path = Path(jobs_path), Path(out_path)
    report = JobsReport()
    done = done_lines(out_path)
    lines = list(read_jobs(jobs_path))
    todo: list[Job] = []
    for n, text in lines:
        try:
            job = parse_job(text, n, jobs_path.parent, jobs_path.name)
        except DmmiError as e:
            if n in done:  # was run as a good line: the jobs file changed since
                raise DmmiError(f"{out_path} holds line {n}, but {e}: these results come from another jobs file; "
                                "give another --out") from None
            _bad(report, str(e), log)
            continue
        if n in done:
            check_same_job(job, done[n], out_path, jobs_path.name)
            report.skipped_done += 1
        else:
            todo.append(job)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="jobs", dynamic_ncols=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "a", encoding="utf-8") as out:
        for start in range(0, len(todo), batch_jobs):
            group = _prepared(predictor, todo[start:start + batch_jobs], jobs_path.name, report, log)
            if group:
                predictions = predictor.predict_prepared([item for _, item in group])
                for (job, _), preds in zip(group, predictions):
                    out.write(json.dumps(_record(job, preds)) + "\n")
                    report.done += 1
                out.flush()
            if bar is not None:
                bar.update(min(batch_jobs, len(todo) - start))
    if bar is not None:
        bar.close()
    return report


def _prepared(predictor, jobs: list[Job], where: str, report: JobsReport, log) -> list:
    """(job, :meth:`~dmmi.inference.Predictor.prepare`'s item) for the jobs whose image loads and whose
    expressions tokenize; the others are reported and skipped."""
    out = []
    for job in jobs:
        try:
            out.append((job, predictor.prepare(job.path, job.expressions)))
        except DmmiError as e:
            _bad(report, f"{where}:{job.line}: {e}", log)
    return out


def _bad(report: JobsReport, message: str, log) -> None:
    report.bad.append(message)
    log(f"skipped: {printable(message)}")


def _record(job: Job, preds) -> dict:
    return {"line": job.line, "image": job.image,
            "results": [{"expression": p.text, "rle": encode_rle(p.mask), "score": round(p.score, 6),
                         "no_target": p.no_target, "foreground": round(p.foreground, 6)} for p in preds]}


def check_results_path(out: Optional[str | Path], jobs: Path) -> Path:
    """The results file: a .jsonl path, not a folder, not the jobs file itself, in a folder we can write."""
    if not out:
        raise DmmiError("--jobs needs --out RESULTS.jsonl (the results file)")
    out = Path(out)
    if out.is_dir():
        raise DmmiError(f"--out {out} is a folder; with --jobs it is the results file (RESULTS.jsonl)")
    if out.resolve() == jobs.resolve():
        raise DmmiError(f"--out {out} is the jobs file itself")
    return out
