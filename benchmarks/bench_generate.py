"""Long-context generation: unigist.generate (compressed KV cache) vs HF generate (full cache).

Same random-init ~1.1B Llama-style model (TinyLlama shape: hidden 2048, 22 layers,
32 query heads, 4 KV heads, head_dim 64, bf16) for both. For each context length
(raw tokens) it measures:

* KV-cache bytes: HF's DynamicCache at the end of generation vs unigist's GistCache
  (steady state and peak, the peak includes the prefill chunk being processed);
* peak GPU memory above the weights (torch.cuda.max_memory_allocated);
* decode tokens/s (timestamps of the streamed tokens, first to last) and prefill time.

It writes a markdown table (device, torch, transformers, date) to
benchmarks/results/generate.md and the raw numbers next to it as JSON.

    python benchmarks/bench_generate.py                      # GPU, 8k-64k
    python benchmarks/bench_generate.py --smoke              # tiny CPU run of the same code
    python benchmarks/bench_generate.py --fallback-build     # build unigist._C with only the CPU ops and
                                                             # the CUDA eviction op (no attention kernels)
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import shutil
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _nvidia_include_dirs() -> list:
    """cusparse.h & co. from torch's nvidia-* wheels, for toolkits that lack them."""
    try:
        import nvidia
    except ImportError:
        return []
    return [d for root in nvidia.__path__ for d in sorted(glob.glob(os.path.join(root, "*", "include")))
            if os.path.exists(os.path.join(d, "cusparse.h"))]


def fallback_build(dest: str | None = None) -> None:
    """Build unigist._C from ops.cpp + csrc/cpu + csrc/cuda/evict.cu only (the CUDA eviction
    op registers itself), for a machine where the CUDA attention kernels do not build."""
    if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    from torch.utils.cpp_extension import load

    build_dir = tempfile.mkdtemp(prefix="unigist_fallback_")
    sources = [os.path.join(ROOT, "csrc", "ops.cpp")] + sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    sources.append(os.path.join(ROOT, "csrc", "cuda", "evict.cu"))
    std = "-std=c++20" if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 12) else "-std=c++17"
    lib = load(
        name="_C",
        sources=sources,
        extra_include_paths=[os.path.join(ROOT, "csrc")] + _nvidia_include_dirs(),
        extra_cflags=["-O3", std],
        extra_cuda_cflags=["-O3", std, "--expt-relaxed-constexpr", "-DUNIGIST_EVICT_SELF_REGISTER"],
        build_directory=build_dir,
        is_python_module=False,
        verbose=False,
    )
    so = lib if isinstance(lib, str) else glob.glob(os.path.join(build_dir, "_C*.so"))[0]
    import sysconfig

    dest = dest or os.path.join(ROOT, "unigist", "_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    shutil.copy(so, dest)
    print(f"fallback build: {dest}")


def model_config(smoke: bool):
    from transformers import LlamaConfig

    if smoke:
        return LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1 << 17)
    return LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                       num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=1 << 17,
                       rope_theta=10000.0)


class _Stamps:
    """HF streamer that only records when each token arrives."""

    def __init__(self):
        self.t = []

    def put(self, value):
        self.t.append(time.perf_counter())

    def end(self):
        pass


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_memory(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return 0


def _peak(device, base):
    return (torch.cuda.max_memory_allocated(device) - base) if device.type == "cuda" else 0


def run_baseline(model, ids, new_tokens, device):
    base = _reset_memory(device)
    stamps = _Stamps()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids[None], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             streamer=stamps, return_dict_in_generate=True, pad_token_id=0)
    _sync(device)
    t1 = time.perf_counter()
    cache = out.past_key_values
    kv = sum(l.keys.numel() * l.keys.element_size() + l.values.numel() * l.values.element_size()
             for l in cache.layers)
    tok = stamps.t[1:]  # the first put is the prompt
    rate = (len(tok) - 1) / (tok[-1] - tok[0]) if len(tok) > 1 else float("nan")
    res = dict(kv_bytes=kv, peak_gpu_bytes=_peak(device, base), decode_tok_s=rate, prefill_s=tok[0] - t0,
               total_s=t1 - t0, new_tokens=len(tok))
    del out, cache
    return res


def run_unigist(model, ids, new_tokens, chunk, device, eviction):
    import unigist.generate as ug

    base = _reset_memory(device)
    stamps = []
    t0 = time.perf_counter()
    r = ug.generate(model, ids, max_new_tokens=new_tokens, chunk_size=chunk, progress=False, eos_token_id=[],
                    streamer=lambda t, s: stamps.append(time.perf_counter()), eviction=eviction)
    _sync(device)
    t1 = time.perf_counter()
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    return dict(kv_bytes=r.kv["kv_bytes"], peak_kv_bytes=r.kv["peak_kv_bytes"], cache_length=r.kv["cache_length"],
                max_allowed_length=r.kv["max_allowed_length"], seen_tokens=r.kv["seen_tokens"],
                full_cache_bytes=r.kv["full_cache_bytes"], peak_gpu_bytes=_peak(device, base),
                decode_tok_s=rate, prefill_s=stamps[0] - t0, total_s=t1 - t0, new_tokens=len(stamps))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="8192,16384,32768,65536", help="raw context lengths")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--chunk-size", type=int, default=4096)
    ap.add_argument("--ratio", type=int, default=4)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--num-sink", type=int, default=128)
    ap.add_argument("--eviction", default="lazy", choices=["lazy", "strict"])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "generate.md"))
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU (checks the script)")
    ap.add_argument("--fallback-build", action="store_true")
    ap.add_argument("--fallback-dest", default=None, help="where the fallback build puts _C*.so")
    ap.add_argument("--skip-baseline-above", type=int, default=1 << 30)
    ap.add_argument("--profile-context", type=int, default=0,
                    help="also profile (torch.profiler) 16 decode steps of both at this context, printed to stdout")
    ap.add_argument("--kernel-prefill", action="store_true",
                    help="run the first (contiguous) prefill chunk through the gist_attention kernel when built")
    args = ap.parse_args()

    if args.fallback_build:
        fallback_build(args.fallback_dest)
        return

    sys.path.insert(0, ROOT)
    import transformers
    from transformers import LlamaForCausalLM

    import unigist
    from unigist.hf import patch_model, unpatch_model

    unigist.hf.USE_KERNEL_WITH_CACHE = args.kernel_prefill
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    contexts = [int(c) for c in args.contexts.split(",")]
    if args.smoke:
        contexts = [min(c, 1024) for c in contexts[:2]]
        args.window, args.num_sink, args.chunk_size, args.new_tokens = 64, 8, 128, 8

    torch.manual_seed(0)
    mcfg = model_config(args.smoke)
    with torch.device(device):
        model = LlamaForCausalLM(mcfg).to(dtype).eval()
    gcfg = unigist.GistConfig(ratio=args.ratio, window=args.window, num_sink=args.num_sink)
    gcfg = patch_model(model, None, gcfg)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"device {device}, {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params, {gcfg}, "
          f"cuda kernels: {unigist.has_cuda_kernels()}", flush=True)

    def baseline_mode():
        unpatch_model(model)
        model.set_attn_implementation("sdpa")

    def unigist_mode():
        patch_model(model, None, gcfg)

    # warm-up (kernels, cuBLAS, allocator)
    warm = torch.randint(0, mcfg.vocab_size - 1, (min(2048, contexts[0]),), device=device)
    baseline_mode()
    run_baseline(model, warm, 4, device)
    unigist_mode()
    run_unigist(model, warm, 4, args.chunk_size, device, args.eviction)

    if args.profile_context:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        ids = torch.randint(0, mcfg.vocab_size - 1, (args.profile_context,), device=device)
        for name, mode, fn in (
            ("unigist", unigist_mode, lambda n: run_unigist(model, ids, n, args.profile_context * 2, device,
                                                            args.eviction)),
            ("baseline", baseline_mode, lambda n: run_baseline(model, ids, n, device)),
        ):
            mode()
            fn(2)
            with profile(activities=acts) as prof:
                res = fn(17)
            print(f"\n=== profile {name}: context {args.profile_context}, 1 prefill forward + 16 decode steps; "
                  f"decode {res['decode_tok_s']:.1f} tok/s", flush=True)
            ka = prof.key_averages()
            print(ka.table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=60), flush=True)
            if device.type == "cuda":
                print(ka.table(sort_by="self_cuda_time_total" if hasattr(ka[0], "self_cuda_time_total")
                               else "self_device_time_total", row_limit=12, max_name_column_width=60), flush=True)

    rows = []
    for ctx in contexts:
        ids = torch.randint(0, mcfg.vocab_size - 1, (ctx,), device=device)
        unigist_mode()
        ours = run_unigist(model, ids, args.new_tokens, args.chunk_size, device, args.eviction)
        print(f"[{ctx}] unigist {ours}", flush=True)
        base = base_nocudnn = None
        if ctx <= args.skip_baseline_above:
            baseline_mode()
            try:
                base = run_baseline(model, ids, args.new_tokens, device)
                if device.type == "cuda":
                    # torch's default SDPA backend on H100 is cuDNN, which re-plans for every new key
                    # length (~2 ms CPU per call): also time the baseline without it.
                    torch.backends.cuda.enable_cudnn_sdp(False)
                    try:
                        base_nocudnn = run_baseline(model, ids, args.new_tokens, device)
                    finally:
                        torch.backends.cuda.enable_cudnn_sdp(True)
            except torch.OutOfMemoryError as exc:  # pragma: no cover
                base = {"error": f"OOM: {exc}"[:200]}
            print(f"[{ctx}] baseline {base}\n[{ctx}] baseline, cuDNN SDPA off {base_nocudnn}", flush=True)
        rows.append(dict(context=ctx, unigist=ours, baseline=base, baseline_no_cudnn=base_nocudnn))
    unigist_mode()

    # ------------------------------------------------------------------ report
    row_bytes = ours["full_cache_bytes"] / ours["seen_tokens"]  # one position, all layers, K+V
    mib = 1024 * 1024
    lines = [
        "# Generation benchmark: unigist.generate vs HF generate (full cache)",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}; "
        f"transformers {transformers.__version__}; unigist CUDA attention kernels: {unigist.has_cuda_kernels()}",
        f"- model: random-init Llama, {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params, hidden "
        f"{mcfg.hidden_size}, {mcfg.num_hidden_layers} layers, {mcfg.num_attention_heads} q heads / "
        f"{mcfg.num_key_value_heads} kv heads, head_dim {mcfg.hidden_size // mcfg.num_attention_heads}, {dtype}; "
        f"weights {weights / mib:.0f} MiB",
        f"- unigist: ratio {gcfg.ratio}, window {gcfg.window}, num_sink {gcfg.num_sink}, prefill chunk "
        f"{args.chunk_size}, eviction '{args.eviction}'; baseline: `model.generate` with sdpa attention and a "
        "DynamicCache, greedy",
        f"- {args.new_tokens} new tokens per run; decode tok/s from the arrival times of the streamed tokens "
        "(first to last); peak GPU = max_memory_allocated above the weights during the run",
        "",
        "| context (raw) | positions (with gists) | KV full cache (MiB) | KV unigist now / peak (MiB) | KV ratio "
        "| target (MiB) | peak GPU full / unigist (MiB) | decode tok/s full / full, cuDNN off / unigist "
        "| prefill s full / unigist |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        o, b = row["unigist"], row["baseline"]
        target = (o["seen_tokens"] / (gcfg.ratio + 1) + gcfg.window + gcfg.num_sink) * row_bytes
        ok = "ok" if o["kv_bytes"] <= target else "MISSED"
        if b is None or "error" in b:
            bcells = ("-", "-", "-", "-")
            ratio = "-"
        else:
            nc = row.get("baseline_no_cudnn")
            dec = f"{b['decode_tok_s']:.1f} / " + (f"{nc['decode_tok_s']:.1f}" if nc else "-")
            bcells = (f"{b['kv_bytes'] / mib:.0f}", f"{b['peak_gpu_bytes'] / mib:.0f}", dec, f"{b['prefill_s']:.2f}")
            ratio = f"{b['kv_bytes'] / o['kv_bytes']:.2f}x"
        lines.append(
            f"| {row['context']} | {o['seen_tokens']} | {bcells[0]} | {o['kv_bytes'] / mib:.0f} / "
            f"{o['peak_kv_bytes'] / mib:.0f} | {ratio} | {target / mib:.0f} ({ok}) | {bcells[1]} / "
            f"{o['peak_gpu_bytes'] / mib:.0f} | {bcells[2]} / {o['decode_tok_s']:.1f} | {bcells[3]} / "
            f"{o['prefill_s']:.2f} |"
        )
    lines += [
        "",
        "Target column: (positions / (ratio + 1) + window + num_sink) x bytes per position, i.e. 1/(r+1) of the full "
        "cache of the interleaved sequence plus window and sinks. Against the baseline's cache of the raw tokens "
        "only, the steady-state cache is about 1/r of it plus window and sinks (the gists are extra tokens).",
        "The unigist peak KV includes the prefill chunk being processed. unigist's attention skips the cuDNN SDPA "
        "backend for decoding (it re-plans for every new key length, ~2 ms CPU per layer and step); the "
        "'full, cuDNN off' column is the baseline with that backend disabled too.",
        "",
    ]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(dict(args=vars(args), rows=rows), f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
