"""Fine-tuning: the paper's variants (pure), and real DeepSpeed ZeRO-2 training on 2 Ray Train CPU workers."""

from pathlib import Path

import pandas as pd
import pytest
from conftest import balanced

from llambert_ray.config import TrainConfig
from llambert_ray.train import TrainError, variant_stages

ANN = pd.DataFrame({"text": ["a", "b", "c", "d"], "label": ["positive", "negative", "positive", None],
                    "llm_label": ["positive", None, "negative", "negative"],
                    "llm_confidence": [0.9, None, 0.55, 0.8]})
EXTRA = pd.DataFrame({"text": ["e", "f"], "llm_label": ["negative", "positive"], "llm_confidence": [0.7, 0.95]})


def test_variant_stages():
    (name, gold), = variant_stages("gold", ANN)
    assert name == "gold" and gold["label"].tolist() == ["positive", "negative", "positive"]
    (_, llm), = variant_stages("llm", ANN)
    assert llm["text"].tolist() == ["a", "c", "d"]  # the dropped answer (None) is left out
    (_, conf), = variant_stages("llm", ANN, min_confidence=0.6)
    assert conf["text"].tolist() == ["a", "d"]
    (_, ext), = variant_stages("llm+extra", ANN, EXTRA)
    assert len(ext) == 5
    stages = variant_stages("combined", ANN, EXTRA)
    assert [s[0] for s in stages] == ["llm", "gold"] and len(stages[0][1]) == 5
    with pytest.raises(TrainError, match="extra"):
        variant_stages("llm+extra", ANN)
    with pytest.raises(TrainError, match="unknown variant"):
        variant_stages("magic", ANN)
    with pytest.raises(TrainError, match="gold labels"):
        variant_stages("gold", ANN.assign(label=None))


@pytest.mark.parametrize("keep", [False, True])
def test_checkpoints_go_once_the_variants_model_is_written(tmp_path, monkeypatch, keep):
    """Each stage's Ray Train checkpoints (here stand-ins: fit is faked, Ray Train is tested below) stay while the
    variant runs, so a killed run resumes from them; once OUTPUT/model is written the stage folders are deleted,
    unless train.keep_checkpoints."""
    import llambert_ray.train as train_mod
    from llambert_ray.train import TrainResult, fit_variant

    fail_at: dict = {"stage": None}

    def fake_fit(frame, labels, cfg, output_dir, *, init_model=None, name="train", **kw):
        (output_dir / "ray_train" / name / "checkpoint_000000").mkdir(parents=True, exist_ok=True)
        if fail_at["stage"] and name.endswith(fail_at["stage"]):
            raise RuntimeError("killed")
        (output_dir / "model").mkdir(exist_ok=True)
        (output_dir / "model" / "config.json").write_text("{}")
        return TrainResult(str(output_dir / "model"), len(frame), cfg.epochs, 1.0, 1.0, {})

    monkeypatch.setattr(train_mod, "fit", fake_fit)
    cfg = TrainConfig(keep_checkpoints=keep)
    fail_at["stage"] = "stage2"  # killed in stage 2: every checkpoint so far stays
    with pytest.raises(RuntimeError):
        fit_variant("combined", ANN, ["positive", "negative"], cfg, tmp_path, extra=EXTRA, log=lambda m: None)
    assert list(tmp_path.glob("stage*/ray_train/*/checkpoint_*")) and not (tmp_path / "model").exists()
    fail_at["stage"] = None
    final, results = fit_variant("combined", ANN, ["positive", "negative"], cfg, tmp_path, extra=EXTRA,
                                 log=lambda m: None)
    assert (final / "config.json").exists() and len(results) == 2
    assert bool(list(tmp_path.glob("stage*/ray_train"))) == keep
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("stage")) == ([] if not keep else
                                                                                        ["stage1", "stage2"])


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_zero3_saves_the_whole_gathered_model(ray_local, tweets_frame, tmp_path):
    """ZeRO-3 partitions every parameter over the workers; the saved HF model must hold the whole, trained
    weights (gathered on every rank, written by rank 0), not the empty partitions: the stop rule's chosen epoch,
    saved when it was measured."""
    import torch
    from sklearn.metrics import f1_score
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from llambert_ray.models import resolve_model
    from llambert_ray.train import fit
    from llambert_ray.train_loop import chosen_epoch

    train = balanced(tweets_frame[tweets_frame["split"] == "train"], 32)
    # also the soft-target path with class weights, as the LLM's rows reach it (variant_stages keeps their scores)
    train = train.assign(llm_confidence=0.8, llm_raw='{"positive": -0.3, "negative": -1.4}')
    # and the stop rule: a held-out slice measures each epoch; the chosen epoch's model, saved whole under ZeRO-3
    # when it was measured, is the one kept
    cfg = TrainConfig(workers=2, cpus_per_worker=0.5, zero_stage=3, epochs=1, batch_size=8, max_length=32,
                      learning_rate=1e-4, targets="soft", class_balance="weighted", stop_rule="agreement",
                      stop_holdout=0.25)
    r = fit(train[["text", "label", "llm_confidence", "llm_raw"]], ["positive", "negative"], cfg, tmp_path,
            name="zero3")
    history = r.metrics["history"]
    last = history[-1]
    assert last["targets"] == "soft" and last["class_weights"] == [1.0, 1.0], last  # balanced: 32 rows each
    assert 0.49 < last["train_loss"] < 5, last  # a soft cross-entropy: never below the targets' entropy, 0.50
    assert [h["epoch"] for h in history] == [0] and all(0 <= h["agreement_macro_f1"] <= 1 for h in history)
    chosen = r.metrics["chosen_epoch"]
    assert chosen == chosen_epoch(history) == 0  # (which epoch wins: test_the_stop_rule_keeps_the_first_...)
    # the model kept is the chosen epoch's: its macro F1 on the held-out rows is the one measured for that epoch
    held = train[["text", "label"]].reset_index(drop=True).sample(frac=0.25, random_state=0)
    tok = AutoTokenizer.from_pretrained(r.model_dir)
    saved = AutoModelForSequenceClassification.from_pretrained(r.model_dir).eval()
    with torch.no_grad():
        pred = saved(**tok(held["text"].tolist(), truncation=True, max_length=32, padding=True,
                           return_tensors="pt")).logits.argmax(-1).numpy()
    f1 = f1_score([["positive", "negative"].index(v) for v in held["label"]], pred, average="macro")
    assert f1 == pytest.approx(history[chosen]["agreement_macro_f1"], abs=1e-6), (f1, history)
    base = AutoModelForSequenceClassification.from_pretrained(resolve_model("minilm-l6"), num_labels=2)
    w, w0 = saved.bert.embeddings.word_embeddings.weight, base.bert.embeddings.word_embeddings.weight
    assert w.shape == w0.shape and w.abs().sum() > 0  # whole, not a 0-sized partition
    enc = saved.bert.encoder.layer[0].attention.self.query.weight
    enc0 = base.bert.encoder.layer[0].attention.self.query.weight
    assert not torch.allclose(enc, enc0)  # trained, not the initial weights


@pytest.mark.ray
@pytest.mark.timeout(1500)
def test_killed_worker_resumes_from_last_checkpoint(ray_local, tweets_frame, tmp_path):
    """DeepSpeed ZeRO-2, 2 Ray Train workers over gloo, on real tweets; one worker SIGKILLed during epoch 1 of 3,
    once the epoch-0 checkpoint is registered: Ray Train (FailureConfig.max_failures) restarts the worker group, the
    loop restores the DeepSpeed checkpoint, and training continues at epoch 1 - each epoch once in the history, the
    loss down, held-out accuracy well above chance, and the saved model is the trained one (its accuracy = the last
    epoch's eval accuracy). (This is also the suite's ZeRO-2 learning test: an unkilled run would repeat it.)"""
    import os
    import signal
    import threading
    import time

    import psutil
    import ray

    from llambert_ray.config import LabelConfig
    from llambert_ray.label import label_dataset, model_labels
    from llambert_ray.metrics import classification_metrics
    from llambert_ray.train import fit

    train = balanced(tweets_frame[tweets_frame["split"] == "train"], 160)
    test = balanced(tweets_frame[tweets_frame["split"] == "test"], 100, seed=1)
    cfg = TrainConfig(workers=2, cpus_per_worker=0.5, zero_stage=2, epochs=3, batch_size=16, max_length=48,
                      learning_rate=1e-4, max_failures=2)
    snapshot = tmp_path / "ray_train" / "killed" / "checkpoint_manager_snapshot.json"
    killed: dict = {}

    def train_workers() -> list[int]:
        """PIDs of this session's Ray Train workers (Ray names worker processes ray::<ActorClass>...)."""
        pids = []
        for proc in psutil.Process().children(recursive=True):  # our local Ray's raylet and its workers only
            try:
                if " ".join(proc.cmdline()).startswith("ray::RayTrainWorker"):
                    pids.append(proc.pid)
            except psutil.Error:
                pass
        return pids

    def kill_a_worker_after_first_checkpoint():
        deadline = time.time() + 1200
        while time.time() < deadline and not (snapshot.exists() and "train_loss" in snapshot.read_text()):
            time.sleep(0.5)  # the controller writes the snapshot when it registers a reported checkpoint
        time.sleep(3)  # into epoch 1
        workers = train_workers()
        if workers:
            victim = max(workers)
            killed.update(pid=victim, at=time.time(), alive=len(workers))
            os.kill(victim, signal.SIGKILL)

    killer = threading.Thread(target=kill_a_worker_after_first_checkpoint, daemon=True)
    killer.start()
    t0 = time.time()
    r = fit(train[["text", "label"]], ["positive", "negative"], cfg, tmp_path, eval_df=test, name="killed")
    killer.join(5)
    assert killed.get("alive") == 2, "no training worker was killed"
    assert model_labels(r.model_dir) == ["positive", "negative"]
    hist = r.metrics["history"]
    print(f"\nkilled worker pid {killed['pid']} {killed['at'] - t0:.0f}s into fit; fit took {r.seconds:.0f}s; "
          f"history {[(h['epoch'], h['start_epoch'], round(h['eval_accuracy'], 3)) for h in hist]}")
    assert [h["epoch"] for h in hist] == [0, 1, 2]  # each epoch once: the restored attempt continued at epoch 1
    assert [h["start_epoch"] for h in hist] == [0, 1, 1]  # epoch 0 from the first attempt, 1-2 after the restore
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    preds = label_dataset(ray.data.from_pandas(test[["id", "text", "label"]]), r.model_dir,
                          LabelConfig(cpus_per_actor=0.5)).to_pandas()
    m = classification_metrics(preds["gold"], preds["label"], ["positive", "negative"])
    assert m["accuracy"] >= 0.70, m  # balanced: chance is 0.5
    assert abs(m["accuracy"] - hist[-1]["eval_accuracy"]) < 0.02


def test_deepspeed_is_given_ray_trains_device_not_local_rank(monkeypatch):
    """DeepSpeed places its engine on cuda:LOCAL_RANK unless it is given args.device_rank (DeepSpeedEngine.
    _set_distributed_vars); Ray Train gives each worker its own GPU (get_device), which agrees with LOCAL_RANK only
    by the order Ray starts its workers in. A worker whose Ray device is cuda:1 while LOCAL_RANK is 0 makes cuda:1
    current and hands DeepSpeed device_rank 1, and DeepSpeed's own rule then picks cuda:1. No GPU here: CUDA's
    set_device, DeepSpeed's initialize and its accelerator are recorded stand-ins; model, optimizer and DeepSpeed's
    device rule are the real ones."""
    import types

    import deepspeed
    import deepspeed.runtime.engine as ds_engine
    import torch

    from llambert_ray.train_loop import _deepspeed_engine

    seen: dict = {}

    class Stop(Exception):
        pass

    def initialize(**kw):
        seen["args"] = kw.get("args")
        raise Stop

    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.setdefault("current", torch.device(d)))
    monkeypatch.setattr(deepspeed, "initialize", initialize)
    with pytest.raises(Stop):
        _deepspeed_engine(TrainConfig(), "minilm-l6", ["positive", "negative"], 10, False, torch.device("cuda", 1))
    assert seen["current"] == torch.device("cuda", 1) and seen["args"].device_rank == 1

    accel = types.SimpleNamespace(set_device=lambda r: seen.setdefault("accel_rank", r),
                                  device_name=lambda r: f"cpu:{r}")  # cpu: torch.device needs no GPU to exist
    monkeypatch.setattr(ds_engine, "get_accelerator", lambda: accel)
    monkeypatch.setattr(ds_engine.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(ds_engine.dist, "get_rank", lambda: 0)
    engine = types.SimpleNamespace(local_rank=0)
    ds_engine.DeepSpeedEngine._set_distributed_vars(engine, seen["args"])
    assert seen["accel_rank"] == 1 and engine.device.index == 1
    ds_engine.DeepSpeedEngine._set_distributed_vars(engine, None)  # what it did without our args: LOCAL_RANK's 0
    assert engine.device.index == 0


def test_soft_targets_class_weights_and_the_loss():
    """targets.py: soft targets keep the LLM's (calibrated) confidence on its label and share the rest by its raw
    scores; a temperature sharpens them; rows without scores are one-hot. The loss on one-hot targets is torch's
    cross-entropy (weighted too), on soft targets its gradient is softmax - target; class weights are balanced."""
    import json

    import numpy as np
    import torch
    import torch.nn.functional as F

    from llambert_ray.targets import class_weights, soft_targets, train_loss

    labels = ["a", "b", "c"]
    raw = json.dumps({"a": np.log(0.5), "b": np.log(0.3), "c": np.log(0.2)})
    frame = pd.DataFrame({"label": ["a", "b", "c"], "llm_confidence": [0.5, 0.7, None], "llm_raw": [raw, raw, None]})
    t = soft_targets(frame, labels)
    assert np.allclose(t[0], [0.5, 0.3, 0.2]) and np.allclose(t.sum(axis=1), 1)
    # row 1: calibration moved the label to b with 0.7; a and c share 0.3 as 0.5 : 0.2
    assert np.allclose(t[1], [0.3 * 5 / 7, 0.7, 0.3 * 2 / 7], atol=1e-6)
    assert np.allclose(t[2], [0, 0, 1])  # no scores: one-hot
    # generate / choice mode: llm_raw is the answer's text (the default targets: soft must train on it, one-hot)
    answers = pd.DataFrame({"label": ["a", "c"], "llm_confidence": [0.9, None], "llm_raw": ["A.", '"c"']})
    assert np.allclose(soft_targets(answers, labels), [[1, 0, 0], [0, 0, 1]])
    sharp = soft_targets(frame, labels, temperature=0.5)
    assert sharp[0, 0] > t[0, 0] and np.allclose(sharp[0], np.array([0.25, 0.09, 0.04]) / 0.38, atol=1e-6)
    w = class_weights(pd.Series(["a"] * 8 + ["b"] * 2), labels)
    assert w == [10 / 24, 10 / 6, 1.0]
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]], requires_grad=True)
    y = torch.tensor([0, 2])
    onehot = F.one_hot(y, 3).float()
    assert torch.allclose(train_loss(logits, y), F.cross_entropy(logits, y))
    assert torch.allclose(train_loss(logits, y, onehot), F.cross_entropy(logits, y))
    wt = torch.tensor(w)
    assert torch.allclose(train_loss(logits, y, onehot, wt), F.cross_entropy(logits, y, weight=wt))
    soft = torch.tensor(t[:2])
    train_loss(logits, y, soft).backward()
    expected = (torch.softmax(logits, -1) - soft) / 2
    assert torch.allclose(logits.grad, expected.detach(), atol=1e-6)


def test_relabelled_rows_lose_the_llms_scores():
    from llambert_ray.screening import screen_llm_labels

    ann = pd.DataFrame({"id": ["x", "y"], "llm_label": ["a", "b"], "llm_confidence": [0.9, 0.8],
                        "llm_raw": ['{"a": -0.1, "b": -2.3}', '{"a": -1.6, "b": -0.2}']})
    out = screen_llm_labels(ann, pd.DataFrame({"id": ["x"], "classifier_label": ["b"]}), "relabel")
    assert out["llm_label"].tolist() == ["b", "b"]
    assert out["llm_raw"].isna().tolist() == [True, False] and out["llm_confidence"].isna().tolist() == [True, False]


def test_the_stop_rule_keeps_the_first_epoch_that_agrees_best():
    from llambert_ray.train_loop import chosen_epoch

    h = [{"epoch": 0, "agreement_macro_f1": 0.7}, {"epoch": 1, "agreement_macro_f1": 0.8},
         {"epoch": 2, "agreement_macro_f1": 0.8}, {"epoch": 3, "agreement_macro_f1": 0.6}]
    assert chosen_epoch(h) == 1 and chosen_epoch(h[:1]) == 0
    assert chosen_epoch([{"epoch": 0, "train_loss": 1.0}]) is None


def test_a_finished_runs_final_model_is_no_epoch_to_resume_from(tmp_path, monkeypatch):
    """fit again on a kept output folder: Ray Train hands the worker its latest checkpoint, the final model (no
    DeepSpeed state): the run trains afresh instead of failing in DeepSpeed's load_checkpoint."""
    import ray.train

    from llambert_ray.train_loop import FINAL_MARKER, _restore

    final = tmp_path / "final"
    final.mkdir()
    (final / FINAL_MARKER).write_text("{}")
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint.from_directory(str(final)))

    class Engine:
        def load_checkpoint(self, d, tag):
            assert (Path(d) / tag).is_dir()
            return None, {"epoch": 1, "history": [{"epoch": 0}, {"epoch": 1}]}

    assert _restore(Engine()) == (0, [])
    (final / "ds").mkdir()  # an epoch's DeepSpeed checkpoint: resumed after it
    assert _restore(Engine()) == (2, [{"epoch": 0}, {"epoch": 1}])
