// 2:4 sparse int4 weights x fp16/bf16 activations on the sparse tensor cores (mma.sp::ordered_metadata, sm_80+).
//
// out[M, N] = x[M, K] @ W[N, K].T, W 2:4 sparse with symmetric int4 kept values (code - 8) and
// per-channel or group scales (groups a multiple of 128). The instruction is
// mma.sp.m16n8k32: A = 16 weight rows x 32 dense k, given as its 16 kept values a row and 2-bit
// position metadata; B = 32 k x 8 tokens; D fp32.
//
// Weights are read in place from the tiled-planes-v4 layout (lowbit/pack): per 16-row block and
// tile of 256 dense k (64 groups of four), row r's 4-bit values are 32 int16 words; the 32-bit pair
// of words 2w, 2w+1 holds group w + 16j's two kept values at bits 4j and 16 + 4j (j = 0..3). Lane
// (g, tig) loads 16 bytes of rows g and g+8 (pairs w = 4 tig + u): 16 groups of each row, enough for
// the tile's eight steps (h, u): in step (h, u), chunk c < 4 of the instruction is group
// 4c + u + 32h and chunk 4 + c is group 4c + u + 32h + 16, so each lane owns exactly the chunks its
// A fragment holds (tig and 4 + tig) and decodes them with a LOP3 and one half2 subtraction or
// fma per pair (decode_step). The chunk -> group map is undone on the activations: each group of four inputs is
// copied (8-byte cp.async) to its step's [token][chunk] row in shared memory (xor-swizzled), and one
// ldmatrix.x4 a step gives a lane its B fragment. The position metadata is a separate tensor
// already in register order (lowbit/kernels/sparse_cuda.py: mma_metadata): lanes with tig>>1 == h
// feed steps of half h. Each warp takes R 16-row blocks, which share every B fragment.
//
// Group scales multiply the fp32 partial of each half tile (one group); per-channel scales the fp32
// result. Split-K over blockIdx.y is reduced deterministically: every split writes an fp32 partial,
// the last to arrive sums them in split order, writes the output and resets its counter (as the
// Triton kernel does).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace {

template <bool BF16>
struct Act;

template <>
struct Act<false> {
  using T = __half;
  static constexpr uint32_t MAGIC = 0x64006400u;         // fp16 1024 (ulp 1): 1024 + code exactly
  static constexpr uint32_t MAGIC_OFFSET = 0x64086408u;  // 1032 = 1024 + the int4 offset 8
  __device__ static uint32_t sub(uint32_t a, uint32_t b) {
    __half2 r = __hsub2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static T from_float(float f) { return __float2half_rn(f); }
  __device__ static float to_float(T v) { return __half2float(v); }
};

template <>
struct Act<true> {
  using T = __nv_bfloat16;
  static constexpr uint32_t MAGIC = 0x43004300u;         // bf16 128 (ulp 1)
  static constexpr uint32_t MAGIC_OFFSET = 0x43084308u;  // 136 = 128 + 8
  __device__ static uint32_t sub(uint32_t a, uint32_t b) {
    __nv_bfloat162 r = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&a), *reinterpret_cast<__nv_bfloat162*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static T from_float(float f) { return __float2bfloat16_rn(f); }
  __device__ static float to_float(T v) { return __bfloat162float(v); }
};

__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t mask, uint32_t bits) {  // (a & mask) | bits
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(a), "r"(mask), "r"(bits));
  return r;
}

// The pairs of kept values at nibbles 2h (fragments 0, 1) and 2h + 1 (fragments 2, 3) of the word
// pairs of rows g (lo) and g + 8 (hi), as fp16/bf16 values code - 8. fp16 reads nibble 2h + 1 in
// place: 1024 + 16 code (10 mantissa bits hold it), times 1/16 minus 72 in one exact HFMA2; bf16's
// 7 mantissa bits do not, so it shifts each nibble down.
template <bool BF16>
__device__ __forceinline__ void decode_step(uint32_t lo, uint32_t hi, int h, uint32_t (&a)[4]) {
  using A = Act<BF16>;
  if constexpr (BF16) {
    a[0] = A::sub(lop3_and_or(lo >> (8 * h), 0x000f000fu, A::MAGIC), A::MAGIC_OFFSET);
    a[1] = A::sub(lop3_and_or(hi >> (8 * h), 0x000f000fu, A::MAGIC), A::MAGIC_OFFSET);
    a[2] = A::sub(lop3_and_or(lo >> (8 * h + 4), 0x000f000fu, A::MAGIC), A::MAGIC_OFFSET);
    a[3] = A::sub(lop3_and_or(hi >> (8 * h + 4), 0x000f000fu, A::MAGIC), A::MAGIC_OFFSET);
  } else {
    const uint32_t l = lo >> (8 * h), u = hi >> (8 * h);
    const __half2 sixteenth = __halves2half2(__ushort_as_half(0x2C00), __ushort_as_half(0x2C00));  // 1/16
    const __half2 minus72 = __halves2half2(__ushort_as_half(0xD480), __ushort_as_half(0xD480));    // -(64 + 8)
    a[0] = A::sub(lop3_and_or(l, 0x000f000fu, A::MAGIC), A::MAGIC_OFFSET);
    a[1] = A::sub(lop3_and_or(u, 0x000f000fu, A::MAGIC), A::MAGIC_OFFSET);
    uint32_t b2 = lop3_and_or(l, 0x00f000f0u, A::MAGIC), b3 = lop3_and_or(u, 0x00f000f0u, A::MAGIC);
    __half2 r2 = __hfma2(*reinterpret_cast<__half2*>(&b2), sixteenth, minus72);
    __half2 r3 = __hfma2(*reinterpret_cast<__half2*>(&b3), sixteenth, minus72);
    a[2] = *reinterpret_cast<uint32_t*>(&r2);
    a[3] = *reinterpret_cast<uint32_t*>(&r3);
  }
}

template <bool BF16, int SEL>
__device__ __forceinline__ void mma_sp(float (&d)[4], const uint32_t (&a)[4], const uint4& b, uint32_t meta) {
  if constexpr (BF16) {
    asm("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, %13;"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b.x), "r"(b.y), "r"(b.z), "r"(b.w), "r"(meta), "n"(SEL));
  } else {
    asm("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, %13;"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b.x), "r"(b.y), "r"(b.z), "r"(b.w), "r"(meta), "n"(SEL));
  }
}

__device__ __forceinline__ void cp_async8(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;" ::"r"(dst), "l"(src), "r"(valid ? 8 : 0));
}

__device__ __forceinline__ void ldmatrix_x4(uint4& b, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(b.x), "=r"(b.y), "=r"(b.z), "=r"(b.w)
               : "r"(addr));
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Shared memory, per stage and block of 8 tokens: 8 steps x 8 tokens x 64 bytes (the step's 8
// chunks of 4 inputs); 16-byte slot i (chunks 2i, 2i+1) of token n's row is stored at slot
// i ^ ((n >> 1) & 3), so the 8 rows an ldmatrix phase reads fall in distinct banks.
constexpr int TILE_DENSE_K = 256;
constexpr int ROW_BYTES = 64;
constexpr int STEP_BYTES = 8 * ROW_BYTES;
constexpr int BLOCK_BYTES = 8 * STEP_BYTES;

__device__ __forceinline__ int swizzled(int n, int slot) { return n * ROW_BYTES + ((slot ^ ((n >> 1) & 3)) << 4); }

// Byte offset (within a token block) of group `group` (0..63) of the tile for token n % 8.
__device__ __forceinline__ int group_offset(int n, int group) {
  const int h = group >> 5, hi = (group >> 4) & 1, cq = (group >> 2) & 3, u = group & 3;
  const int chunk = cq + 4 * hi;  // the instruction's chunk (4 k) that holds this group in step (h, u)
  return (h * 4 + u) * STEP_BYTES + swizzled(n & 7, chunk >> 1) + 8 * (chunk & 1);
}

template <bool BF16, int MT, int R, bool CHANNEL>
__device__ __forceinline__ void sparse24_int4(const uint2* __restrict__ x, const uint4* __restrict__ values,
                                              long long values_stride, const uint4* __restrict__ meta,
                                              long long meta_stride, const void* __restrict__ scales,
                                              const void* __restrict__ bias, void* __restrict__ out,
                                              float* __restrict__ partial, int* __restrict__ counters, int M,
                                              int N, int K, int tiles_per_split, int tiles, int group_size,
                                              int groups, int row_blocks) {
  using A = Act<BF16>;
  using T = typename A::T;
  constexpr int WARPS = 4;
  constexpr int THREADS = WARPS * 32;
  constexpr int TOKENS = 8 * MT;
  constexpr int STAGE_BYTES = MT * BLOCK_BYTES;
  extern __shared__ uint4 smem[];
  const uint32_t smem_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, tig = lane & 3;
  const int rb0 = (blockIdx.x * WARPS + warp) * R;  // this warp's first 16-row block
  const int tok0 = blockIdx.z * TOKENS;
  const int tokens = min(TOKENS, M - tok0);
  const int t_begin = blockIdx.y * tiles_per_split;
  const int t_end = min(t_begin + tiles_per_split, tiles);

  // Tokens past M stay zero in both stages; real tokens are rewritten every tile.
  for (int i = threadIdx.x; i < 2 * STAGE_BYTES / 16; i += THREADS) {
    const int row = (i * 16 % STAGE_BYTES) / ROW_BYTES;  // (block, step, token) of a 64-byte row
    if ((row >> 6) * 8 + (row & 7) >= tokens) smem[i] = make_uint4(0, 0, 0, 0);
  }
  const int group = threadIdx.x % 64;
  auto stage = [&](int t, int buf) {
    const int k = t * TILE_DENSE_K + 4 * group;
    const bool in_k = k < K;
    for (int n = threadIdx.x / 64; n < tokens; n += THREADS / 64) {
      const uint2* src = in_k ? x + ((static_cast<long long>(tok0 + n) * K + k) >> 2) : x;
      cp_async8(smem_base + buf * STAGE_BYTES + (n >> 3) * BLOCK_BYTES + group_offset(n, group), src, in_k);
    }
    asm volatile("cp.async.commit_group;");
  };
  const uint32_t frag_lane = smem_base + swizzled(lane & 7, lane >> 3);  // ldmatrix: lane l reads row l % 8 of matrix l / 8

  const uint4* vrow[R];
  const uint4* mrow[R];
  int row_lo[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int rb = min(rb0 + r, row_blocks - 1);  // blocks past N load real rows, store nothing
    vrow[r] = values + rb * values_stride + lane;
    mrow[r] = meta + rb * meta_stride + lane;
    row_lo[r] = (rb0 + r) * 16 + g;
  }
  // scale pairs (one value twice) of rows g and g + 8 of each block, both half tiles of tile t
  auto load_scales = [&](int t, float (&s)[R][2][2]) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int q = min((t * TILE_DENSE_K + 128 * h) / group_size, groups - 1);
      const T* sc = reinterpret_cast<const T*>(scales) + static_cast<long long>(q) * N;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        s[r][h][0] = row_lo[r] < N ? A::to_float(sc[row_lo[r]]) : 0.f;
        s[r][h][1] = row_lo[r] + 8 < N ? A::to_float(sc[row_lo[r] + 8]) : 0.f;
      }
    }
  };

  float acc[R][MT][4];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int b = 0; b < MT; ++b)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[r][b][i] = 0.f;

  uint4 v_lo[R], v_hi[R], m_cur[R];
  float s_cur[R][2][2];
  if (t_begin < t_end) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      v_lo[r] = vrow[r][t_begin * 64];
      v_hi[r] = vrow[r][t_begin * 64 + 32];
      m_cur[r] = mrow[r][t_begin * 32];
    }
    if constexpr (!CHANNEL) load_scales(t_begin, s_cur);
    stage(t_begin, 0);
  }
  asm volatile("cp.async.wait_group 0;");
  __syncthreads();

  for (int t = t_begin; t < t_end; ++t) {
    const bool more = t + 1 < t_end;
    uint4 v_lo_next[R], v_hi_next[R], m_next[R];
    float s_next[R][2][2];
    if (more) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        v_lo_next[r] = vrow[r][(t + 1) * 64];
        v_hi_next[r] = vrow[r][(t + 1) * 64 + 32];
        m_next[r] = mrow[r][(t + 1) * 32];
      }
      if constexpr (!CHANNEL) load_scales(t + 1, s_next);
      stage(t + 1, (t + 1 - t_begin) & 1);
    }
    const uint32_t frag = frag_lane + ((t - t_begin) & 1) * STAGE_BYTES;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float part[R][MT][4];  // the half tile (one scale group), scaled into acc after its four steps
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int b = 0; b < MT; ++b)
#pragma unroll
          for (int i = 0; i < 4; ++i) part[r][b][i] = 0.f;
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        uint4 bf[MT];
#pragma unroll
        for (int b = 0; b < MT; ++b) ldmatrix_x4(bf[b], frag + b * BLOCK_BYTES + (h * 4 + u) * STEP_BYTES);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          uint32_t a[4];
          decode_step<BF16>(word_of(v_lo[r], u), word_of(v_hi[r], u), h, a);
          const uint32_t e = word_of(m_cur[r], u);
#pragma unroll
          for (int b = 0; b < MT; ++b) {
            float(&d)[4] = CHANNEL ? acc[r][b] : part[r][b];
            if (h == 0)
              mma_sp<BF16, 0>(d, a, bf[b], e);
            else
              mma_sp<BF16, 1>(d, a, bf[b], e);
          }
        }
      }
      if constexpr (!CHANNEL) {
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int b = 0; b < MT; ++b) {
            acc[r][b][0] = fmaf(part[r][b][0], s_cur[r][h][0], acc[r][b][0]);
            acc[r][b][1] = fmaf(part[r][b][1], s_cur[r][h][0], acc[r][b][1]);
            acc[r][b][2] = fmaf(part[r][b][2], s_cur[r][h][1], acc[r][b][2]);
            acc[r][b][3] = fmaf(part[r][b][3], s_cur[r][h][1], acc[r][b][3]);
          }
      }
    }
    asm volatile("cp.async.wait_group 0;");
    __syncthreads();
    if (more) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        v_lo[r] = v_lo_next[r];
        v_hi[r] = v_hi_next[r];
        m_cur[r] = m_next[r];
        if constexpr (!CHANNEL) {
#pragma unroll
          for (int h = 0; h < 2; ++h) s_cur[r][h][0] = s_next[r][h][0], s_cur[r][h][1] = s_next[r][h][1];
        }
      }
    }
  }

  if constexpr (CHANNEL) {  // float32 scales [1, N]
    const float* sc = reinterpret_cast<const float*>(scales);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float lo = row_lo[r] < N ? sc[row_lo[r]] : 0.f, hi = row_lo[r] + 8 < N ? sc[row_lo[r] + 8] : 0.f;
#pragma unroll
      for (int b = 0; b < MT; ++b) acc[r][b][0] *= lo, acc[r][b][1] *= lo, acc[r][b][2] *= hi, acc[r][b][3] *= hi;
    }
  }

  // Element i of block r, token block b: row row_lo[r] (+ 8 for i >= 2), token tok0 + 8b + 2 tig + (i & 1).
  T* o = reinterpret_cast<T*>(out);
  const T* bs = reinterpret_cast<const T*>(bias);
  const int split = gridDim.y;
  if (split > 1) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int b = 0; b < MT; ++b)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int row = row_lo[r] + (i >> 1) * 8, tok = tok0 + 8 * b + 2 * tig + (i & 1);
          if (row < N && tok < M) partial[(static_cast<long long>(blockIdx.y) * M + tok) * N + row] = acc[r][b][i];
        }
    __threadfence();
    __syncthreads();
    __shared__ int last;
    const int tile = blockIdx.z * gridDim.x + blockIdx.x;
    if (threadIdx.x == 0) last = atomicAdd(counters + tile, 1) == split - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int b = 0; b < MT; ++b)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int row = row_lo[r] + (i >> 1) * 8, tok = tok0 + 8 * b + 2 * tig + (i & 1);
          float sum = 0.f;
          if (row < N && tok < M)
            for (int s = 0; s < split; ++s) sum += __ldcg(partial + (static_cast<long long>(s) * M + tok) * N + row);
          acc[r][b][i] = sum;
        }
    if (threadIdx.x == 0) counters[tile] = 0;
  }
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int b = 0; b < MT; ++b)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = row_lo[r] + (i >> 1) * 8, tok = tok0 + 8 * b + 2 * tig + (i & 1);
        if (row < N && tok < M)
          o[static_cast<long long>(tok) * N + row] = A::from_float(acc[r][b][i] + (bs ? A::to_float(bs[row]) : 0.f));
      }
}

}  // namespace

// One entry point per (activation dtype, token blocks of 8, row blocks a warp, per-channel scales):
// sparse24_int4_<f16|bf16>_mt<MT>_r<R>_<group|channel>; 4 warps a program.
#define LOWBIT_SPARSE24(BF16, DT, MT, R, CHANNEL, KIND)                                                            \
  extern "C" __global__ void __launch_bounds__(128) sparse24_int4_##DT##_mt##MT##_r##R##_##KIND(                  \
      const uint2* x, const uint4* values, long long values_stride, const uint4* meta, long long meta_stride,     \
      const void* scales, const void* bias, void* out, float* partial, int* counters, int M, int N, int K,       \
      int tiles_per_split, int tiles, int group_size, int groups, int row_blocks) {                              \
    sparse24_int4<BF16, MT, R, CHANNEL>(x, values, values_stride, meta, meta_stride, scales, bias, out, partial, \
                                        counters, M, N, K, tiles_per_split, tiles, group_size, groups,           \
                                        row_blocks);                                                             \
  }
#define LOWBIT_SPARSE24_KIND(BF16, DT, CHANNEL, KIND)                                                     \
  LOWBIT_SPARSE24(BF16, DT, 1, 1, CHANNEL, KIND) LOWBIT_SPARSE24(BF16, DT, 1, 2, CHANNEL, KIND)           \
  LOWBIT_SPARSE24(BF16, DT, 1, 4, CHANNEL, KIND) LOWBIT_SPARSE24(BF16, DT, 2, 1, CHANNEL, KIND)           \
  LOWBIT_SPARSE24(BF16, DT, 2, 2, CHANNEL, KIND) LOWBIT_SPARSE24(BF16, DT, 2, 4, CHANNEL, KIND)           \
  LOWBIT_SPARSE24(BF16, DT, 4, 1, CHANNEL, KIND) LOWBIT_SPARSE24(BF16, DT, 4, 2, CHANNEL, KIND)           \
  LOWBIT_SPARSE24(BF16, DT, 4, 4, CHANNEL, KIND) LOWBIT_SPARSE24(BF16, DT, 8, 1, CHANNEL, KIND)           \
  LOWBIT_SPARSE24(BF16, DT, 8, 2, CHANNEL, KIND)

LOWBIT_SPARSE24_KIND(false, f16, false, group)
LOWBIT_SPARSE24_KIND(false, f16, true, channel)
LOWBIT_SPARSE24_KIND(true, bf16, false, group)
LOWBIT_SPARSE24_KIND(true, bf16, true, channel)
