// 2:4 sparse int4 weights x fp16/bf16 activations on the sparse tensor cores (mma.sp, sm_80+).
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
// A fragment holds (tig and 4 + tig) and decodes them with one shift, one LOP3 and one subtraction
// per pair. The chunk -> group map is undone on the activations: they are copied to shared memory
// in fragment order (cp.async, 4 bytes each), so a lane reads its B fragment of a step with one
// 16-byte load. The position metadata is a separate tensor already in register order
// (lowbit/kernels/sparse_cuda.py: mma_metadata): lanes with tig>>1 == h feed steps of half h.
//
// Group scales multiply the fp32 partial of each half tile (128 dense k, one group). Split-K over
// blockIdx.y is reduced deterministically: every split writes an fp32 partial, the last to arrive
// sums them in split order, writes the output and resets its counter (as the Triton kernel does).
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

// The pair of kept values at nibble `shift / 4` of a word pair, as two fp16/bf16 values code - 8.
template <bool BF16>
__device__ __forceinline__ uint32_t decode_pair(uint32_t words, int shift) {
  uint32_t biased;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(biased) : "r"(words >> shift), "r"(0x000f000fu), "r"(Act<BF16>::MAGIC));
  return Act<BF16>::sub(biased, Act<BF16>::MAGIC_OFFSET);
}

template <bool BF16, int SEL>
__device__ __forceinline__ void mma_sp(float (&d)[4], const uint32_t (&a)[4], const uint4& b, uint32_t meta) {
  if constexpr (BF16) {
    asm("mma.sp.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, %13;"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b.x), "r"(b.y), "r"(b.z), "r"(b.w), "r"(meta), "n"(SEL));
  } else {
    asm("mma.sp.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, %13;"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b.x), "r"(b.y), "r"(b.z), "r"(b.w), "r"(meta), "n"(SEL));
  }
}

__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(dst), "l"(src), "r"(valid ? 4 : 0));
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Shared-memory word (32-bit, within one token block's 8 steps x 32 lanes x 4 registers) that
// receives dense pair kp (dense k 2kp, 2kp+1 of the tile) of token n % 8.
__device__ __forceinline__ int fragment_word(int n, int kp) {
  const int group = kp >> 1, half = kp & 1;
  const int h = group >> 5, hi = (group >> 4) & 1, cq = (group >> 2) & 3, u = group & 3;
  const int chunk = cq + 4 * hi;  // the instruction's chunk (4 k) that holds this group in step (h, u)
  const int reg = chunk >> 1, tig = 2 * (chunk & 1) + half;
  return (((h * 4 + u) * 32 + (n & 7) * 4 + tig) * 4 + reg);
}

constexpr int TILE_DENSE_K = 256;
constexpr int STEP_WORDS = 32 * 4;         // one step's B fragments of 8 tokens, in 32-bit words
constexpr int BLOCK_WORDS = 8 * STEP_WORDS;  // a tile's B fragments of 8 tokens (8 steps)

template <bool BF16, int MT, int WARPS, bool CHANNEL>
__device__ __forceinline__ void sparse24_int4(const uint32_t* __restrict__ x, const uint4* __restrict__ values,
                                              long long values_stride, const uint4* __restrict__ meta,
                                              long long meta_stride, const void* __restrict__ scales,
                                              const void* __restrict__ bias, void* __restrict__ out,
                                              float* __restrict__ partial, int* __restrict__ counters, int M,
                                              int N, int K, int tiles_per_split, int tiles, int group_size,
                                              int groups, int row_blocks) {
  using A = Act<BF16>;
  using T = typename A::T;
  constexpr int THREADS = WARPS * 32;
  constexpr int TOKENS = 8 * MT;
  constexpr int STAGE_WORDS = MT * BLOCK_WORDS;
  static_assert(THREADS % 128 == 0, "one thread per dense pair of a token's tile row: 128 pairs");
  extern __shared__ uint4 smem[];
  uint32_t* words = reinterpret_cast<uint32_t*>(smem);
  const uint32_t smem_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, tig = lane & 3;
  const int rb = blockIdx.x * WARPS + warp;
  const int n0 = rb * 16;
  const int rb_load = rb < row_blocks ? rb : row_blocks - 1;  // warps past N load real rows, store nothing
  const int tok0 = blockIdx.z * TOKENS;
  const int tokens = min(TOKENS, M - tok0);
  const int t_begin = blockIdx.y * tiles_per_split;
  const int t_end = min(t_begin + tiles_per_split, tiles);

  // Tokens past M stay zero in both stages; real tokens are rewritten every tile.
  for (int i = threadIdx.x; i < 2 * STAGE_WORDS; i += THREADS) {
    const int w = i % STAGE_WORDS;
    const int n = (w / BLOCK_WORDS) * 8 + ((w % STEP_WORDS) / 4) / 4;
    if (n >= tokens) words[i] = 0;
  }
  const int kp = threadIdx.x % 128;
  const int frag = fragment_word(0, kp);
  auto stage = [&](int t, int buf) {
    const int k = t * TILE_DENSE_K + 2 * kp;
    const bool in_k = k < K;
    for (int n = threadIdx.x / 128; n < tokens; n += THREADS / 128) {
      const uint32_t* src = in_k ? x + ((static_cast<long long>(tok0 + n) * K + k) >> 1) : x;
      const int dst = buf * STAGE_WORDS + (n >> 3) * BLOCK_WORDS + frag + (n & 7) * 16;
      cp_async4(smem_base + 4 * dst, src, in_k);
    }
    asm volatile("cp.async.commit_group;");
  };

  const uint4* vrow = values + rb_load * values_stride + lane;
  const uint4* mrow = meta + rb_load * meta_stride + lane;
  const int row_lo = n0 + g, row_hi = n0 + g + 8;
  auto load_scales = [&](int t, float (&s)[2][2]) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int q = min((t * TILE_DENSE_K + 128 * h) / group_size, groups - 1);
      const T* sc = reinterpret_cast<const T*>(scales) + static_cast<long long>(q) * N;
      s[h][0] = row_lo < N ? A::to_float(sc[row_lo]) : 0.f;
      s[h][1] = row_hi < N ? A::to_float(sc[row_hi]) : 0.f;
    }
  };

  float acc[MT][4];
#pragma unroll
  for (int b = 0; b < MT; ++b)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[b][i] = 0.f;

  uint4 v_lo, v_hi, m_cur;
  float s_cur[2][2];
  if (t_begin < t_end) {
    v_lo = vrow[t_begin * 64];
    v_hi = vrow[t_begin * 64 + 32];
    m_cur = mrow[t_begin * 32];
    if constexpr (!CHANNEL) load_scales(t_begin, s_cur);
    stage(t_begin, 0);
  }
  asm volatile("cp.async.wait_group 0;");
  __syncthreads();

  for (int t = t_begin; t < t_end; ++t) {
    const bool more = t + 1 < t_end;
    uint4 v_lo_next, v_hi_next, m_next;
    float s_next[2][2];
    if (more) {
      v_lo_next = vrow[(t + 1) * 64];
      v_hi_next = vrow[(t + 1) * 64 + 32];
      m_next = mrow[(t + 1) * 32];
      if constexpr (!CHANNEL) load_scales(t + 1, s_next);
      stage(t + 1, (t + 1 - t_begin) & 1);
    }
    const uint4* bfrag = smem + ((t - t_begin) & 1) * (STAGE_WORDS / 4) + lane;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float part[MT][4];
#pragma unroll
      for (int b = 0; b < MT; ++b)
#pragma unroll
        for (int i = 0; i < 4; ++i) part[b][i] = 0.f;
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const uint32_t lo = word_of(v_lo, u), hi = word_of(v_hi, u);
        const uint32_t a[4] = {decode_pair<BF16>(lo, 8 * h), decode_pair<BF16>(hi, 8 * h),
                               decode_pair<BF16>(lo, 8 * h + 4), decode_pair<BF16>(hi, 8 * h + 4)};
        const uint32_t e = word_of(m_cur, u);
#pragma unroll
        for (int b = 0; b < MT; ++b) {
          const uint4 bf = bfrag[(b * BLOCK_WORDS + (h * 4 + u) * STEP_WORDS) / 4];
          if (h == 0)
            mma_sp<BF16, 0>(CHANNEL ? acc[b] : part[b], a, bf, e);
          else
            mma_sp<BF16, 1>(CHANNEL ? acc[b] : part[b], a, bf, e);
        }
      }
      if constexpr (!CHANNEL) {
#pragma unroll
        for (int b = 0; b < MT; ++b) {
          acc[b][0] = fmaf(part[b][0], s_cur[h][0], acc[b][0]);
          acc[b][1] = fmaf(part[b][1], s_cur[h][0], acc[b][1]);
          acc[b][2] = fmaf(part[b][2], s_cur[h][1], acc[b][2]);
          acc[b][3] = fmaf(part[b][3], s_cur[h][1], acc[b][3]);
        }
      }
    }
    asm volatile("cp.async.wait_group 0;");
    __syncthreads();
    if (more) {
      v_lo = v_lo_next;
      v_hi = v_hi_next;
      m_cur = m_next;
      if constexpr (!CHANNEL) {
#pragma unroll
        for (int h = 0; h < 2; ++h) s_cur[h][0] = s_next[h][0], s_cur[h][1] = s_next[h][1];
      }
    }
  }

  if constexpr (CHANNEL) {  // float32 scales [1, N]
    const float* sc = reinterpret_cast<const float*>(scales);
    const float lo = row_lo < N ? sc[row_lo] : 0.f, hi = row_hi < N ? sc[row_hi] : 0.f;
#pragma unroll
    for (int b = 0; b < MT; ++b) acc[b][0] *= lo, acc[b][1] *= lo, acc[b][2] *= hi, acc[b][3] *= hi;
  }

  // Element i of token block b: row (i < 2 ? row_lo : row_hi), token tok0 + 8b + 2 tig + (i & 1).
  T* o = reinterpret_cast<T*>(out);
  const T* bs = reinterpret_cast<const T*>(bias);
  const int split = gridDim.y;
  if (split > 1) {
#pragma unroll
    for (int b = 0; b < MT; ++b)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = i < 2 ? row_lo : row_hi, tok = tok0 + 8 * b + 2 * tig + (i & 1);
        if (row < N && tok < M) partial[(static_cast<long long>(blockIdx.y) * M + tok) * N + row] = acc[b][i];
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
    for (int b = 0; b < MT; ++b)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = i < 2 ? row_lo : row_hi, tok = tok0 + 8 * b + 2 * tig + (i & 1);
        float sum = 0.f;
        if (row < N && tok < M)
          for (int s = 0; s < split; ++s) sum += __ldcg(partial + (static_cast<long long>(s) * M + tok) * N + row);
        acc[b][i] = sum;
      }
    if (threadIdx.x == 0) counters[tile] = 0;
  }
#pragma unroll
  for (int b = 0; b < MT; ++b)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = i < 2 ? row_lo : row_hi, tok = tok0 + 8 * b + 2 * tig + (i & 1);
      if (row < N && tok < M)
        o[static_cast<long long>(tok) * N + row] = A::from_float(acc[b][i] + (bs ? A::to_float(bs[row]) : 0.f));
    }
}

}  // namespace

// One entry point per (activation dtype, token blocks of 8, warps, per-channel scales):
// sparse24_int4_<f16|bf16>_mt<MT>_w<WARPS>_<group|channel>.
#define LOWBIT_SPARSE24(NAME, BF16, MT, WARPS, CHANNEL)                                                           \
  extern "C" __global__ void __launch_bounds__(WARPS * 32) NAME(                                                  \
      const uint32_t* x, const uint4* values, long long values_stride, const uint4* meta, long long meta_stride, \
      const void* scales, const void* bias, void* out, float* partial, int* counters, int M, int N, int K,       \
      int tiles_per_split, int tiles, int group_size, int groups, int row_blocks) {                              \
    sparse24_int4<BF16, MT, WARPS, CHANNEL>(x, values, values_stride, meta, meta_stride, scales, bias, out,       \
                                            partial, counters, M, N, K, tiles_per_split, tiles, group_size,      \
                                            groups, row_blocks);                                                 \
  }
#define LOWBIT_SPARSE24_MT(BF16, DT, WARPS, CHANNEL, KIND)                                 \
  LOWBIT_SPARSE24(sparse24_int4_##DT##_mt1_w##WARPS##_##KIND, BF16, 1, WARPS, CHANNEL)     \
  LOWBIT_SPARSE24(sparse24_int4_##DT##_mt2_w##WARPS##_##KIND, BF16, 2, WARPS, CHANNEL)     \
  LOWBIT_SPARSE24(sparse24_int4_##DT##_mt4_w##WARPS##_##KIND, BF16, 4, WARPS, CHANNEL)     \
  LOWBIT_SPARSE24(sparse24_int4_##DT##_mt8_w##WARPS##_##KIND, BF16, 8, WARPS, CHANNEL)
#define LOWBIT_SPARSE24_ALL(BF16, DT)                  \
  LOWBIT_SPARSE24_MT(BF16, DT, 4, false, group)        \
  LOWBIT_SPARSE24_MT(BF16, DT, 8, false, group)        \
  LOWBIT_SPARSE24_MT(BF16, DT, 4, true, channel)       \
  LOWBIT_SPARSE24_MT(BF16, DT, 8, true, channel)

LOWBIT_SPARSE24_ALL(false, f16)
LOWBIT_SPARSE24_ALL(true, bf16)
