"""The 2:4 CUDA kernel (``lowbit/kernels/sparse24_mma.cu``): its data layout on the CPU, the kernel on a GPU.

On the CPU, :func:`emulate` follows the kernel's indexing step by step (values read in place from the
packed layout, the metadata of :func:`sparse_cuda.mma_metadata`, activations in shared-memory fragment
order) through the PTX ISA's register layout of ``mma.sp.m16n8k32``, and must give the exact product.
The ``gpu`` tests run the kernel itself against the reference.
"""

import re
import warnings

import pytest
import torch

import lowbit
from lowbit import pack
from lowbit.bench.common import random_qweight
from lowbit.kernels import dispatch, sparse_cuda
from lowbit.kernels.sparse_cuda import SparseConfig

HAS_CUDA = torch.cuda.is_available()


def group_offset(n: int, group: int) -> int:
    """The kernel's ``group_offset``: byte offset (in a token block's 4 KB) of a tile's group of four
    inputs of token ``n``: step (h, u) row of 64 bytes, chunk slot xor-swizzled by the token."""
    h, hi, cq, u = group >> 5, (group >> 4) & 1, (group >> 2) & 3, group & 3
    chunk = cq + 4 * hi
    return (h * 4 + u) * 512 + swizzled(n & 7, chunk >> 1) + 8 * (chunk & 1)


def swizzled(n: int, slot: int) -> int:
    return n * 64 + ((slot ^ ((n >> 1) & 3)) << 4)


def emulate(x: torch.Tensor, qw, meta: torch.Tensor) -> torch.Tensor:
    """float64 ``x @ W.T`` computed the way the kernel computes it (per 16-row block; group scales
    applied per half tile, as the kernel's scaled weights give in exact arithmetic)."""
    m, k = x.shape
    n = qw.out_features
    tiles = meta.shape[1] // 128
    pairs = qw.packed[0].view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # [blocks, tiles * 256] word pairs
    regs = meta.to(torch.int64) & 0xFFFFFFFF
    scales = qw.scale_values().double()
    xp = torch.zeros(8, tiles * 256, dtype=torch.float64)
    xp[:m, :k] = x.double()
    out = torch.zeros(m, pack.row_blocks(n) * 16, dtype=torch.float64)
    for block in range(pairs.shape[0]):
        for t in range(tiles):
            words = pairs[block, t * 256:(t + 1) * 256].view(16, 16)  # [row, pair]
            lane_regs = regs[block, t * 128:(t + 1) * 128].view(32, 4)
            smem = torch.zeros(4096 // 2, dtype=torch.float64)  # a token block's stage, in 2-byte elements
            for tok in range(8):
                for group in range(64):
                    at = group_offset(tok, group) // 2
                    smem[at:at + 4] = xp[tok, t * 256 + 4 * group:t * 256 + 4 * group + 4]
            for h in range(2):
                part = torch.zeros(16, 8, dtype=torch.float64)
                for u in range(4):
                    # B by ldmatrix.x4: lane 8i + n gives row n of matrix i (swizzled(n, i)); lane (g, tig)
                    # register i gets that row's elements 2 tig, 2 tig + 1 as k = 8i + 2 tig + (0, 1) of token g
                    b = torch.empty(32, 8, dtype=torch.float64)  # [k of the step, token]
                    for g in range(8):
                        for i in range(4):
                            at = ((h * 4 + u) * 512 + swizzled(g, i)) // 2
                            b[8 * i:8 * i + 8, g] = smem[at:at + 8]
                    for r in range(16):
                        for c in range(8):
                            # metadata (PTX ISA, m16n8k32 .f16): lanes 2*sel, 2*sel+1 of each quad; row r % 8's
                            # quad; chunks 0-3 / 4-7 in the even / odd lane; rows < 8 in bits 0-15, rows >= 8 above
                            lane = 4 * (r % 8) + 2 * h + c // 4
                            nib = int(lane_regs[lane, u] >> (4 * (c % 4) + 16 * (r // 8))) & 15
                            # A: lane (r % 8, c % 4) holds chunk c of row r; the kernel decodes it from pair
                            # 4 tig + u of row r, nibble 2h + c // 4
                            word = int(words[r, 4 * (c % 4) + u])
                            j = 2 * h + c // 4
                            v0, v1 = ((word >> 4 * j) & 15) - 8, ((word >> (16 + 4 * j)) & 15) - 8
                            part[r] += v0 * b[4 * c + (nib & 3)] + v1 * b[4 * c + (nib >> 2)]
                rows = torch.arange(block * 16, block * 16 + 16).clamp(max=n - 1)
                q = min((t * 256 + 128 * h) // max(qw.scheme.group_size, 1), qw.num_groups - 1)
                scale = scales[0 if qw.scheme.per_channel else q, rows]
                out[:, block * 16:block * 16 + 16] += (part * scale[:, None]).T[:m]
    return out[:, :n]


@pytest.mark.parametrize("scheme,n,k", [("int4-g128-2:4", 20, 328), ("int4-channel-2:4", 16, 256),
                                        ("int4-g256-2:4", 33, 520)])
def test_emulated_kernel_is_the_exact_product(scheme, n, k):
    """Rows past a 16-row block, K past a 256-input tile and every group kind go through the same
    index arithmetic as the kernel, and give x @ dequantize().T."""
    qw = random_qweight(scheme, n, k, torch.float16, "cpu")
    x = torch.randn(5, k, dtype=torch.float16)
    got = emulate(x, qw, sparse_cuda.mma_metadata(qw))
    want = x.double() @ qw.dequantize(torch.float32).double().T
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)  # (dequantize rounds w * scale to float32)


def test_metadata_nibbles_are_each_groups_positions():
    qw = random_qweight("int4-g128-2:4", 16, 256, torch.float16, "cpu")
    meta = sparse_cuda.mma_metadata(qw)
    assert meta.shape == (1, 128) and meta.dtype == torch.int32
    nib = (meta.to(torch.int64).view(32, 4, 1) >> (4 * torch.arange(8))) & 15
    assert not ((nib & 3) >= (nib >> 2)).any(), "every nibble is an ascending pair p0 < p1"
    # lane 0 (g 0, tig 0), register 0: step (h 0, u 0), chunks 0-3 = groups 0, 4, 8, 12 of rows 0 (low half) and 8
    _, positions = lowbit.sparsity.split_codes(qw.codes())
    for slot, (row, group) in enumerate([(0, 0), (0, 4), (0, 8), (0, 12), (8, 0), (8, 4), (8, 8), (8, 12)]):
        p0, p1 = positions[row, 2 * group].item(), positions[row, 2 * group + 1].item()
        assert nib[0, 0, slot].item() == p0 | p1 << 2


@pytest.mark.parametrize("scheme,dtype,k,ok", [
    ("int4-g128-2:4", torch.float16, 256, True), ("int4-channel-2:4", torch.bfloat16, 256, True),
    ("int4-g64-2:4", torch.float16, 256, False), ("int4-g128-asym-2:4", torch.float16, 256, False),
    ("int8-channel-2:4", torch.float16, 256, False), ("fp6_e3m2-channel-2:4", torch.float16, 256, False),
    ("int4-g128", torch.float16, 256, False), ("int4-g128-2:4", torch.float16, 260, False),
    ("int4-g128-2:4", torch.float32, 256, False)])
def test_supports_names_the_kernels_scope(scheme, dtype, k, ok):
    qw = random_qweight(scheme, 16, k, torch.float16, "cpu")
    assert sparse_cuda.supports(qw, dtype) is ok


def test_group_scales_of_another_dtype_than_the_activations_are_not_supported():
    qw = random_qweight("int4-g128-2:4", 16, 256, torch.float16, "cpu")
    assert not sparse_cuda.supports(qw, torch.bfloat16)


@pytest.mark.parametrize("m,want", [(1, 1), (8, 1), (9, 2), (16, 2), (17, 4), (33, 8), (64, 8), (128, 8)])
def test_heuristic_token_blocks_cover_the_batch(m, want):
    cfg = sparse_cuda.heuristic_config(m, 8192, 8192, 132)
    assert cfg.token_blocks == want and (cfg.token_blocks, cfg.row_blocks) in sparse_cuda.INSTANCES


def test_config_rejects_unsupported_values():
    with pytest.raises(ValueError, match="token_blocks"):
        SparseConfig(token_blocks=3)
    with pytest.raises(ValueError, match="row_blocks"):
        SparseConfig(token_blocks=8, row_blocks=4)  # 32 accumulator tiles a warp: not instantiated


def test_metadata_is_built_once_per_positions_tensor_and_rebuilt_in_place_after_it_changes():
    """In place: a CUDA graph captured with the metadata tensor reads the new positions."""
    qw = random_qweight("int4-g128-2:4", 16, 256, torch.float16, "cpu")
    first = sparse_cuda._cached_metadata(qw)
    before = first.clone()
    assert sparse_cuda._cached_metadata(qw) is first
    qw.packed[1].copy_(torch.roll(qw.packed[1], 1, dims=1))  # an in-place change bumps the tensor's version
    again = sparse_cuda._cached_metadata(qw)
    assert again is first and torch.equal(again, sparse_cuda.mma_metadata(qw)) and not torch.equal(again, before)


def test_metadata_of_inference_tensors_is_cached_too():
    with torch.inference_mode():
        qw = random_qweight("int4-g128-2:4", 16, 256, torch.float16, "cpu")
        assert sparse_cuda._cached_metadata(qw) is sparse_cuda._cached_metadata(qw)


def test_metadata_built_in_chunks_of_row_blocks_is_the_same(monkeypatch):
    qw = random_qweight("int4-g128-2:4", 41, 520, torch.float16, "cpu")  # 3 row blocks, the last partial
    whole = sparse_cuda.mma_metadata(qw)
    monkeypatch.setattr(sparse_cuda, "_METADATA_CHUNK", 1)
    assert torch.equal(sparse_cuda.mma_metadata(qw), whole)


def test_config_instances_are_the_ones_the_source_compiles():
    source = sparse_cuda.SOURCE.read_text()
    compiled = {(int(mt), int(r)) for mt, r in re.findall(r"LOWBIT_SPARSE24\(BF16, DT, (\d+), (\d+), CHANNEL, KIND\)", source)}
    assert compiled == set(sparse_cuda.INSTANCES)


def _constant(source: str, name: str, which: int = 0) -> int:
    return int(re.findall(name + r" = (0x[0-9a-fA-F]+)u", source)[which], 16)


def test_the_kernels_magic_numbers_decode_every_int4_code_exactly():
    """The decode's constants as written in the source: (code | MAGIC) - MAGIC_OFFSET = code - 8 in fp16
    and bf16, and fp16's in-place odd nibble (1024 + 16 code) * 1/16 - 72 = code - 8."""
    source = sparse_cuda.SOURCE.read_text()
    codes = torch.arange(16, dtype=torch.int32)
    for which, dtype in ((0, torch.float16), (1, torch.bfloat16)):
        magic, offset = _constant(source, "MAGIC", which) & 0xFFFF, _constant(source, "MAGIC_OFFSET", which) & 0xFFFF
        biased = (codes | magic).to(torch.int16).view(dtype).float()
        sub = torch.tensor([offset], dtype=torch.int32).to(torch.int16).view(dtype).float()
        assert torch.equal(biased - sub, (codes - 8).float())
    sixteenth = torch.tensor([0x2C00], dtype=torch.int16).view(torch.float16).float()
    minus72 = torch.tensor([0xD480 - 0x10000], dtype=torch.int16).view(torch.float16).float()
    assert "0x2C00" in source and "0xD480" in source
    odd = ((codes << 4) | 0x6400).to(torch.int16).view(torch.float16).float()
    assert torch.equal(odd * sixteenth + minus72, (codes - 8).float())


def test_try_matmul_declines_cpu_tensors():
    qw = random_qweight("int4-g128-2:4", 16, 256, torch.float16, "cpu")
    assert sparse_cuda.try_matmul(torch.randn(2, 256, dtype=torch.float16), qw, None) is None
    with pytest.raises(RuntimeError, match="does not apply"):
        sparse_cuda.matmul(torch.randn(2, 256, dtype=torch.float16), qw)


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """An empty cubin cache and module table, and a fake nvcc that writes its -o file and counts its runs."""
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(sparse_cuda, "_MODULES", {})
    runs = tmp_path / "runs"
    nvcc = tmp_path / "nvcc"
    nvcc.write_text('#!/bin/sh\necho run >> "%s"\nwhile [ "$1" != "-o" ]; do shift; done\nprintf cubin > "$2"\n' % runs)
    nvcc.chmod(0o755)
    return nvcc, runs


def test_cubin_is_compiled_once_and_then_read_from_the_cache(fresh_build, monkeypatch):
    nvcc, runs = fresh_build
    monkeypatch.setattr(sparse_cuda, "_nvcc", lambda: str(nvcc))
    assert sparse_cuda._cubin("90") == b"cubin"
    assert sparse_cuda._cubin("90") == b"cubin"
    assert runs.read_text().count("run") == 1
    assert sparse_cuda._cubin("80") == b"cubin" and runs.read_text().count("run") == 2  # one file per architecture


def test_build_command_fills_the_cache_ahead_of_first_use(fresh_build, monkeypatch, capsys):
    nvcc, runs = fresh_build
    monkeypatch.setattr(sparse_cuda, "_nvcc", lambda: str(nvcc))
    assert sparse_cuda.main(["--arch", "80", "90"]) == 0
    assert runs.read_text().count("run") == 2 and "sm_90: 5 bytes" in capsys.readouterr().out
    monkeypatch.setattr(sparse_cuda, "_nvcc", lambda: None)
    assert sparse_cuda.main(["--arch", "90"]) == 0  # cached: no compiler needed
    assert sparse_cuda.main(["--arch", "86"]) == 1 and "nvcc not found" in capsys.readouterr().out


def test_missing_nvcc_warns_once_and_is_remembered(fresh_build, monkeypatch):
    monkeypatch.setattr(sparse_cuda, "_nvcc", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
    with pytest.warns(RuntimeWarning, match="nvcc not found"):
        assert sparse_cuda._module(0) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sparse_cuda._module(0) is None  # remembered: no second warning, no second build


def test_a_failing_build_warns_with_its_error_and_caches_nothing(fresh_build, monkeypatch, tmp_path):
    bad = tmp_path / "bad-nvcc"
    bad.write_text("#!/bin/sh\necho 'error: no such instruction' >&2\nexit 1\n")
    bad.chmod(0o755)
    monkeypatch.setattr(sparse_cuda, "_nvcc", lambda: str(bad))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
    with pytest.warns(RuntimeWarning, match="nvcc failed: error: no such instruction"):
        assert sparse_cuda._module(0) is None
    assert not list((tmp_path / "cache").glob("*.cubin"))


def test_disabled_by_environment_without_a_warning(fresh_build, monkeypatch):
    monkeypatch.setenv("LOWBIT_SPARSE_CUDA", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sparse_cuda._module(0) is None


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("scheme", ["int4-g128-2:4", "int4-channel-2:4", "int4-g256-2:4"])
@pytest.mark.parametrize("cfg", [None, SparseConfig(1, 1, 1), SparseConfig(2, 4, 3), SparseConfig(8, 2, 7),
                                 SparseConfig(4, 2, 16), SparseConfig(1, 4, 5)],
                         ids=lambda c: "heuristic" if c is None else f"mt{c.token_blocks}r{c.row_blocks}s{c.split_k}")
def test_gpu_sparse_kernel_matches_reference_poisoned(scheme, dtype, cfg):
    n, k = 1000, 2216  # N not a multiple of 16 rows x 4 warps, K not of 256
    qw = lowbit.quantize(torch.randn(n, k, dtype=dtype, device="cuda"), scheme)
    bias = torch.randn(n, dtype=dtype, device="cuda")
    ref_w = qw.dequantize(torch.float32)
    for m in (1, 3, 8, 13, 16, 31, 32, 64, 100, 128):
        x = torch.randn(m, k, dtype=dtype, device="cuda")
        out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
        y = sparse_cuda.matmul(x, qw, bias, cfg, out=out)
        assert torch.isfinite(y).all(), f"M={m}: unwritten elements"
        ref = x.float() @ ref_w.T + bias.float()
        err = float((y.float() - ref).norm() / ref.norm())
        assert err < (2e-3 if dtype == torch.float16 else 1e-2), f"M={m}: relative error {err:.2e}"


@pytest.mark.gpu
def test_gpu_dispatch_runs_the_sparse_kernel_and_replays_in_a_graph(monkeypatch):
    qw = lowbit.quantize(torch.randn(3000, 2048, dtype=torch.float16, device="cuda"), "int4-g128-2:4")
    x = torch.randn(16, 2048, dtype=torch.float16, device="cuda")
    assert sparse_cuda.try_matmul(x, qw, None) is not None, "the CUDA kernel is available on a GPU machine"
    eager = dispatch.matmul(x, qw, None)
    launches = []
    launch = sparse_cuda._DRIVER.launch
    monkeypatch.setattr(sparse_cuda._DRIVER, "launch", lambda *a: (launches.append(a[1]), launch(*a)))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = dispatch.matmul(x, qw, None)
    assert len(launches) == 1, "the CUDA kernel (not the Triton fallback) was captured"
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    ref = x.float() @ qw.dequantize(torch.float32).T
    assert float((y.float() - ref).norm() / ref.norm()) < 2e-3
    assert not torch.equal(y, eager)


@pytest.mark.gpu
def test_gpu_sparse_kernel_is_deterministic_with_split_k():
    qw = lowbit.quantize(torch.randn(4096, 4096, dtype=torch.float16, device="cuda"), "int4-g128-2:4")
    x = torch.randn(16, 4096, dtype=torch.float16, device="cuda")
    cfg = SparseConfig(2, 2, 8)
    first = sparse_cuda.matmul(x, qw, None, cfg)
    for _ in range(20):
        assert torch.equal(sparse_cuda.matmul(x, qw, None, cfg), first)
