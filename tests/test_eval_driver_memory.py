"""The evaluation driver keeps nothing per image (issue 26): per-image rows are written by the
workers, metrics are running sums, the k-means fit sees a bounded sample.

The job's summary is checked against an independent computation: the same images decoded,
predicted and scored in this process, aggregated by hand with numpy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dncut.config import Config
from dncut.eval.report import FAILED_SAMPLE, Accumulator, format_failures
from dncut.eval.segmentation import TokenSample, cluster_tokens, fit_clustering
from dncut.eval.stages import result_row


def _folder(root: Path, n: int, side: int = 32) -> tuple[Path, Path]:
    from PIL import Image

    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(images / f"{i:03d}.png")
        mask = np.zeros((side, side), np.uint8)
        y, x = rng.integers(0, side // 2, 2)
        mask[y:y + side // 2, x:x + side // 2] = 255
        Image.fromarray(mask).save(masks / f"{i:03d}.png")
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    Image.fromarray(np.zeros((side, side), np.uint8)).save(masks / "broken.png")
    return images, masks


def test_summary_equals_rows_scored_in_process_and_averaged_by_hand(ray_session, tmp_path: Path):
    import pyarrow.parquet as pq
    import torch

    from dncut.backbone_specs import spec as backbone_spec
    from dncut.eval.jobs import evaluate_saliency
    from dncut.eval.predict import Predictor
    from dncut.eval.stages import load_backbone, load_record, predict_batch, record, score_row

    images, masks = _folder(tmp_path, 10)
    cfg = Config().with_overrides({"model.pretrained": False, "eval.image_size": 32, "eval.batch_size": 4,
                                   "eval.examples": 0, "ncut.solver": "eigh"})
    out = tmp_path / "out"
    summary = evaluate_saliency(str(images), str(masks), "vit_tiny_test", None, "simple", False, str(out), cfg)

    # independent: decode, predict and score in this process, aggregate with numpy
    model = load_backbone(None, "vit_tiny_test", False, None, None).eval()
    predictor = Predictor(model, ["simple"], "eigh", torch.device("cpu"))
    recs = [record(p.stem, str(p), str(masks / p.name)) for p in sorted(images.iterdir())]
    rows = [load_record(r, spec=backbone_spec("vit_tiny_test"), image_size=32) for r in recs]
    scored = []
    for start in range(0, len(rows), 4):
        chunk = rows[start:start + 4]
        with torch.inference_mode():
            pred = predict_batch(predictor, {k: [r[k] for r in chunk] for k in chunk[0]})
        for i in range(len(chunk)):
            scored += score_row({k: v[i] for k, v in pred.items()}, methods=["simple"], bilateral=False,
                                discovery=False)
    ok = [r for r in scored if r["status"] == "ok"]
    (run,) = summary["runs"]
    assert run["n_images"] == 11 and run["n_failed"] == 1 and len(ok) == 10
    for key in ("acc", "iou", "mae"):
        assert run["metrics"][key] == pytest.approx(np.mean([r[key] for r in ok]), rel=1e-9, abs=1e-12), key
    curve = np.mean([np.asarray(r["fbeta_curve"], np.float64) for r in ok], axis=0)
    assert run["metrics"]["max_fbeta"] == pytest.approx(float(curve.max()), rel=1e-9)

    # per_image.parquet: one file (the workers' parts merged, then removed), one row per image
    assert (out / "per_image.parquet").is_file() and not (out / "per_image.parquet.parts").exists()
    table = pq.read_table(out / "per_image.parquet").to_pylist()
    assert sorted(r["image_id"] for r in table) == sorted(r["image_id"] for r in scored)
    by_id = {r["image_id"]: r for r in scored}
    for r in table:
        if r["status"] == "ok":
            assert r["iou"] == pytest.approx(float(by_id[r["image_id"]]["iou"]), rel=1e-9)
    assert [r["status"] for r in table if r["image_id"] == "broken"] == ["failed"]
    assert "## Failed images (1)" in (out / "summary.md").read_text()


def test_accumulator_keeps_no_row_per_image():
    """100k rows (a tenth failed): running sums, one curve per run and a bounded sample of failures."""
    acc = Accumulator(["simple"])
    curve = np.linspace(0, 1, 255)
    for i in range(100_000):
        failed = i % 10 == 0
        row = result_row(f"img{i}", "simple", status="failed" if failed else "ok", error="bad" if failed else "")
        row.update(acc=0.5, iou=0.25, mae=0.1, fbeta_curve=curve, pysod_curve=curve)
        acc.add(row, dataset="d", backbone="b", checkpoint=None, task="saliency")
    (run,) = acc.summary()["runs"]
    assert run["n_images"] == 100_000 and run["n_failed"] == 10_000
    assert run["metrics"]["iou"] == pytest.approx(0.25) and run["metrics"]["max_fbeta"] == pytest.approx(1.0)
    assert len(acc.failures) == FAILED_SAMPLE and acc.more_failures and acc.n_failed_rows == 10_000
    assert len(acc._failed_keys) == FAILED_SAMPLE + 1 and not acc.examples
    assert not any(isinstance(v, list) and len(v) > FAILED_SAMPLE for v in vars(acc).values())
    md = format_failures(acc.failures, more=acc.more_failures)
    assert f"## Failed images (more than {FAILED_SAMPLE})" in md and md.count("\n- ") == FAILED_SAMPLE + 1


def test_token_sample_is_every_token_under_the_cap_and_a_fixed_sample_above():
    rng = np.random.default_rng(0)
    images = {f"img{i:02d}": rng.normal(size=(16, 3)).astype(np.float32) for i in range(20)}  # 320 tokens
    full = TokenSample(cap=320)
    for name in reversed(list(images)):  # arrival order does not matter
        full.add(name, images[name])
    assert np.array_equal(full.tokens(), np.concatenate([images[k] for k in sorted(images)]))

    samples = []
    for order in (sorted(images), sorted(images, reverse=True), list(rng.permutation(sorted(images)))):
        s = TokenSample(cap=50)
        for name in order:
            s.add(name, images[name])
        samples.append(s.tokens())
        assert s.total == 320 and len(samples[-1]) == 50
    assert all(np.array_equal(samples[0], t) for t in samples[1:])
    every = {tuple(t) for t in np.concatenate(list(images.values()))}
    assert all(tuple(t) in every for t in samples[0])


def test_fitted_clustering_labels_every_token_as_the_fit_does():
    """``Clustering.predict`` (the workers' pass) agrees with the labels of the fit itself (the
    protocol's ``fit_predict``) on the tokens the fit saw."""
    rng = np.random.default_rng(1)
    tokens = np.concatenate([rng.normal(loc=c, size=(200, 8)) for c in (-3, 0, 3)]).astype(np.float32)
    fit = fit_clustering(tokens, 3, seed=0, pca_dims=4)
    assert np.array_equal(fit.predict(tokens), cluster_tokens(tokens, 3, seed=0, pca_dims=4))


def _hand_made_rows(n: int, seed: int = 0) -> list[dict]:
    """Scored rows of two methods (record index ``i`` for image ``img<i>``): failed rows, NaN / inf /
    None metrics, examples on some rows."""
    from dncut.eval.stages import failed_row

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        for method in ("simple", "tokencut"):
            if i % 7 == 0 or (method == "tokencut" and i % 5 == 1):
                rows.append({**failed_row(f"img{i}", method, f"bad {i} {method}"), "record_index": i})
                continue
            row = result_row(f"img{i}", method, example=b"thumb%d" % i if i % 11 == 2 else b"")
            row["record_index"] = i
            row.update(acc=rng.random(), iou=[rng.random(), np.nan, np.inf][i % 3], mae=rng.random(),
                       pysod_mae=None if i % 4 == 0 else rng.random(), acc_binary=rng.random() if i % 2 else np.nan,
                       iou_binary=np.nan, corloc_hit=float(i % 2) if i % 3 else np.nan,
                       fbeta_curve=rng.random(255), pysod_curve=rng.random(256))
            rows.append(row)
    return rows


def _acc_state(acc: Accumulator) -> tuple:
    return (acc.summary(), acc.failures, acc.n_failed_rows, acc.examples, acc._failed_keys, acc.more_failures,
            {k: (s.sums, s.counts, s.n_images, s.n_failed) for k, s in acc.runs.items()})


def _add_batches(tables, task: str = "saliency") -> Accumulator:
    from dncut.eval.report import _MEANS
    from dncut.eval.streamed import batch_payloads, driver_rows

    acc = Accumulator(["simple", "tokencut"])
    for table in tables:
        for payload in batch_payloads(driver_rows(table, metrics=_MEANS)):
            acc.add_batch(payload, dataset="d", backbone="b", checkpoint=None, task=task)
    return acc


def test_add_batch_is_repeated_add():
    """``Accumulator.add_batch`` of the payloads ``driver_rows`` makes of each batch equals ``add`` of
    each row of the batch, method by method in row order, with the batch's curves summed on its last
    ok row: the same float64 sums bit for bit, counts, failures (past ``FAILED_SAMPLE``), examples."""
    import pyarrow as pa

    from dncut.eval.streamed import CURVES

    rows = _hand_made_rows(400)
    batches = [rows[k:k + 96] for k in range(0, len(rows), 96)]
    for task in ("saliency", "discovery"):
        expected = Accumulator(["simple", "tokencut"])
        for batch in batches:
            for method in ("simple", "tokencut"):
                mine = [dict(r) for r in batch if r["method"] == method]
                ok = [r for r in mine if r["status"] == "ok"]
                for name in CURVES:  # the batch's sum on its last ok row, as the driver gets it
                    total = None
                    for r in ok:
                        total = np.array(r[name]) if total is None else total + r[name]
                    for r in mine:
                        r[name] = None
                    if ok:
                        ok[-1][name] = total
                for r in mine:
                    expected.add(r, dataset="d", backbone="b", checkpoint=None, task=task)
        got = _add_batches([pa.Table.from_pylist(b) for b in batches], task)
        assert _acc_state(got) == _acc_state(expected), task
        assert got.n_failed_rows > FAILED_SAMPLE and len(got.failures) == FAILED_SAMPLE and got.examples
    run = {r["method"]: r for r in got.summary()["runs"]}
    assert run["simple"]["n_failed"] == len([r for r in rows if r["method"] == "simple" and r["status"] != "ok"])


def test_driver_rows_carry_one_payload_per_batch_and_method():
    """``driver_rows`` (what the Parquet writer returns to the driver): one row per method, compact
    per-image values, no per-image curve; the Accumulator fed these gives the summary of the full rows
    (equal for one batch; to float64 rounding of the curves' grouping over several); ``counted`` rows
    are left out."""
    import pyarrow as pa

    from dncut.eval.report import _MEANS
    from dncut.eval.streamed import driver_rows

    rows = _hand_made_rows(60)
    table = pa.Table.from_pylist(rows)

    def summary(batches) -> dict:
        acc = Accumulator(["simple", "tokencut"])
        for batch in batches:
            for row in batch:
                acc.add(row, dataset="d", backbone="b", checkpoint=None, task="saliency")
        return acc.summary()

    full = summary([rows])
    one = driver_rows(table, metrics=_MEANS)
    assert one.column("method").to_pylist() == ["simple", "tokencut"]
    assert _add_batches([table]).summary() == full
    assert one.nbytes < table.nbytes / 20  # no curves, no per-row strings but ids and errors

    split = _add_batches([table.slice(k, 32) for k in range(0, table.num_rows, 32)]).summary()
    for a, b in zip(full["runs"], split["runs"]):
        assert (a["n_images"], a["n_failed"]) == (b["n_images"], b["n_failed"])
        assert {k: v for k, v in a["metrics"].items() if k != "max_fbeta"} == \
            {k: v for k, v in b["metrics"].items() if k != "max_fbeta"}
        assert b["metrics"]["max_fbeta"] == pytest.approx(a["metrics"]["max_fbeta"], rel=1e-14)

    ids = [ids for ids in one.column("failed_id").to_pylist()]  # image ids of the failed rows only
    assert sorted(i for group in ids for i in group) == sorted(r["image_id"] for r in rows if r["status"] != "ok")
    assert [len(x) for x in one.column("record_index").to_pylist()] == [len(rows) // 2] * 2
    assert one.column("record_index").to_pylist()[0] == [r["record_index"] for r in rows if r["method"] == "simple"]

    counted = {"simple": np.array([1, 3]), "tokencut": np.array([2])}
    left = driver_rows(table, counted, _MEANS)
    pairs = {(i, m) for idx, m in zip(left.column("record_index").to_pylist(), left.column("method").to_pylist())
             for i in idx}
    assert len(pairs) == len(rows) - 3 and not pairs & {(1, "simple"), (3, "simple"), (2, "tokencut")}
    out = lambda r: r["record_index"] in counted.get(r["method"], ())  # noqa: E731
    kept = [r for r in rows if not out(r)]
    assert _add_batches([table.filter(pa.array([not out(r) for r in rows]))]).summary() == summary([kept])
    assert _acc_state(_add_batches([table.slice(0, 0)])) == _acc_state(Accumulator(["simple", "tokencut"]))
    with pytest.raises(ValueError, match="record_index"):  # rows to leave out, and no index to find them by
        driver_rows(table.drop_columns(["record_index"]), counted, _MEANS)
    assert driver_rows(table.drop_columns(["record_index"]), metrics=_MEANS).column("record_index").null_count == 2


def test_merge_holds_one_row_group_at_a_time(tmp_path: Path, monkeypatch):
    """``merge_parts`` feeds the writer row group by row group, never a whole part (a part of 10 row
    groups of 3 rows: 10 writes of at most 3 rows), and keeps every row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dncut import storage
    from dncut.eval.report import PER_IMAGE_FILE, PER_IMAGE_KEY, merge_parts, parts_folder, per_image_row, per_image_schema

    store = storage.Storage()
    folder = Path(parts_folder(str(tmp_path), PER_IMAGE_FILE, store))
    folder.mkdir(parents=True)
    rows = [per_image_row(result_row(f"img{i:02d}", "simple"), dataset="d", backbone="b", checkpoint=None)
            for i in range(30)]
    pq.write_table(pa.Table.from_pylist(rows, schema=per_image_schema()), folder / "a.parquet", row_group_size=3)
    fed = []
    write = pq.ParquetWriter.write_table
    monkeypatch.setattr(pq.ParquetWriter, "write_table", lambda self, table, *a, **k: (
        fed.append(table.num_rows), write(self, table, *a, **k))[1])
    assert merge_parts(str(tmp_path), PER_IMAGE_FILE, store, per_image_schema(), unique=PER_IMAGE_KEY) == 30
    assert fed == [3] * 10
    assert sorted(pq.read_table(tmp_path / PER_IMAGE_FILE).column("image_id").to_pylist()) == \
        sorted(r["image_id"] for r in rows)


def test_records_table_blocks_and_ledger_keep_every_record():
    """The driver's records as one Arrow table: blocks of ``rows`` records copied out (not slices of
    the whole), their rows equal to the dicts; ``indexed`` numbers the records by position and keeps
    the numbers of a subset; ``RowLedger.missing`` filters the table as it does a list."""
    from dncut.eval.retry import RowLedger
    from dncut.eval.stages import record
    from dncut.eval.streamed import indexed, record_blocks, records_table

    records = [record(f"img{i}", f"/x/img{i}.jpg", f"/m/img{i}.png", missing="gone" if i == 3 else "")
               for i in range(10)]
    table = records_table(records)
    blocks = list(record_blocks(table, 4))
    assert [b.num_rows for b in blocks] == [4, 4, 2]
    assert [r for b in blocks for r in b.to_pylist()] == records
    assert all(b.nbytes < table.nbytes for b in blocks)
    table = indexed(table)
    assert table.column("record_index").to_pylist() == list(range(10)) and indexed(table) is table
    ledger = RowLedger(["simple"], table)
    for i in (0, 2, 5):
        ledger.first(i, "simple")
    assert ledger.missing(table).to_pylist() == ledger.missing(table.to_pylist())
    assert len(ledger.missing(table)) == 7
    rest = ledger.missing(table)
    assert indexed(rest) is rest and rest.column("record_index").to_pylist() == [1, 3, 4, 6, 7, 8, 9]
    with pytest.raises(ValueError, match="record_index"):
        ledger.missing(records)  # dicts without their position

def test_record_blocks_are_capped_in_number_not_in_records():
    """Past ``MAX_RECORD_BLOCKS`` (200) blocks of ``rows``, each block holds the least multiple of
    ``rows`` that keeps to 200 blocks: hand cases; the blocks hold every record once, in order."""
    import pyarrow as pa

    from dncut.eval.streamed import block_rows, num_record_blocks, record_blocks

    # ceil(n / 200) rounded up to a multiple of 64: 65 -> 128, 250 -> 256, 5000 -> 5056
    assert [block_rows(n, 64) for n in (0, 1, 12_800, 12_801, 50_000, 1_000_000)] == [64, 64, 64, 128, 256, 5056]
    assert [num_record_blocks(n, 64) for n in (0, 1, 64, 65, 12_800, 12_801, 50_000, 1_000_000)] == [
        1, 1, 1, 2, 200, 101, 196, 198]
    assert [num_record_blocks(n, 4) for n in (10, 800, 801, 1003)] == [3, 200, 101, 126]  # 801, 1003: 8 a block
    assert block_rows(1_000, 1) == 5 and num_record_blocks(1_000, 1) == 200  # batch 1 (configs/eval/paper.yaml)
    table = pa.table({"i": np.arange(1003)})
    blocks = list(record_blocks(table, 4))
    assert [b.num_rows for b in blocks] == [8] * 125 + [3]
    assert np.concatenate([b.column("i").to_numpy() for b in blocks]).tolist() == list(range(1003))
    with pytest.raises(ValueError, match="per block"):
        block_rows(10, 0)


def test_column_wise_listing_gives_the_records_of_the_dicts(tmp_path: Path):
    """``saliency_records`` (column-wise: no dict per record) equals ``records_table`` of the record
    dicts built from the two ``stems`` dicts and ``pair_by_stem``: same rows, order, values and missing
    reasons, with images without a mask, masks without an image, sub-folders, a stem of two files
    (the later file kept), dots and non-ASCII names."""
    from dncut.data.datasets import pair_by_stem
    from dncut.data.images import IMAGE_SUFFIXES
    from dncut.eval.inputs import saliency_records, stems
    from dncut.eval.stages import record
    from dncut.eval.streamed import records_table
    from dncut.storage import Storage

    images, masks = tmp_path / "DUTS" / "images", tmp_path / "DUTS" / "masks"
    for folder, names in ((images, ["b.jpg", "a.jpg", "a.png", "é.jpg", "z.png", "sub/x.jpg", "only_img.jpg",
                                    "Ω.png", "c.d.jpg", "sub/y.png"]),
                          (masks, ["a.png", "b.png", "é.png", "sub/x.png", "only_mask.png", "c.d.png", "zz.png"])):
        for name in names:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(b"x")
    store = Storage()
    image_stems = stems(str(images), "images", "l", store)
    mask_stems = stems(str(masks), "masks", "l", store)
    samples, lonely, lonely_masks = pair_by_stem(image_stems, mask_stems)
    records = [record(s.image_id, s.image_uri, s.mask_uri) for s in samples]
    records += [record(s, image_stems[s], missing=f"no mask named {s}.* in {masks}") for s in lonely]
    records += [record(s, "", mask_stems[s], missing=f"no image named {s}.* in {images} (image suffixes: "
                       f"{' '.join(IMAGE_SUFFIXES)})") for s in lonely_masks]
    table = saliency_records(str(images), str(masks), store)
    assert table.schema == records_table(records).schema and table.to_pylist() == records
    assert [r["image_id"] for r in records] == ["a", "b", "c.d", "sub/x", "é", "only_img", "sub/y", "z", "Ω",
                                                "only_mask", "zz"]
    assert records[0]["image_uri"].endswith("a.png")


def test_ledger_is_one_byte_a_record_and_keeps_the_rerun_rules():
    """``RowLedger`` over the records: a ``uint8`` per record (up to 8 methods), marked by record index;
    a row arriving twice (in one batch or across batches) is not first, ``counted`` gives per method
    the record indices whose rows arrived of the records given, ``missing`` filters the table (the
    indices of a re-run's records are their positions in the whole)."""
    import pyarrow as pa

    from dncut.eval.retry import RowLedger
    from dncut.eval.stages import record
    from dncut.eval.streamed import indexed, records_table

    table = indexed(records_table([record(f"img{i}", f"/x/img{i}.jpg") for i in range(1000)]))
    ledger = RowLedger(["simple", "tokencut"], table)
    assert ledger.seen.dtype == np.uint8 and ledger.seen.nbytes == 1000
    assert ledger.first_batch(np.array([1, 2, 1]), "simple").tolist() == [True, True, False]
    assert ledger.first_batch(pa.array([2, 3]).to_numpy(), "simple").tolist() == [False, True]
    assert ledger.first_batch([2], "tokencut").tolist() == [True] and not ledger.first(2, "tokencut")
    assert ledger.complete(2) and not ledger.complete(1) and not ledger.complete(5000)
    counted = ledger.counted(ledger.missing(table))
    assert counted.keys() == {"simple"} and counted["simple"].tolist() == [1, 3]
    assert ledger.counted(table)["tokencut"].tolist() == [2]
    missing = ledger.missing(table)
    assert missing.num_rows == 999 and "img2" not in missing.column("image_id").to_pylist()
    ledger.first(3, "tokencut")
    rerun = ledger.missing(table)
    assert rerun.num_rows == 998 and ledger.counted(rerun)["simple"].tolist() == [1]
    ledger.forget([2])
    assert ledger.first(2, "simple")
    assert ledger.first(1500, "simple") and len(ledger.seen) == 1501  # beyond the records: added
    with pytest.raises(KeyError):
        ledger.first(1, "most")
    with pytest.raises(ValueError):
        ledger.first(-1, "simple")


def test_ledger_marks_a_batch_at_the_cost_of_the_batch():
    """``first_batch`` touches the batch's positions only: no array operation over all the records
    (a pass over every record per batch makes the driver's work quadratic in the images); the marks
    equal a reference set over batches in random order, repeats included."""
    from dncut.eval.retry import RowLedger

    class Watched(np.ndarray):
        sizes: list[int] = []

        def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
            plain = [np.asarray(x) if isinstance(x, Watched) else x for x in inputs]
            if "out" in kwargs:
                kwargs["out"] = tuple(np.asarray(x) if isinstance(x, Watched) else x for x in kwargs["out"])
            result = getattr(ufunc, method)(*plain, **kwargs)
            Watched.sizes.append(int(np.size(result)))
            return result

    n = 100_000
    ledger = RowLedger(["simple", "tokencut"], n)
    ledger.seen = ledger.seen.view(Watched)
    rng = np.random.default_rng(0)
    marked: dict[str, set] = {"simple": set(), "tokencut": set()}
    for _ in range(50):
        batch = rng.integers(0, n, 256)  # repeats within and across batches
        method = ("simple", "tokencut")[int(rng.integers(2))]
        fresh = ledger.first_batch(batch, method)
        expected, seen = [], set(marked[method])
        for i in batch.tolist():
            expected.append(i not in seen)
            seen.add(i)
        assert fresh.tolist() == expected
        marked[method] = seen
    assert Watched.sizes and max(Watched.sizes) <= 256
    bits = np.asarray(ledger.seen)
    assert set(np.flatnonzero(bits & 1).tolist()) == marked["simple"]
    assert set(np.flatnonzero(bits & 2).tolist()) == marked["tokencut"]


def test_repeated_image_ids_fail_before_the_pipeline():
    """Two records with one image id would share one row of ``per_image.parquet``: a clear error."""
    from dncut.eval.streamed import check_unique_ids
    from dncut.eval.stages import record
    from dncut.eval.streamed import records_table

    check_unique_ids(records_table([record(f"img{i}", "/x") for i in range(5)]), "d")
    check_unique_ids(records_table([]), "d")
    with pytest.raises(ValueError, match=r"eval d: 1 image ids name more than one record, e.g. 'img3'"):
        check_unique_ids(records_table([record(f"img{i}", "/x") for i in (0, 1, 3, 2, 3)]), "d")


@pytest.mark.parametrize("spelling", ["plain", "trailing slash", "double slash"])
def test_local_listing_walks_in_chunks_and_equals_the_storage_listing(tmp_path: Path, monkeypatch, spelling: str):
    """``stem_columns`` of a local folder (walked ``LIST_CHUNK`` files at a time, never a Python string
    per file of the folder) equals the storage's listing (``Storage.check_source``): sub-folders, a
    linked folder, upper-case and doubled suffixes, hidden and non-image files, non-ASCII names, a
    stem of two files; a missing or image-less folder gets the storage's error."""
    import os

    from dncut.data.datasets import DatasetLayoutError
    from dncut.eval import inputs
    from dncut.storage import Storage

    root = tmp_path / "DUTS" / "images"
    for name in ["a.jpg", "a.PNG", "B.JPEG", "sub/c.jpg", "sub/deep/d.png", ".hidden.jpg", "notes.txt", "é.jpg",
                 "x.tar.jpg", "sub/e.webp", "z.bmp", *[f"many/{i:03d}.jpg" for i in range(11)]]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "f.jpg").write_bytes(b"x")
    os.symlink(tmp_path / "elsewhere", root / "linked")
    folder = {"plain": str(root), "trailing slash": f"{root}/", "double slash": str(root).replace("/DUTS", "//DUTS")}[
        spelling]
    store = Storage()
    sizes: list[int] = []
    real = inputs.stem_array
    monkeypatch.setattr(inputs, "LIST_CHUNK", 3)
    monkeypatch.setattr(inputs, "stem_array", lambda f, uris: (sizes.append(len(uris)), real(f, uris))[1])
    stems, uris = inputs.stem_columns(folder, "images", "l", store)
    assert sizes and max(sizes) <= 3  # chunks, not the whole listing
    expected = inputs.stems(folder, "images", "l", store)  # the storage's listing, a dict
    assert dict(zip(stems.to_pylist(), uris.to_pylist())) == expected
    assert stems.to_pylist() == sorted(expected) and "linked/f" in expected and "x.tar" in expected

    monkeypatch.setattr(inputs, "_local_columns", lambda *a: None)  # the storage's path gives the same arrays
    assert [a.to_pylist() for a in inputs.stem_columns(folder, "images", "l", store)] == [stems.to_pylist(),
                                                                                           uris.to_pylist()]
    monkeypatch.undo()
    for bad, message in ((tmp_path / "nope", "does not exist"), (tmp_path / "elsewhere" / "f.jpg", "not a folder")):
        with pytest.raises(DatasetLayoutError, match=message):
            inputs.stem_columns(str(bad), "images", "l", store)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.txt").write_bytes(b"x")
    with pytest.raises(DatasetLayoutError, match="images folder"):
        inputs.stem_columns(str(tmp_path / "empty"), "images", "l", store)
