"""Bad-input table: every kind of ``bench/corpus.py`` through the library, kinds x outcome.

    .venv/bin/python bench/bad_inputs.py            # -> bench/results/bad_inputs.json + bad_inputs.md

What runs (the same runners ``tests/test_bad_inputs.py`` asserts):

* image + mask kinds: ONE ``evaluate_saliency`` job (local Ray, ``vit_tiny_test``, Simple + TokenCut,
  64 px) over the folder of all of them; the outcome of each input is read off ``per_image.parquet``;
  the image kinds also through the training data path (``ViewMaker`` on one row, no Ray);
* annotation kinds: ``dataset_records`` (the VOC / COCO readers) and, when they load, the
  evaluation's three stage functions in process with a colour backbone;
* config kinds: ``load_config``; source kinds: ``dncut.storage.check_source`` against a moto S3 server
  started here (fake credentials) or a port nobody listens on;
* feature kinds: ``simple_ncut`` / ``tokencut`` / ``ncut_maps`` (``lobpcg``).

Each row: kind, category, what the input is, the expected outcome, the outcome, whether they match,
the reason (first 200 characters) and seconds; image kinds also the training-path outcome.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import corpus  # bench/corpus.py (this script's folder is on sys.path)
import s3server  # bench/s3server.py

REPO = Path(__file__).resolve().parent.parent

RESULTS = REPO / "bench" / "results"
SNIPPET = 200


def _row(kind: corpus.Kind, outcome: corpus.Outcome, expect: str) -> dict:
    return {"kind": kind.name, "category": kind.category, "input": kind.note, "expected": expect,
            "outcome": outcome.outcome, "match": corpus.check(outcome, expect),
            "reason": " ".join(outcome.reason.split())[:SNIPPET], "seconds": round(outcome.seconds, 3)}


def run(work: Path) -> dict:
    import pyarrow.parquet as pq
    import ray

    from dncut.config import load_config
    from dncut.eval.jobs import evaluate_saliency

    rows: list[dict] = []
    # images + masks: one evaluation job
    saliency = work / "saliency"
    kinds = corpus.write_images_and_masks(saliency)
    cfg = load_config(str(REPO / "configs/eval/smoke.yaml"), ["eval.batch_size=16", "eval.examples=2"])
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    start = time.perf_counter()
    summary = evaluate_saliency(str(saliency / "images"), str(saliency / "masks"), "vit_tiny_test", None,
                                ["simple", "tokencut"], False, str(work / "eval_out"), cfg)
    eval_seconds = time.perf_counter() - start
    ray.shutdown()
    outcomes = corpus.outcomes_from_rows(pq.read_table(work / "eval_out" / "per_image.parquet").to_pylist(), kinds)
    train = corpus.run_view_maker(saliency, corpus.kinds_of("image"), load_config(str(REPO / "configs/train/smoke.yaml")))
    for k in kinds:
        row = _row(k, outcomes[k.name], k.expect)
        if k.train is not None:
            row.update(train_expected=k.train, train_outcome=train[k.name].outcome,
                       train_match=corpus.check(train[k.name], k.train),
                       train_reason=" ".join(train[k.name].reason.split())[:SNIPPET])
        rows.append(row)
    # annotations, configs + sources, features
    rows += [_row(corpus.KINDS[n], o, corpus.KINDS[n].expect) for n, o in corpus.run_annotations(work / "ann").items()]
    server = s3server.start_moto_server()
    saved = dict(os.environ)
    try:
        for name in s3server.AWS_VARS_TO_CLEAR:
            os.environ.pop(name, None)
        os.environ.update(s3server.aws_test_env(server.endpoint_url, str(work)))
        closed = f"http://127.0.0.1:{s3server.free_port()}"
        configs = corpus.run_configs(work / "cfg", server.endpoint_url, closed)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        server.stop()
    rows += [_row(corpus.KINDS[n], o, corpus.KINDS[n].expect) for n, o in configs.items()]
    rows += [_row(corpus.KINDS[n], o, corpus.KINDS[n].expect) for n, o in corpus.run_features(work / "feat").items()]
    return {
        "bench": "bad_inputs",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
        "n_kinds": len(rows),
        "n_match": sum(r["match"] and r.get("train_match", True) for r in rows),
        "by_category": {c: sum(r["category"] == c for r in rows) for c in corpus.CATEGORIES},
        "eval_job": {"seconds": round(eval_seconds, 1), "inputs": len(kinds),
                     "runs": [{k: r[k] for k in ("method", "n_images", "n_failed")} for r in summary["runs"]]},
        "kinds": rows,
    }


def markdown(result: dict) -> str:
    lines = [f"# Bad inputs: {result['n_kinds']} kinds, {result['n_match']} as expected",
             "", f"{result['date']}, {result['machine']}; `python bench/bad_inputs.py` (bench/corpus.py). "
             f"Image + mask kinds: one `evaluate_saliency` job, {result['eval_job']['inputs']} inputs, "
             f"{result['eval_job']['seconds']} s; runs: "
             + ", ".join(f"{r['method']} {r['n_images']} images / {r['n_failed']} failed" for r in result["eval_job"]["runs"])
             + ".", "",
             "| kind | category | input | expected | outcome | ok | training path | reason |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["kinds"]:
        train = f"{r['train_outcome']}" + ("" if r.get("train_match", True) else " (UNEXPECTED)") if "train_outcome" in r else ""
        reason = r["reason"].replace("|", "\\|")
        lines.append(f"| {r['kind']} | {r['category']} | {r['input']} | `{r['expected']}` | {r['outcome']} | "
                     f"{'yes' if r['match'] else 'NO'} | {train} | {reason} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    os.chdir(REPO)
    with tempfile.TemporaryDirectory(prefix="dncut-bad-inputs-") as work:
        result = run(Path(work))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bad_inputs.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "bad_inputs.md").write_text(markdown(result))
    print(markdown(result))
    return 0 if result["n_match"] == result["n_kinds"] else 1


if __name__ == "__main__":
    sys.exit(main())
