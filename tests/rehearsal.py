"""Test-only fixtures for a CPU rehearsal of the 70B topology (TP engines, hub ids, RoBERTa, several nodes).

Everything here is built offline from the packaged models:
- `make_tiny_llama`: a random-weight Llama whose heads divide 2 (TP=2), with the SmolLM2 tokenizer;
- `make_tiny_roberta`: a random-weight RoBERTa with a byte-level BPE RoBERTa tokenizer made from SmolLM2's
  vocabulary (<s>=0, <pad>=1, </s>=2, <unk>=3, no token_type_ids: as roberta-large's);
- `make_hub_cache`: an HF hub cache (HF_HOME/hub/models--org--name/...) holding a local folder under a hub id, so
  `from_pretrained("org/name")` and vLLM load it with HF_HUB_OFFLINE=1;
- `RehearsalCluster`: a head and N worker nodes started with `ray start` on 127.0.0.1, each node with its own
  temp dir, ports, CPU count and working directory; teardown kills only its own processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


# ------------------------------------------------------------------------------------------ tiny models
def make_tiny_llama(out_dir: str | Path, *, hidden: int = 128, heads: int = 4, kv_heads: int = 2, layers: int = 2,
                    intermediate: int = 256, max_positions: int = 2048, seed: int = 0) -> Path:
    """A random-weight LlamaForCausalLM (fp32, ~25 MB at the defaults) with the packaged SmolLM2 tokenizer and
    chat template, saved as an HF folder. head_dim = hidden / heads must be one vLLM's CPU attention supports
    (32, 64, 80, ...); heads and kv_heads must divide the tensor-parallel size. Idempotent (kept when complete)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llambert_ray.models import resolve_model

    out = Path(out_dir)
    if (out / ".complete").exists():
        return out
    src = Path(resolve_model("smollm2-135m-instruct"))
    src_cfg = json.loads((src / "config.json").read_text())
    cfg = LlamaConfig(vocab_size=src_cfg["vocab_size"], hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      head_dim=hidden // heads, max_position_embeddings=max_positions, tie_word_embeddings=True,
                      bos_token_id=src_cfg.get("bos_token_id"), eos_token_id=src_cfg.get("eos_token_id"),
                      pad_token_id=src_cfg.get("pad_token_id"), rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, out / name)
    (out / ".complete").write_text("tiny llama for TP rehearsal\n")
    return out


def make_tp_ready_smollm2(out_dir: str | Path, *, heads: int = 12, kv_heads: int = 4) -> Path:
    """The packaged SmolLM2-135M-Instruct with its attention widened from 9 heads / 3 KV heads to 12 / 4, so that
    tensor parallelism over 2 ranks is allowed, and with the SAME outputs: the added query, key and value heads have
    zero weights and their o_proj columns are zero, so they add nothing (GQA groups stay 3 query heads per KV head:
    heads 0-8 keep their KV heads). A TP engine then gives real answers the annotation can parse. Idempotent."""
    import torch
    from safetensors.torch import load_file, save_file

    from llambert_ray.models import resolve_model

    out = Path(out_dir)
    if (out / ".complete").exists():
        return out
    src = Path(resolve_model("smollm2-135m-instruct"))
    cfg = json.loads((src / "config.json").read_text())
    h0, kv0, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    assert heads // kv_heads == h0 // kv0 and heads >= h0 and kv_heads >= kv0
    sd = load_file(str(src / "model.safetensors"))
    for k, w in list(sd.items()):
        if k.endswith("self_attn.q_proj.weight"):
            sd[k] = torch.cat([w, torch.zeros((heads - h0) * d, w.shape[1], dtype=w.dtype)])
        elif k.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            sd[k] = torch.cat([w, torch.zeros((kv_heads - kv0) * d, w.shape[1], dtype=w.dtype)])
        elif k.endswith("self_attn.o_proj.weight"):
            sd[k] = torch.cat([w, torch.zeros(w.shape[0], (heads - h0) * d, dtype=w.dtype)], dim=1)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg.update(num_attention_heads=heads, num_key_value_heads=kv_heads)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith(".") and f.name not in ("config.json", "model.safetensors"):
            shutil.copy2(f, out / f.name)
    (out / ".complete").write_text("SmolLM2-135M widened to 12 heads / 4 KV heads (same outputs)\n")
    return out


def roberta_tokenizer_from_smollm2():
    """A RobertaTokenizer (byte-level BPE, RoBERTa's specials and post-processor, no token_type_ids) whose vocabulary
    and merges are SmolLM2's: the only byte-level BPE that ships offline. SmolLM2's own special tokens are dropped;
    <s>, <pad>, </s>, <unk> take ids 0-3 (as in roberta-large) and <mask> the last id."""
    from transformers import RobertaTokenizer

    from llambert_ray.models import resolve_model

    tj = json.loads((Path(resolve_model("smollm2-135m-instruct")) / "tokenizer.json").read_text())
    specials = {t["content"] for t in tj.get("added_tokens", []) if t.get("special")}
    words = [w for w, _ in sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1]) if w not in specials]
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    vocab["<mask>"] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in tj["model"]["merges"]]
    return RobertaTokenizer(vocab=vocab, merges=merges, model_max_length=512)


def make_tiny_roberta(out_dir: str | Path, *, hidden: int = 64, layers: int = 2, heads: int = 2,
                      max_length: int = 512, seed: int = 0, head: bool = False) -> Path:
    """A random-weight RoBERTa saved as an HF folder with `roberta_tokenizer_from_smollm2()`: RoBERTa's shapes where
    they matter (type_vocab_size 1, pad id 1, position ids offset by pad+1 so max_position_embeddings =
    max_length + 2, tokenizer without token_type_ids). `head`: save a RobertaForSequenceClassification (2 labels)
    instead of the base RobertaModel (what a hub checkpoint like roberta-large is). Idempotent."""
    import torch
    from transformers import RobertaConfig, RobertaForSequenceClassification, RobertaModel

    out = Path(out_dir)
    if (out / ".complete").exists():
        return out
    tok = roberta_tokenizer_from_smollm2()
    cfg = RobertaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=4 * hidden, max_position_embeddings=max_length + 2, type_vocab_size=1,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        layer_norm_eps=1e-5)
    torch.manual_seed(seed)
    model = (RobertaForSequenceClassification(cfg) if head else RobertaModel(cfg, add_pooling_layer=True))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / ".complete").write_text("tiny roberta for the rehearsal\n")
    return out


# ------------------------------------------------------------------------------------------ offline hub cache
def make_hub_cache(hf_home: str | Path, repo_id: str, src_folder: str | Path, *, revision: str = "main") -> Path:
    """Put the files of `src_folder` into the HF hub cache under HF_HOME as `repo_id` (org/name) at `revision`,
    laid out as huggingface_hub writes it (blobs/, snapshots/<commit>/, refs/<revision>), so that with
    HF_HOME=hf_home and HF_HUB_OFFLINE=1, `from_pretrained(repo_id)` and vLLM resolve it without a network.
    The commit hash is made from the files' names and sizes. Returns the snapshot folder."""
    src = Path(src_folder)
    files = sorted(p for p in src.rglob("*") if p.is_file() and not p.name.startswith("."))
    commit = hashlib.sha1("|".join(f"{p.relative_to(src)}:{p.stat().st_size}" for p in files).encode()).hexdigest()
    repo = Path(hf_home) / "hub" / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    for p in files:
        rel = p.relative_to(src)
        blob = repo / "blobs" / _file_hash(p)
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copy2(p, blob)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snap


def _file_hash(p: Path) -> str:
    with open(p, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def offline_hub_env(hf_home: str | Path) -> dict[str, str]:
    """Env vars under which hub ids resolve from `hf_home`'s cache only (no network attempt)."""
    return {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


# ------------------------------------------------------------------------------------------ a multi-node cluster
def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class RehearsalCluster:
    """A head and worker nodes started with the real `ray start` CLI on 127.0.0.1.

    `node_cpus`: CPUs per node, head first (e.g. [0, 1, 1]: a head that runs no work, two 1-CPU workers). Each node
    has its own ports, its own working directory (ROOT/node<i>, the cwd of its `ray start`) and, for the head, the
    cluster's temp dir (ROOT/tmp: keep ROOT short, Ray's socket paths must stay under 107 characters). `env` is
    added to every node's environment (e.g. `offline_hub_env`). `stop()` kills only this cluster's processes.
    """

    def __init__(self, root: str | Path, node_cpus: list[float], *, env: dict[str, str] | None = None,
                 object_store_bytes: int = 400_000_000, groups: list[str] | None = None):
        self.root = Path(root)
        self.temp_dir = self.root / "tmp"
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        self.node_cpus = list(node_cpus)
        self.object_store_bytes = object_store_bytes
        self.procs: list[subprocess.Popen] = []
        self.workdirs: list[Path] = []
        gcs, dash, client = free_ports(3)
        self.gcs, self.dashboard = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}"
        self.head_extra = ["--head", f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                           f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
                           f"--temp-dir={self.temp_dir}"]
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env.update({"RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu",
                         "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})})
        groups = groups or ["head"] + ["cpu"] * (len(node_cpus) - 1)
        self.cmds = [self._cmd(i, cpus, groups[i]) for i, cpus in enumerate(node_cpus)]

    def _cmd(self, i: int, cpus: float, group: str) -> list[str]:
        """`ray start` for node i: its own ports; the node label llambert/group, as the manifests' groups have."""
        self.workdirs.append(self.root / f"node{i}")
        nm, om, agent, agent_grpc, metrics, renv, wmin = free_ports(7)
        common = ["--node-ip-address=127.0.0.1", f"--node-manager-port={nm}", f"--object-manager-port={om}",
                  f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                  f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={renv}",
                  f"--min-worker-port={wmin}", f"--max-worker-port={wmin + 60}", f"--num-cpus={cpus}",
                  f"--object-store-memory={self.object_store_bytes}", "--disable-usage-stats", "--block",
                  f"--resources={json.dumps({f'node{i}': 1})}", f"--labels=llambert/group={group}"]
        # each worker node its own temp dir, as separate machines have: nodes sharing one would share its
        # runtime_resources folder, and a node's runtime-env agent deleting a job's working dir there when its own
        # last task using it ends would delete it from under the other nodes (seen once preflight ran a task per node)
        own = [] if i == 0 else [f"--address={self.gcs}", f"--temp-dir={self.temp_dir}{i}"]
        return [RAY, "start", *(self.head_extra if i == 0 else own), *common]

    def add_node(self, cpus: float, group: str = "cpu", timeout_s: float = 240, attempts: int = 12) -> int:
        """Start one more worker node (as an autoscaler would) and wait until it is alive; returns its index.
        More attempts than at start: it joins while stages load both cores, and `ray start` gives a raylet only
        30 s (hard-coded in Ray 2.60's node.py) to register with the GCS, which a loaded machine can miss."""
        i = len(self.cmds)
        self.node_cpus.append(cpus)
        self.cmds.append(self._cmd(i, cpus, group))
        self._start_node(i, self.cmds[i], timeout_s, attempts)
        return i

    def start(self, timeout_s: float = 240, attempts: int = 5) -> RehearsalCluster:
        for i, cmd in enumerate(self.cmds):
            self._start_node(i, cmd, timeout_s, attempts)
        return self

    def __enter__(self) -> RehearsalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start_node(self, i: int, cmd: list[str], timeout_s: float, attempts: int = 3) -> None:
        self.workdirs[i].mkdir(parents=True, exist_ok=True)
        for attempt in range(attempts):
            # On a loaded 2-core machine a raylet can miss its start-up deadlines and exit: start it again.
            log = open(self.root / f"node{i}-{attempt}.log", "w")
            self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True, cwd=self.workdirs[i]))
            try:
                self._wait(i + 1, timeout_s)
                return
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
                node = self.procs.pop()
                try:
                    os.killpg(node.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                time.sleep(5)

    def alive_nodes(self) -> list:
        from ray.util.state import list_nodes

        return [n for n in list_nodes(address=self.dashboard, raise_on_missing_output=False) if n.state == "ALIVE"]

    def _wait(self, n: int, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.procs[-1].poll() is not None:
                break
            try:
                if len(self.alive_nodes()) >= n:
                    return
            except Exception:
                pass
            time.sleep(2)
        logs = "\n".join(f.read_text()[-2000:] for f in sorted(self.root.glob("node*.log")))
        raise RuntimeError(f"cluster did not reach {n} nodes in {timeout_s}s:\n{logs}")

    def stop(self) -> None:
        import psutil

        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        marks = (str(self.temp_dir), self.gcs)
        for proc in psutil.process_iter(["cmdline"]):
            cmd = " ".join(proc.info.get("cmdline") or [])
            if any(m in cmd for m in marks):
                try:
                    proc.kill()
                except psutil.Error:
                    pass
