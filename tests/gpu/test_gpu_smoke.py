"""GPU smoke: the parity and cluster checks on CUDA, fp32 and bf16 (scripts/gpu_smoke.sh).

Collected only with EPSERVE_GPU=1 (tests/conftest.py), never by `make test`: CI has no GPU.

- Parity: transformers (fp32, CPU: the independent reference) against epserve on CUDA. fp32
  with TF32 off must meet LOGIT_TOL, as on CPU. bf16 meets BF16_LOGIT_TOL = 0.25 on logits of
  magnitude ~10: bf16 keeps 8 mantissa bits (relative error 2^-9 per rounding), and the
  roundings of three layers' matmuls, norms and the head add up to a few hundredths; a real bug
  moves logits by O(1).
- Cluster: every service on the GPU (attention instances `--device cuda`, expert workers
  `--device cuda:0`) in fp32 and bf16; greedy outputs equal the CPU fp32 reference engine's
  under the near-tie rule at the dtype's tolerance.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from services.engine.compare import LOGIT_TOL, assert_same_greedy
from services.local.cluster import ClusterSpec
from services.model.batch import contiguous_batch
from services.model.loader import load_model
from tests.integration.cluster_helpers import reference, run_remote, start, workload
from tests.parity.hf_models import CASES, build

BF16_LOGIT_TOL = 0.25
TOLERANCE = {"float32": LOGIT_TOL, "bfloat16": BF16_LOGIT_TOL}
PROMPT_LENS = (3, 11, 7, 1)

if not torch.cuda.is_available():  # EPSERVE_GPU=1 on a machine without one: say so loudly
    raise RuntimeError("EPSERVE_GPU=1 but torch sees no CUDA device")
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


@pytest.mark.parametrize("dtype", sorted(TOLERANCE))
@pytest.mark.parametrize("case", sorted(CASES))
def test_cuda_logits_match_transformers(case, dtype, tmp_path):
    hf = build(case, tmp_path)
    ours = load_model(tmp_path, dtype=getattr(torch, dtype), device="cuda")
    prompts = _prompts(ours.cfg.vocab_size)
    stride = max(PROMPT_LENS)
    caches = [torch.zeros(len(prompts) * stride, ours.cfg.latent_dim, dtype=ours.dtype,
                          device="cuda") for _ in range(ours.cfg.num_hidden_layers)]
    batch = contiguous_batch([0] * len(prompts), [len(p) for p in prompts], stride)
    ids = torch.tensor([t for p in prompts for t in p], device="cuda")
    got = ours(ids, batch, caches, all_logits=True).float().cpu()
    worst, start_at = 0.0, 0
    for p in prompts:
        with torch.no_grad():
            want = hf(torch.tensor([p])).logits[0].float()
        worst = max(worst, (got[start_at:start_at + len(p)] - want).abs().max().item())
        start_at += len(p)
    print(f"{case} {dtype} cuda: max |logit diff| = {worst:.2e} (tolerance {TOLERANCE[dtype]})")
    assert worst < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", sorted(TOLERANCE))
def test_cluster_on_the_gpu_equals_the_cpu_reference(tiny_model_dir, dtype):
    flags = ("--device", "cuda", "--dtype", dtype)
    spec = ClusterSpec(model=str(tiny_model_dir), prefill=1, decode=1, expert_workers=2,
                       extra={"prefill": flags, "decode": flags,
                              "expert-worker": ("--device", "cuda:0", "--dtype", dtype)})
    cluster = start(spec)
    try:
        reqs = [r for r in workload(512, seed=3) if r.params.greedy]
        expected = reference(tiny_model_dir, reqs)
        got = asyncio.run(run_remote(cluster.router_endpoint, reqs, suffix=f"-{dtype}"))
        assert_same_greedy([e.token_ids for e in expected], [g.token_ids for g in got],
                           expected_logits=[e.logits for e in expected], tol=TOLERANCE[dtype])
    finally:
        cluster.stop()
