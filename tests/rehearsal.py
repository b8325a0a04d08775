"""Test-only fixtures for a CPU rehearsal of the 70B topology (TP engines, hub ids, RoBERTa, several nodes).

Everything here is built offline from the packaged models:
- `make_tiny_llama`: a random-weight Llama whose heads divide 2 (TP=2), with the SmolLM2 tokenizer;
- `make_tiny_roberta`: a random-weight RoBERTa with a byte-level BPE RoBERTa tokenizer made from SmolLM2's
  vocabulary (<s>=0, <pad>=1, </s>=2, <unk>=3, no token_type_ids: as roberta-large's);
- `make_hub_cache`: an HF hub cache (HF_HOME/hub/models--org--name/...) holding a local folder under a hub id, so
  `from_pretrained("org/name")` and vLLM load it with HF_HUB_OFFLINE=1;
- `AutoscalingCluster`: a head started as `ray up` starts one, with Ray's own autoscaler adding and removing
  nodes of the given types (local raylets, Ray's fake multi-node provider); teardown kills only its own processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
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


class AutoscalingCluster:
    """A Ray cluster grown and shrunk by Ray's own autoscaler, on this machine.

    The head is started as `ray up` starts one: `ray start --head --autoscaling-config=FILE`, so Ray's monitor
    process runs the real autoscaler (v1, the one `ray up` and KubeRay's v1 sidecar run). Its node provider is Ray's
    fake multi-node provider (RAY_FAKE_CLUSTER=1): where a cloud provider would boot a VM or a pod, it starts a real
    raylet on this machine with the node type's resources and labels. What is a stand-in: the provider (local
    raylets, not machines), and the resources a node type declares (CPUs here stand for a group's GPUs; all nodes
    share this machine's 2 cores and one session folder). Everything above it (demand-driven scale-up, the choice
    of node type for a bundle, idle scale-down, node failure handling) is the real autoscaler.

    `node_types`: {name: {"resources": {...}, "min_workers": n, "max_workers": m}}; each node gets the label
    llambert/group=<name>, as the manifests' groups do. `stop()` kills only this cluster's processes.
    """

    def __init__(self, root: str | Path, node_types: dict[str, dict], *, env: dict[str, str] | None = None,
                 object_store_bytes: int = 300_000_000, idle_timeout_minutes: float = 0.5):
        self.root = Path(root)
        self.temp_dir = self.root / "tmp"  # keep ROOT short: Ray's socket paths must stay under 107 characters
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        self.workdir = self.root / "head"
        self.workdir.mkdir(exist_ok=True)
        gcs, dash, client = free_ports(3)
        self.gcs, self.dashboard = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}"
        types = {"ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}}
        for name, t in node_types.items():
            res = {"object_store_memory": object_store_bytes, **t["resources"]}
            types[name] = {"resources": res, "labels": {"llambert/group": name}, "node_config": {},
                           "min_workers": t.get("min_workers", 0), "max_workers": t["max_workers"]}
        self.config = {
            "cluster_name": "llambert-rehearsal", "max_workers": sum(t["max_workers"] for t in node_types.values()),
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": self.gcs},
            "available_node_types": types, "head_node_type": "ray.head.default", "auth": {},
            "upscaling_speed": 1.0, "idle_timeout_minutes": idle_timeout_minutes, "docker": {},
            "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": []}
        self.config_file = self.root / "autoscaling.json"
        self.config_file.write_text(json.dumps(self.config, indent=1))
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env.update({"RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu",
                         "VLLM_CPU_KVCACHE_SPACE": "1", "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                         **(env or {})})
        # every port of the head its own free one: another Ray on this machine (the suite's local one) holds the
        # defaults, and a head whose dashboard agent cannot bind 52365 takes no job ("No available agent")
        nm, om, agent, agent_grpc, metrics, renv, wmin = free_ports(7)
        ports = [f"--node-manager-port={nm}", f"--object-manager-port={om}", f"--dashboard-agent-listen-port={agent}",
                 f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
                 f"--runtime-env-agent-port={renv}", f"--min-worker-port={wmin}", f"--max-worker-port={wmin + 60}"]
        self.cmd = [RAY, "start", "--head", f"--port={gcs}", *ports, "--node-ip-address=127.0.0.1", "--num-cpus=0",
                    f"--object-store-memory={object_store_bytes}", "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
                    f"--temp-dir={self.temp_dir}", f"--autoscaling-config={self.config_file}",
                    "--labels=llambert/group=head", "--disable-usage-stats"]
        self.min_nodes = 1 + sum(t.get("min_workers", 0) for t in node_types.values())

    def start(self, timeout_s: float = 240) -> AutoscalingCluster:
        out = subprocess.run(self.cmd, env=self.env, cwd=self.workdir, capture_output=True, text=True,
                             timeout=timeout_s)
        if out.returncode:
            raise RuntimeError(f"ray start --head failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        self.wait_for(lambda nodes: len(nodes) >= self.min_nodes, timeout_s, f"{self.min_nodes} nodes up")
        return self

    def __enter__(self) -> AutoscalingCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def nodes(self, alive: bool = True) -> list:
        """The state API's nodes (alive only, or every node the cluster ever had, with its state)."""
        from ray.util.state import list_nodes

        nodes = list_nodes(address=self.dashboard, raise_on_missing_output=False, limit=1000)
        return [n for n in nodes if n.state == "ALIVE" or not alive]

    def groups(self, alive: bool = True) -> dict[str, int]:
        """{node group: how many nodes}."""
        out: dict[str, int] = {}
        for n in self.nodes(alive):
            g = (n.labels or {}).get("llambert/group", "?")
            out[g] = out.get(g, 0) + 1
        return out

    def wait_for(self, ok, timeout_s: float, what: str) -> list:
        deadline = time.time() + timeout_s
        nodes: list = []
        while time.time() < deadline:
            try:
                nodes = self.nodes()
                if ok(nodes):
                    return nodes
            except Exception:
                pass
            time.sleep(2)
        seen = [(n.node_id[-5:], n.labels) for n in nodes]
        raise RuntimeError(f"cluster: not {what} within {timeout_s}s; nodes: {seen}\n{self.autoscaler_log()[-3000:]}")

    def autoscaler_log(self) -> str:
        return "\n".join(f.read_text(errors="replace") for f in self.temp_dir.glob("session_latest/logs/monitor.*"))

    def workers_on(self, node_id: str, needle: str) -> int:
        """How many worker processes of a node logged `needle` (an actor's class): every node's worker logs lie
        in the one session folder, each naming its node_id."""
        logs = self.temp_dir.glob("session_latest/logs/python-core-worker-*.log")
        return sum(1 for f in logs if _logged(f, node_id, needle))

    def nodes_running(self, needle: str) -> list[str]:
        """The worker nodes on which a process of this cluster runs whose command line (a Ray worker's process
        title names its actor: `ray::MapWorker(MapBatches(Classifier))`) holds `needle`, from the processes
        themselves (the state API can take longer to answer than a loaded 2-core machine leaves an actor alive)."""
        import psutil

        found = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if needle in " ".join(proc.info.get("cmdline") or []):
                    node = proc.environ().get("RAY_OVERRIDE_NODE_ID_FOR_TESTING")
                    if node and node not in found:
                        found.append(node)
            except psutil.Error:
                continue
        return found

    def kill_node(self, node_id: str) -> int:
        """SIGKILL every process of one worker node (its raylet, object store, agents and workers: those whose
        environment names the node, as the fake provider starts them), as a machine lost mid-run; returns how many."""
        import psutil

        killed = 0
        for proc in psutil.process_iter():
            try:
                if proc.environ().get("RAY_OVERRIDE_NODE_ID_FOR_TESTING") == node_id:
                    proc.kill()
                    killed += 1
            except psutil.Error:
                continue
        return killed

    def stop(self) -> None:
        import psutil

        marks = (str(self.root), self.gcs)
        procs = []
        for proc in psutil.process_iter(["cmdline"]):
            cmd = " ".join(proc.info.get("cmdline") or [])
            if any(m in cmd for m in marks):
                procs.append(proc)
        for p in procs:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass


def _logged(log: Path, node_id: str, needle: str) -> bool:
    text = log.read_text(errors="replace")
    return f"node_id={node_id}" in text and needle in text
