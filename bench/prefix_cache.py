"""Prefix caching on CPU, side by side: 32-token KV blocks (our CPU default) vs vLLM's 128 on 400 MeSH terms,
whole calls and with the engine's start-up (an annotate call on 2 short terms) taken out.

    python -m bench.prefix_cache   -> bench/results/prefix_cache_mesh.json
"""

import argparse
import json

from bench.run import RESULTS, _excl_start, annotate_ours, engine_start, mesh_terms
from llambert_ray.ray_env import init_ray
from llambert_ray.tasks import load_task


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    init_ray(None, num_cpus=2)
    mesh = load_task("mesh-anatomy")
    terms = mesh_terms(400)
    res = {}
    for name, kw in (("block32_prefix_cache", {}), ("block128_vllm_cpu_default", {"block_size": 128})):
        res[name] = annotate_ours(terms, mesh, **kw)
        print(name, json.dumps(res[name]), flush=True)
    res["engine_start"] = engine_start(mesh, terms)
    ex = [_excl_start(res[k], res["engine_start"]["seconds"]) for k in ("block32_prefix_cache",
                                                                         "block128_vllm_cpu_default")]
    if all(ex):
        res["excl_engine_start_ratio"] = ex[0]["rows_per_s"] / ex[1]["rows_per_s"]
    res["whole_call_ratio"] = res["block32_prefix_cache"]["rows_per_s"] / res["block128_vllm_cpu_default"]["rows_per_s"]
    (RESULTS / "prefix_cache_mesh.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
