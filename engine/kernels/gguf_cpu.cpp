// Products with GGUF block-quantized weights on the CPU, the blocks read as they are stored.
//
// A weight [N, K] is N rows of K / QK blocks, each block laid out as in a GGUF file (Q4_0,
// Q4_1, Q5_0, Q5_1, Q8_0: 32 values; Q4_K, Q5_K, Q6_K: super-blocks of 256). Each format's
// `visit` decodes a block into float32 vectors of 16 values in registers, computed exactly
// as gguf's reference dequantization computes them (float32 scale times integer code, plus
// the block's minimum where it has one), so a product is the dequantize-then-matmul product up
// to the order of the float32 sums. For up to `max_direct_rows` activation rows (a decode batch)
// every decoded vector is multiplied into a tile of up to `kMaxTile` rows at once (all the rows
// of a batch in balanced tiles), so each weight vector is decoded once per tile and the weight
// bytes cross the memory bus once per step; for more rows (prefill) the weight is dequantized to
// float32 and handed to torch's GEMM. The vectors are GCC / Clang vector extensions: built with
// -march=native (or -mcpu=native) they become AVX-512, AVX2 or NEON code, whatever the CPU has.
// Weight rows are split across torch's intra-op threads. Decode batches can instead take their
// activations quantized to int8 and multiply integers (x86 with AVX2: "int8 activations" below).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <utility>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <memory>
#include <tuple>
#include <vector>

namespace {

// ggml's type ids (GGMLQuantizationType)
constexpr int64_t kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8;
constexpr int64_t kQ4_K = 12, kQ5_K = 13, kQ6_K = 14;

// Everything on the per-vector path is forced inline: a 64-byte vector passed to a call that is
// not inlined goes through memory where the CPU has no 64-byte registers (AVX2).
#define ALWAYS_INLINE inline __attribute__((always_inline))

typedef uint8_t u8x16 __attribute__((vector_size(16)));

#if defined(__AVX512F__)
// 16 float32 / int32 lanes: one 512-bit register.
typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

ALWAYS_INLINE f32x16 to_f32(i32x16 v) { return __builtin_convertvector(v, f32x16); }
ALWAYS_INLINE f32x16 splat(float s) { return f32x16{} + s; }
ALWAYS_INLINE float hsum(f32x16 v) { return _mm512_reduce_add_ps((__m512)v); }
ALWAYS_INLINE i32x16 splat_i(int32_t s) { return i32x16{} + s; }
ALWAYS_INLINE i32x16 lane_index() { return i32x16{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}; }
#else
// 16 lanes as two halves of 8 (AVX2's 256-bit registers, two NEON pairs): GCC lowers a 64-byte
// vector type badly where registers are narrower, a pair of 32-byte ones well.
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));

template <typename H>
struct Pair {
  H lo, hi;
};
template <typename H> ALWAYS_INLINE Pair<H> operator+(Pair<H> a, Pair<H> b) { return {a.lo + b.lo, a.hi + b.hi}; }
template <typename H> ALWAYS_INLINE Pair<H> operator-(Pair<H> a, Pair<H> b) { return {a.lo - b.lo, a.hi - b.hi}; }
template <typename H> ALWAYS_INLINE Pair<H> operator*(Pair<H> a, Pair<H> b) { return {a.lo * b.lo, a.hi * b.hi}; }
template <typename H> ALWAYS_INLINE Pair<H>& operator+=(Pair<H>& a, Pair<H> b) { a.lo += b.lo; a.hi += b.hi; return a; }
template <typename H> ALWAYS_INLINE Pair<H> operator-(Pair<H> a, int b) { return {a.lo - b, a.hi - b}; }
template <typename H> ALWAYS_INLINE Pair<H> operator^(Pair<H> a, int b) { return {a.lo ^ b, a.hi ^ b}; }
template <typename H> ALWAYS_INLINE Pair<H> operator+(Pair<H> a, int b) { return {a.lo + b, a.hi + b}; }
template <typename H> ALWAYS_INLINE Pair<H> operator&(Pair<H> a, int b) { return {a.lo & b, a.hi & b}; }
template <typename H> ALWAYS_INLINE Pair<H> operator<<(Pair<H> a, int b) { return {a.lo << b, a.hi << b}; }
template <typename H> ALWAYS_INLINE Pair<H> operator|(Pair<H> a, Pair<H> b) { return {a.lo | b.lo, a.hi | b.hi}; }
template <typename H> ALWAYS_INLINE Pair<H> operator>>(Pair<H> a, Pair<H> b) { return {a.lo >> b.lo, a.hi >> b.hi}; }
typedef Pair<f32x8> f32x16;
typedef Pair<i32x8> i32x16;

ALWAYS_INLINE f32x16 to_f32(i32x16 v) { return {__builtin_convertvector(v.lo, f32x8), __builtin_convertvector(v.hi, f32x8)}; }
ALWAYS_INLINE f32x16 splat(float s) { return {f32x8{} + s, f32x8{} + s}; }
ALWAYS_INLINE i32x16 splat_i(int32_t s) { return {i32x8{} + s, i32x8{} + s}; }
ALWAYS_INLINE i32x16 lane_index() { return {i32x8{0, 1, 2, 3, 4, 5, 6, 7}, i32x8{8, 9, 10, 11, 12, 13, 14, 15}}; }
ALWAYS_INLINE float hsum(f32x16 v) {
  const f32x8 h = v.lo + v.hi;
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += h[i];
  return s;
}
#endif

ALWAYS_INLINE float half_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(bits);  // one instruction; c10::Half's conversion adds a few around it
#else
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
#endif
}

// Loads and widenings: intrinsics on x86 (GCC scalarizes a widening of bytes it loaded itself),
// the generic vector conversions elsewhere.
ALWAYS_INLINE u8x16 load_u8(const uint8_t* p) {
#if defined(__SSE2__)
  return (u8x16)_mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
#else
  u8x16 v;
  std::memcpy(&v, p, 16);
  return v;
#endif
}

ALWAYS_INLINE f32x16 load_f32(const float* p) {
#if defined(__AVX512F__)
  f32x16 v;
  std::memcpy(&v, p, 64);
  return v;
#else
  f32x8 lo, hi;  // each half on its own: a copy of the pair would go through memory
  std::memcpy(&lo, p, 32);
  std::memcpy(&hi, p + 8, 32);
  return {lo, hi};
#endif
}

ALWAYS_INLINE i32x16 widen(u8x16 v) {  // zero-extended
#if defined(__AVX512F__)
  return (i32x16)_mm512_cvtepu8_epi32((__m128i)v);
#elif defined(__AVX2__)
  return {(i32x8)_mm256_cvtepu8_epi32((__m128i)v), (i32x8)_mm256_cvtepu8_epi32(_mm_srli_si128((__m128i)v, 8))};
#else
  typedef uint8_t u8x8 __attribute__((vector_size(8)));
  u8x8 lo, hi;
  std::memcpy(&lo, &v, 8);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + 8, 8);
  return {__builtin_convertvector(lo, i32x8), __builtin_convertvector(hi, i32x8)};
#endif
}

ALWAYS_INLINE i32x16 widen_signed(u8x16 v) {  // the bytes as int8, sign-extended
#if defined(__AVX512F__)
  return (i32x16)_mm512_cvtepi8_epi32((__m128i)v);
#elif defined(__AVX2__)
  return {(i32x8)_mm256_cvtepi8_epi32((__m128i)v), (i32x8)_mm256_cvtepi8_epi32(_mm_srli_si128((__m128i)v, 8))};
#else
  return (widen(v) ^ 0x80) - 0x80;
#endif
}

ALWAYS_INLINE f32x16 to_float(u8x16 v) { return to_f32(widen(v)); }
ALWAYS_INLINE f32x16 signed_to_float(u8x16 v) { return to_f32(widen_signed(v)); }

// code - bias as float32 (Q4_0's 8, Q5_0's 16, Q6_K's 32): exact small integers
ALWAYS_INLINE f32x16 centered(u8x16 code, int bias) { return to_f32(widen(code) - bias); }

// Q5 codes: 4 low bits from `q`, the fifth from bit `shift + lane` of the 32-bit mask `qh`
// (shift 0 or 16), in 32-bit lanes (variable shifts, no narrowing).
ALWAYS_INLINE i32x16 q5_codes(u8x16 q, uint32_t qh, int shift) {
  return widen(q) | (((splat_i(static_cast<int32_t>(qh >> shift)) >> lane_index()) & 1) << 4);
}

#if defined(__AVX512F__)
// AVX-512: a 4- or 5-bit code's value is looked up in a table of the 16 (32) values the block's
// codes can take, built with one FMA a block (code times an fp16 scale is exact in float32, so
// fma(code, d, m) rounds once, as d * code + m does): a permute a vector instead of a widening,
// a conversion and an FMA. vpermps reads the low 4 bits of each 32-bit index, vpermt2ps the low
// 5 (bit 4 choosing the table of codes 16..31).
ALWAYS_INLINE __m512 codes_from(int32_t first) {  // first, first + 1, ... first + 15 as float32
  return _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_set1_epi32(first), (__m512i)lane_index()));
}
template <typename V>
ALWAYS_INLINE void visit_nibbles(const uint8_t* q, __m512 table, V& v) {
  const __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
  v(0, (f32x16)_mm512_permutexvar_ps(codes, table));  // byte i's low nibble: value i
  v(1, (f32x16)_mm512_permutexvar_ps(_mm512_srli_epi32(codes, 4), table));  // high: value 16 + i
}
template <typename V>
ALWAYS_INLINE void visit_q5(const uint8_t* q, uint32_t qh, __m512 low, __m512 high, V& v) {
  const __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
  const __m512i sixteen = _mm512_set1_epi32(16);
  const __m512i lo = _mm512_and_epi32(codes, _mm512_set1_epi32(15)), hi = _mm512_srli_epi32(codes, 4);
  v(0, (f32x16)_mm512_permutex2var_ps(low, _mm512_mask_or_epi32(lo, __mmask16(qh), lo, sixteen), high));
  v(1, (f32x16)_mm512_permutex2var_ps(low, _mm512_mask_or_epi32(hi, __mmask16(qh >> 16), hi, sixteen), high));
}

struct Q4_0 {
  static constexpr int QK = 32, BYTES = 18;
  template <typename V> static ALWAYS_INLINE void visit(const uint8_t* b, V&& v) {
    visit_nibbles(b + 2, _mm512_mul_ps(codes_from(-8), _mm512_set1_ps(half_at(b))), v);
  }
};

struct Q4_1 {
  static constexpr int QK = 32, BYTES = 20;
  template <typename V> static ALWAYS_INLINE void visit(const uint8_t* b, V&& v) {
    const __m512 d = _mm512_set1_ps(half_at(b)), m = _mm512_set1_ps(half_at(b + 2));
    visit_nibbles(b + 4, _mm512_fmadd_ps(codes_from(0), d, m), v);
  }
};

struct Q5_0 {
  static constexpr int QK = 32, BYTES = 22;
  template <typename V> static ALWAYS_INLINE void visit(const uint8_t* b, V&& v) {
    const __m512 d = _mm512_set1_ps(half_at(b));
    uint32_t qh;
    std::memcpy(&qh, b + 2, 4);
    visit_q5(b + 6, qh, _mm512_mul_ps(codes_from(-16), d), _mm512_mul_ps(codes_from(0), d), v);
  }
};

struct Q5_1 {
  static constexpr int QK = 32, BYTES = 24;
  template <typename V> static ALWAYS_INLINE void visit(const uint8_t* b, V&& v) {
    const __m512 d = _mm512_set1_ps(half_at(b)), m = _mm512_set1_ps(half_at(b + 2));
    uint32_t qh;
    std::memcpy(&qh, b + 4, 4);
    visit_q5(b + 8, qh, _mm512_fmadd_ps(codes_from(0), d, m), _mm512_fmadd_ps(codes_from(16), d, m), v);
  }
};
#else
struct Q4_0 {
  static constexpr int QK = 32, BYTES = 18;
  template <typename V> static ALWAYS_INLINE void visit(const uint8_t* b, V&& v) {
    const f32x16 d = splat(half_at(b));
    const u8x16 q = load_u8(b + 2);
    v(0, d * centered(q & 0x0F, 8));
    v(1, d * centered(q >> 4, 8));
  }
};

struct Q4_1 {
  static constexpr int QK = 32, BYTES = 20;
  template <typename V> static ALWAYS_INLINE void visit(const uint8_t* b, V&& v) {
    const f32x16 d = splat(half_at(b)), m = splat(half_at(b + 2));
    const u8x16 q = load_u8(b + 4);
    v(0, d * to_float(q & 0x0F) + m);
    v(1, d * to_float(q >> 4) + m);
  }
};

struct Q5_0 {
  static constexpr int QK = 32, BYTES = 22;
  template <typename V> static ALWAYS_INLINE void visit(const uint8_t* b, V&& v) {
    const f32x16 d = splat(half_at(b));
    uint32_t qh;
    std::memcpy(&qh, b + 2, 4);
    const u8x16 q = load_u8(b + 6);
    v(0, d * to_f32(q5_codes(q & 0x0F, qh, 0) - 16));
    v(1, d * to_f32(q5_codes(q >> 4, qh, 16) - 16));
  }
};

struct Q5_1 {
  static constexpr int QK = 32, BYTES = 24;
  template <typename V> static ALWAYS_INLINE void visit(const uint8_t* b, V&& v) {
    const f32x16 d = splat(half_at(b)), m = splat(half_at(b + 2));
    uint32_t qh;
    std::memcpy(&qh, b + 4, 4);
    const u8x16 q = load_u8(b + 8);
    v(0, d * to_f32(q5_codes(q & 0x0F, qh, 0)) + m);
    v(1, d * to_f32(q5_codes(q >> 4, qh, 16)) + m);
  }
};

#endif

struct Q8_0 {
  static constexpr int QK = 32, BYTES = 34;
  template <typename V> static ALWAYS_INLINE void visit(const uint8_t* b, V&& v) {
    const f32x16 d = splat(half_at(b));
    v(0, d * signed_to_float(load_u8(b + 2)));
    v(1, d * signed_to_float(load_u8(b + 18)));
  }
};

// The 6-bit scale and minimum of sub-block j of a Q4_K / Q5_K super-block, as d * sc and
// dmin * m.
ALWAYS_INLINE void k4_scale(const uint8_t* b, int j, float* scale, float* min) {
  const uint8_t* s = b + 4;
  int sc, m;
  if (j < 4) {
    sc = s[j] & 63;
    m = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
    m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
  *scale = half_at(b) * static_cast<float>(sc);
  *min = half_at(b + 2) * static_cast<float>(m);
}

struct Q4_K {
  static constexpr int QK = 256, BYTES = 144;
  template <typename V> static ALWAYS_INLINE void visit(const uint8_t* b, V&& v) {
    for (int j = 0; j < 4; ++j) {  // 32 bytes: sub-block 2j in the low nibbles, 2j + 1 in the high
      float s1, m1, s2, m2;
      k4_scale(b, 2 * j, &s1, &m1);
      k4_scale(b, 2 * j + 1, &s2, &m2);
      for (int h = 0; h < 2; ++h) {
        const u8x16 q = load_u8(b + 16 + 32 * j + 16 * h);
        v(4 * j + h, splat(s1) * to_float(q & 0x0F) - splat(m1));
        v(4 * j + 2 + h, splat(s2) * to_float(q >> 4) - splat(m2));
      }
    }
  }
};

struct Q5_K {
  static constexpr int QK = 256, BYTES = 176;
  template <typename V> static ALWAYS_INLINE void visit(const uint8_t* b, V&& v) {
    for (int j = 0; j < 4; ++j) {
      float s1, m1, s2, m2;
      k4_scale(b, 2 * j, &s1, &m1);
      k4_scale(b, 2 * j + 1, &s2, &m2);
      for (int h = 0; h < 2; ++h) {
        const u8x16 q = load_u8(b + 48 + 32 * j + 16 * h);
        const u8x16 qh = load_u8(b + 16 + 16 * h) >> (2 * j);
        v(4 * j + h, splat(s1) * to_float((q & 0x0F) | ((qh & 1) << 4)) - splat(m1));
        v(4 * j + 2 + h, splat(s2) * to_float((q >> 4) | ((qh & 2) << 3)) - splat(m2));
      }
    }
  }
};

struct Q6_K {
  static constexpr int QK = 256, BYTES = 210;
  template <typename V> static ALWAYS_INLINE void visit(const uint8_t* b, V&& v) {
    const float d = half_at(b + 208);
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    for (int half = 0; half < 2; ++half) {
      const uint8_t* ql = b + 64 * half;
      const uint8_t* qh = b + 128 + 32 * half;
      const int8_t* s = sc + 8 * half;
      for (int h = 0; h < 2; ++h) {  // values l = 16h .. 16h + 15 of each quarter
        const u8x16 lo = load_u8(ql + 16 * h), hi = load_u8(ql + 32 + 16 * h), top = load_u8(qh + 16 * h);
        const int g = 8 * half + h;
        v(g, splat(d * static_cast<float>(s[h])) * centered((lo & 0x0F) | ((top & 3) << 4), 32));
        v(g + 2, splat(d * static_cast<float>(s[h + 2])) * centered((hi & 0x0F) | (((top >> 2) & 3) << 4), 32));
        v(g + 4, splat(d * static_cast<float>(s[h + 4])) * centered((lo >> 4) | (((top >> 4) & 3) << 4), 32));
        v(g + 6, splat(d * static_cast<float>(s[h + 6])) * centered((hi >> 4) | (((top >> 6) & 3) << 4), 32));
      }
    }
  }
};

// Activation rows multiplied per decoded vector, one accumulator each (two where fewer than 4
// rows, to keep 4 FMA chains in flight): the rows of a decode batch are taken in tiles of up to
// kMaxTile, balanced, and each weight vector is decoded once per tile.
#if defined(__AVX512F__)
constexpr int kMaxTile = 12;  // 12 accumulators of the 32 zmm registers; 16 spill
#elif defined(__ARM_NEON) || defined(__AVX2__)
constexpr int kMaxTile = 6;  // each 16-lane vector is a pair of registers (12 of 16 ymm on AVX2)
#else
constexpr int kMaxTile = 2;
#endif
constexpr int kSliceValues = 8192 / kMaxTile;  // activation values per row in a slice of K
constexpr int kRowChunk = 8;  // weight rows kept hot in cache while the activation tiles pass

// out[m, n] (+)= the product over blocks [b0, b1) for m in [m0, m0 + MT), n in [n0, n1): MT
// activation rows share each decoded vector. (Two weight rows at a time for one activation row
// did not pay: slower on a weight streamed from memory.)
template <typename F, int MT>
void rows_tile(const float* x, int64_t K, const uint8_t* w, int64_t row_bytes, float* out, int64_t N,
               int64_t m0, int64_t n0, int64_t n1, int64_t b0, int64_t b1) {
  constexpr int ACC = MT >= 4 ? 1 : 2;  // at least 4 independent FMA chains where there are rows for it
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    f32x16 acc[MT][ACC] = {};
    for (int64_t blk = b0; blk < b1; ++blk) {
      const float* xb = x + m0 * K + blk * F::QK;
      F::visit(row + blk * F::BYTES, [&](int g, f32x16 values) __attribute__((always_inline)) {
        for (int m = 0; m < MT; ++m) acc[m][g % ACC] += values * load_f32(xb + m * K + 16 * g);
      });
    }
    for (int m = 0; m < MT; ++m) {
      f32x16 total = acc[m][0];
      for (int a = 1; a < ACC; ++a) total += acc[m][a];
      const float sum = hsum(total);
      out[(m0 + m) * N + n] = b0 == 0 ? sum : out[(m0 + m) * N + n] + sum;
    }
  }
}

template <typename F>
using RowsTileFn = void (*)(const float*, int64_t, const uint8_t*, int64_t, float*, int64_t, int64_t, int64_t,
                            int64_t, int64_t, int64_t);
template <typename F, std::size_t... MT>
constexpr std::array<RowsTileFn<F>, kMaxTile> rows_tiles(std::index_sequence<MT...>) {
  return {&rows_tile<F, MT + 1>...};
}

// The work of a product with few rows: weight rows in chunks of kRowChunk over torch's threads, K
// in slices of `slice` blocks, the M rows in tiles of balanced sizes up to `max_tile`, each given
// to tile(rows in the tile, its first row, n0, n1, b0, b1).
template <typename Tile>
void in_tiles(int64_t M, int64_t N, int64_t nb, int64_t slice, int64_t max_tile, Tile&& tile) {
  const int64_t num_tiles = (M + max_tile - 1) / max_tile;
  at::parallel_for(0, (N + kRowChunk - 1) / kRowChunk, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t n0 = c * kRowChunk, n1 = std::min(N, n0 + kRowChunk);
      for (int64_t b0 = 0; b0 < nb; b0 += slice) {
        const int64_t b1 = std::min(nb, b0 + slice);
        for (int64_t t = 0, m0 = 0; t < num_tiles; ++t) {
          const int64_t mt = M / num_tiles + (t < M % num_tiles);
          tile(mt, m0, n0, n1, b0, b1);
          m0 += mt;
        }
      }
    }
  });
}

template <typename F>
void few_rows(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t row_bytes, float* out,
              int64_t N) {
  constexpr auto tiles = rows_tiles<F>(std::make_index_sequence<kMaxTile>{});  // tiles[MT - 1]
  const int64_t nb = K / F::QK;
  // With more than one tile of rows, K is taken in slices whose activations stay in L1.
  const int64_t slice = M > kMaxTile ? std::max<int64_t>(1, kSliceValues / F::QK) : nb;
  in_tiles(M, N, nb, slice, kMaxTile, [&](int64_t mt, int64_t m0, int64_t n0, int64_t n1, int64_t b0, int64_t b1) {
    tiles[mt - 1](x, K, w, row_bytes, out, N, m0, n0, n1, b0, b1);
  });
}

// ---- int8 activations ---------------------------------------------------------------------------
//
// The activations of a product are quantized once, per row and block (32 values for the 32-value
// formats, 256 for the K-quants, the weight's block): d = max|x| / 127 and q = x * (127 / max|x|)
// rounded to the nearest integer (ties to even). A block's product is then an integer dot product
// of the weight's codes with q (u8 x s8 products summed in int32: vpdpbusd / vpdpwssd with AVX-512
// VNNI or AVX-VNNI, vpmaddubsw / vpmaddwd with AVX2), the K-quants' sub-block scales folded into
// the integer sums, scaled to float once a block; offsets and minimums go through the block sums
// of q. The result is the dequantized weight times the dequantized activations, up to float32
// summation order. 256-bit vectors throughout: the same code is the AVX2 path (and Zen 4 runs a
// 512-bit instruction as two 256-bit halves).
#if defined(__AVX2__)
constexpr bool kInt8Activations = true;

ALWAYS_INLINE float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

ALWAYS_INLINE float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

ALWAYS_INLINE __m256i load_256(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// acc + the sums of 4 adjacent u8 x s8 products, in int32 lanes (u * s pairs fit int16 here: u <= 128)
ALWAYS_INLINE __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

// acc + the u8 x s8 pair sums (u < 64: no int16 saturation) times int16 `scale`, in int32 lanes
ALWAYS_INLINE __m256i dot_scaled(__m256i acc, __m256i u, __m256i s, __m256i scale) {
  const __m256i pairs = _mm256_maddubs_epi16(u, s);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpwssd_epi32(acc, pairs, scale);
#elif defined(__AVXVNNI__)
  return _mm256_dpwssd_avx_epi32(acc, pairs, scale);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, scale));
#endif
}

// A product's activations as int8: q [M, K], d [M, K / qk], sums16 [M, K / 16] (sums of q over
// 16 values), dsum [M, K / 32] (d times the sums over 32: the 32-value formats' minimums).
struct QuantizedX {
  int64_t K, qk;
  std::unique_ptr<int8_t[]> q;
  std::unique_ptr<float[]> d, dsum;
  std::unique_ptr<int16_t[]> sums;
  const int8_t* row(int64_t m) const { return q.get() + m * K; }
  float scale(int64_t m, int64_t blk) const { return d[m * (K / qk) + blk]; }
  float scaled_sum(int64_t m, int64_t blk) const { return dsum[m * (K / 32) + blk]; }
  const int16_t* sums16(int64_t m, int64_t blk) const { return sums.get() + m * (K / 16) + blk * (qk / 16); }
};

void quantize_row(const float* x, int64_t K, int64_t qk, int8_t* q, float* d, int16_t* sums, float* dsum) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the packs' interleaving
  for (int64_t b = 0; b < K / qk; ++b) {
    const float* xb = x + b * qk;
    __m256 top = _mm256_setzero_ps();
    for (int64_t i = 0; i < qk; i += 8) top = _mm256_max_ps(top, _mm256_and_ps(_mm256_loadu_ps(xb + i), magnitude));
    const float amax = hmax8(top);
    d[b] = amax / 127.f;
    const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    for (int64_t i = 0; i < qk; i += 32) {
      __m256i v[4];
      for (int k = 0; k < 4; ++k) v[k] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + i + 8 * k), inv));
      const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * qk + i), _mm256_permutevar8x32_epi32(packed, order));
    }
  }
  for (int64_t k = 0; k < K / 16; ++k) {
    int32_t s = 0;
    for (int i = 0; i < 16; ++i) s += q[16 * k + i];
    sums[k] = static_cast<int16_t>(s);
  }
  for (int64_t k = 0; k < K / 32; ++k)
    dsum[k] = d[k * 32 / qk] * static_cast<float>(sums[2 * k] + sums[2 * k + 1]);
}

template <typename T>
std::unique_ptr<T[]> uninitialized(int64_t n) {  // every element is written before it is read
  return std::unique_ptr<T[]>(new T[n]);
}

QuantizedX quantize_activations(const float* x, int64_t M, int64_t K, int64_t qk) {
  QuantizedX xq{K, qk, uninitialized<int8_t>(M * K), uninitialized<float>(M * (K / qk)),
                uninitialized<float>(M * (K / 32)), uninitialized<int16_t>(M * (K / 16))};
  at::parallel_for(0, M, 4, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      quantize_row(x + m * K, K, qk, xq.q.get() + m * K, xq.d.get() + m * (K / qk), xq.sums.get() + m * (K / 16),
                   xq.dsum.get() + m * (K / 32));
  });
  return xq;
}

// ---- 32-value formats: a block's 32 weights as signed values (Q4_0, Q5_0, Q8_0: times d) or
// unsigned codes (Q4_1, Q5_1: times d, plus m)
struct SmallBlock {
  __m256i w;
  float d, m;
};

// 16 bytes of nibbles -> 32 bytes: the low nibbles (values 0..15), then the high ones (16..31)
ALWAYS_INLINE __m256i nibbles(const uint8_t* p) {
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), _mm256_set1_epi8(0x0F));
}

// The 32-bit mask at p -> 32 bytes, 0x10 where bit i is set (a Q5 code's fifth bit)
ALWAYS_INLINE __m256i fifth_bits(const uint8_t* p) {
  uint32_t qh;
  std::memcpy(&qh, p, 4);
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  return _mm256_maskz_mov_epi8(static_cast<__mmask32>(qh), _mm256_set1_epi8(0x10));
#else
  const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int32_t>(qh)), spread);  // byte i: qh byte i / 8
  const __m256i bit = _mm256_set1_epi64x(0x8040201008040201);  // byte i: 1 << (i % 8)
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit), _mm256_set1_epi8(0x10));
#endif
}

struct Q4_0i {
  static constexpr int QK = 32, BYTES = 18;
  static constexpr bool kSigned = true;
  static ALWAYS_INLINE SmallBlock visit_i8(const uint8_t* b) {
    return {_mm256_sub_epi8(nibbles(b + 2), _mm256_set1_epi8(8)), half_at(b), 0.f};
  }
};
struct Q4_1i {
  static constexpr int QK = 32, BYTES = 20;
  static constexpr bool kSigned = false;
  static ALWAYS_INLINE SmallBlock visit_i8(const uint8_t* b) { return {nibbles(b + 4), half_at(b), half_at(b + 2)}; }
};
struct Q5_0i {
  static constexpr int QK = 32, BYTES = 22;
  static constexpr bool kSigned = true;
  static ALWAYS_INLINE SmallBlock visit_i8(const uint8_t* b) {
    const __m256i codes = _mm256_or_si256(nibbles(b + 6), fifth_bits(b + 2));
    return {_mm256_sub_epi8(codes, _mm256_set1_epi8(16)), half_at(b), 0.f};
  }
};
struct Q5_1i {
  static constexpr int QK = 32, BYTES = 24;
  static constexpr bool kSigned = false;
  static ALWAYS_INLINE SmallBlock visit_i8(const uint8_t* b) {
    return {_mm256_or_si256(nibbles(b + 8), fifth_bits(b + 4)), half_at(b), half_at(b + 2)};
  }
};
struct Q8_0i {
  static constexpr int QK = 32, BYTES = 34;
  static constexpr bool kSigned = true;
  static ALWAYS_INLINE SmallBlock visit_i8(const uint8_t* b) { return {load_256(b + 2), half_at(b), 0.f}; }
};

// MT rows of one 32-value block: acc[m] (8 float lanes) += d * dx * (w . q); mins[m] += m * dx * sum(q).
// Signed weights go through |w| and q with w's sign (vpsignb), as the products want u8 x s8.
template <typename F, int MT>
ALWAYS_INLINE void small_block(const uint8_t* block, const QuantizedX& x, int64_t m0, int64_t blk, __m256* acc,
                               float* mins) {
  const SmallBlock wb = F::visit_i8(block);
  const __m256i u = F::kSigned ? _mm256_sign_epi8(wb.w, wb.w) : wb.w;
  const int8_t* xb = x.row(m0) + blk * 32;
  for (int m = 0; m < MT; ++m) {
    __m256i s = load_256(xb + m * x.K);
    if constexpr (F::kSigned) s = _mm256_sign_epi8(s, wb.w);
    const __m256i t = dot_u8s8(_mm256_setzero_si256(), u, s);
    const float dx = x.scale(m0 + m, blk);
    acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_set1_ps(wb.d * dx), acc[m]);
    if constexpr (!F::kSigned) mins[m] += wb.m * x.scaled_sum(m0 + m, blk);
  }
}

// ---- K-quants: a super-block visited as 8 chunks of 32 codes (u8), each with its int16 scales
// (a chunk's two halves may have their own), then folded to float per row by the block's `Fold`.

// 16 int16 lanes: word w0 of each 128-bit half of v in the low 8, word w1 in the high 8
ALWAYS_INLINE __m256i words(__m256i v, int w0, int w1) {
  const __m128i lo = _mm_set1_epi16(static_cast<int16_t>(0x0202 * w0 + 0x0100));
  const __m128i hi = _mm_set1_epi16(static_cast<int16_t>(0x0202 * w1 + 0x0100));
  return _mm256_shuffle_epi8(v, _mm256_set_m128i(hi, lo));
}

// 0x10 in the bytes of v whose bit `bit` is set (16-bit shifts: the mask drops what crossed bytes)
ALWAYS_INLINE __m256i bit_as_16(__m256i v, int bit) {
  const __m256i moved = bit <= 4 ? _mm256_slli_epi16(v, 4 - bit) : _mm256_srli_epi16(v, bit - 4);
  return _mm256_and_si256(moved, _mm256_set1_epi8(0x10));
}

// Q4_K / Q5_K: d * sum(sc_j * codes . q) - dmin * sum(m_j * sum(q over sub-block j)), times dx
struct FoldMin {
  float d, dmin;
  __m256i mins;  // int16: m0, m0, m1, m1, ... m7, m7 (against the sums over 16)
  ALWAYS_INLINE __m256 operator()(__m256i s, float dx, const int16_t* sums) const {
    const __m256i m = _mm256_madd_epi16(load_256(sums), mins);
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(d * dx),
                           _mm256_mul_ps(_mm256_cvtepi32_ps(m), _mm256_set1_ps(-dmin * dx)));
  }
};

// The 6-bit scales and minimums of a Q4_K / Q5_K super-block, one byte each (sub-block j in byte j)
ALWAYS_INLINE void k4_scale_bytes(const uint8_t* b, uint64_t* scales, uint64_t* mins) {
  uint32_t a, c, e;
  std::memcpy(&a, b + 4, 4);
  std::memcpy(&c, b + 8, 4);
  std::memcpy(&e, b + 12, 4);
  *scales = (a & 0x3F3F3F3Fu) | uint64_t{(e & 0x0F0F0F0Fu) | ((a >> 2) & 0x30303030u)} << 32;
  *mins = (c & 0x3F3F3F3Fu) | uint64_t{((e >> 4) & 0x0F0F0F0Fu) | ((c >> 2) & 0x30303030u)} << 32;
}

template <int QH>  // 0: Q4_K; else the offset of Q5_K's fifth bits
struct K4i {
  static constexpr int QK = 256, BYTES = QH ? 176 : 144;
  template <typename V> static ALWAYS_INLINE FoldMin visit_i8(const uint8_t* b, V&& v) {
    uint64_t sc, mn;
    k4_scale_bytes(b, &sc, &mn);
    const __m256i scales = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(static_cast<int64_t>(sc))));
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m256i qh = QH ? load_256(b + QH) : _mm256_setzero_si256();
    for (int j = 0; j < 4; ++j) {  // 32 bytes: sub-block 2j in the low nibbles, 2j + 1 in the high
      const __m256i q = load_256(b + (QH ? 48 : 16) + 32 * j);
      __m256i c0 = _mm256_and_si256(q, low), c1 = _mm256_and_si256(_mm256_srli_epi16(q, 4), low);
      if (QH) {
        c0 = _mm256_or_si256(c0, bit_as_16(qh, 2 * j));
        c1 = _mm256_or_si256(c1, bit_as_16(qh, 2 * j + 1));
      }
      v(2 * j, c0, words(scales, 2 * j, 2 * j));
      v(2 * j + 1, c1, words(scales, 2 * j + 1, 2 * j + 1));
    }
    const __m128i m8 = _mm_cvtsi64_si128(static_cast<int64_t>(mn));
    return {half_at(b), half_at(b + 2), _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m8, m8))};
  }
};
using Q4_Ki = K4i<0>;
using Q5_Ki = K4i<16>;

// Q6_K: d * sum(s_k * (codes - 32) . q) over its 16 sub-blocks of 16, times dx
struct FoldCentered {
  float d;
  __m256i scales32;  // int16: 32 * s_k, k = 0..15 (against the sums over 16)
  ALWAYS_INLINE __m256 operator()(__m256i s, float dx, const int16_t* sums) const {
    const __m256i offset = _mm256_madd_epi16(load_256(sums), scales32);
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(s, offset)), _mm256_set1_ps(d * dx));
  }
};

struct Q6_Ki {
  static constexpr int QK = 256, BYTES = 210;
  template <typename V> static ALWAYS_INLINE FoldCentered visit_i8(const uint8_t* b, V&& v) {
    const __m128i s8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 192));
    const __m256i low = _mm256_set1_epi8(0x0F), top = _mm256_set1_epi8(0x30);
    for (int half = 0; half < 2; ++half) {  // 128 values: ql 64 bytes, qh 32
      const __m256i scales = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(half ? _mm_srli_si128(s8, 8) : s8));
      const __m256i l0 = load_256(b + 64 * half), l1 = load_256(b + 64 * half + 32);
      const __m256i h = load_256(b + 128 + 32 * half);
      const int c = 4 * half;  // chunk k: values 32k..32k + 31 of the half, sub-blocks 2k and 2k + 1
      v(c, _mm256_or_si256(_mm256_and_si256(l0, low), _mm256_and_si256(_mm256_slli_epi16(h, 4), top)), words(scales, 0, 1));
      v(c + 1, _mm256_or_si256(_mm256_and_si256(l1, low), _mm256_and_si256(_mm256_slli_epi16(h, 2), top)), words(scales, 2, 3));
      v(c + 2, _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), low), _mm256_and_si256(h, top)), words(scales, 4, 5));
      v(c + 3, _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), low), _mm256_and_si256(_mm256_srli_epi16(h, 2), top)),
        words(scales, 6, 7));
    }
    return {half_at(b + 208), _mm256_slli_epi16(_mm256_cvtepi8_epi16(s8), 5)};
  }
};

// MT rows of one super-block: the integer sums per row (several chains where rows are few, to
// keep the multiply-adds in flight), then the block's fold to float.
template <typename F, int MT>
ALWAYS_INLINE void kquant_block(const uint8_t* block, const QuantizedX& x, int64_t m0, int64_t blk, __m256* acc) {
  constexpr int ACC = MT >= 4 ? 1 : 2;  // two chains for one to three rows: the multiply-adds stay in flight
  __m256i s[MT][ACC];
  for (int m = 0; m < MT; ++m)
    for (int a = 0; a < ACC; ++a) s[m][a] = _mm256_setzero_si256();
  const int8_t* xb = x.row(m0) + blk * 256;
  const auto fold = F::visit_i8(block, [&](int c, __m256i u, __m256i scale) __attribute__((always_inline)) {
    for (int m = 0; m < MT; ++m) s[m][c % ACC] = dot_scaled(s[m][c % ACC], u, load_256(xb + m * x.K + 32 * c), scale);
  });
  for (int m = 0; m < MT; ++m) {
    __m256i total = s[m][0];
    for (int a = 1; a < ACC; ++a) total = _mm256_add_epi32(total, s[m][a]);
    acc[m] = _mm256_add_ps(acc[m], fold(total, x.scale(m0 + m, blk), x.sums16(m0 + m, blk)));
  }
}

// out[m, n] (+)= the product over blocks [b0, b1) for m in [m0, m0 + MT), n in [n0, n1)
template <typename F, int MT>
void rows_tile_i8(const QuantizedX& x, const uint8_t* w, int64_t row_bytes, float* out, int64_t N, int64_t m0,
                  int64_t n0, int64_t n1, int64_t b0, int64_t b1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    __m256 acc[MT];
    float mins[MT];
    for (int m = 0; m < MT; ++m) {
      acc[m] = _mm256_setzero_ps();
      mins[m] = 0.f;
    }
    for (int64_t blk = b0; blk < b1; ++blk) {
      if constexpr (F::QK == 256)
        kquant_block<F, MT>(row + blk * F::BYTES, x, m0, blk, acc);
      else
        small_block<F, MT>(row + blk * F::BYTES, x, m0, blk, acc, mins);
    }
    for (int m = 0; m < MT; ++m) {
      const float sum = hsum8(acc[m]) + mins[m];
      out[(m0 + m) * N + n] = b0 == 0 ? sum : out[(m0 + m) * N + n] + sum;
    }
  }
}

#if defined(__AVX512F__)
constexpr int kMaxTileI8 = 8;  // two 256-bit accumulators a row of the 32 registers
#else
constexpr int kMaxTileI8 = 4;  // of 16
#endif
constexpr int kSliceBytesI8 = 16384 / kMaxTileI8;  // int8 activations per row in a slice of K

template <typename F>
using RowsTileI8Fn = void (*)(const QuantizedX&, const uint8_t*, int64_t, float*, int64_t, int64_t, int64_t, int64_t,
                              int64_t, int64_t);
template <typename F, std::size_t... MT>
constexpr std::array<RowsTileI8Fn<F>, kMaxTileI8> rows_tiles_i8(std::index_sequence<MT...>) {
  return {&rows_tile_i8<F, MT + 1>...};
}

template <typename F>
void few_rows_i8(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t row_bytes, float* out, int64_t N) {
  constexpr auto tiles = rows_tiles_i8<F>(std::make_index_sequence<kMaxTileI8>{});  // tiles[MT - 1]
  const QuantizedX xq = quantize_activations(x, M, K, F::QK);
  const int64_t slice = M > kMaxTileI8 ? std::max<int64_t>(1, kSliceBytesI8 / F::QK) : K / F::QK;
  in_tiles(M, N, K / F::QK, slice, kMaxTileI8, [&](int64_t mt, int64_t m0, int64_t n0, int64_t n1, int64_t b0, int64_t b1) {
    tiles[mt - 1](xq, w, row_bytes, out, N, m0, n0, n1, b0, b1);
  });
}

template <typename Fn>
void dispatch_i8(int64_t qtype, Fn&& fn) {
  switch (qtype) {
    case kQ4_0: fn(Q4_0i{}); break;
    case kQ4_1: fn(Q4_1i{}); break;
    case kQ5_0: fn(Q5_0i{}); break;
    case kQ5_1: fn(Q5_1i{}); break;
    case kQ8_0: fn(Q8_0i{}); break;
    case kQ4_K: fn(Q4_Ki{}); break;
    case kQ5_K: fn(Q5_Ki{}); break;
    case kQ6_K: fn(Q6_Ki{}); break;
    default: TORCH_CHECK(false, "GGUF quantization type ", qtype, " has no CPU kernel");
  }
}
#else
constexpr bool kInt8Activations = false;  // NEON and older x86: the float32 kernels serve int8 requests
#endif

template <typename F>
ALWAYS_INLINE void dequantize_row(const uint8_t* row, int64_t K, float* y) {
  for (int64_t blk = 0; blk < K / F::QK; ++blk) {
    float* yb = y + blk * F::QK;
    F::visit(row + blk * F::BYTES, [&](int g, f32x16 values) __attribute__((always_inline)) { std::memcpy(yb + 16 * g, &values, 64); });
  }
}

template <typename F>
void dequantize_rows(const uint8_t* w, int64_t row_bytes, int64_t N, int64_t K, float* y) {
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) dequantize_row<F>(w + n * row_bytes, K, y + n * K);
  });
}

template <typename Fn>
void dispatch(int64_t qtype, Fn&& fn) {
  switch (qtype) {
    case kQ4_0: fn(Q4_0{}); break;
    case kQ4_1: fn(Q4_1{}); break;
    case kQ5_0: fn(Q5_0{}); break;
    case kQ5_1: fn(Q5_1{}); break;
    case kQ8_0: fn(Q8_0{}); break;
    case kQ4_K: fn(Q4_K{}); break;
    case kQ5_K: fn(Q5_K{}); break;
    case kQ6_K: fn(Q6_K{}); break;
    default: TORCH_CHECK(false, "GGUF quantization type ", qtype, " has no CPU kernel");
  }
}

void check_weight(const at::Tensor& w, int64_t qtype, int64_t K) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous(),
              "GGUF weight: a contiguous uint8 [rows, bytes per row] CPU tensor");
  dispatch(qtype, [&](auto f) {
    using F = decltype(f);
    TORCH_CHECK(K % F::QK == 0 && w.size(1) == K / F::QK * F::BYTES, "GGUF weight: ", w.size(1),
                " bytes per row do not hold ", K, " values of type ", qtype);
  });
}

// weight [N, row_bytes] (blocks of `qtype`) -> float32 [N, K]
at::Tensor dequantize(const at::Tensor& w, int64_t qtype, int64_t K) {
  check_weight(w, qtype, K);
  at::Tensor y = at::empty({w.size(0), K}, w.options().dtype(at::kFloat));
  dispatch(qtype, [&](auto f) {
    dequantize_rows<decltype(f)>(w.data_ptr<uint8_t>(), w.size(1), w.size(0), K, y.data_ptr<float>());
  });
  return y;
}

// Many rows: the weight dequantized a slice of rows at a time into one cache-sized buffer,
// each slice's product by torch's GEMM. x float32 or bfloat16 [M, K] -> float32 [M, N]; a
// bfloat16 x takes each slice rounded to bfloat16 (bfloat16 GEMM: float32 sums, rounded).
at::Tensor dequantized_mm(const at::Tensor& x, const at::Tensor& w, int64_t qtype) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const int64_t slice = std::max<int64_t>(16, (int64_t{1} << 21) / (4 * K));  // about 2 MiB of float32
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  at::Tensor buffer = at::empty({std::min(slice, N), K}, x.options().dtype(at::kFloat));
  for (int64_t n0 = 0; n0 < N; n0 += slice) {
    const int64_t rows = std::min(slice, N - n0);
    at::Tensor part = buffer.narrow(0, 0, rows);
    dispatch(qtype, [&](auto f) {
      dequantize_rows<decltype(f)>(w.data_ptr<uint8_t>() + n0 * w.size(1), w.size(1), rows, K, part.data_ptr<float>());
    });
    out.narrow(1, n0, rows).copy_(at::mm(x, (bf16 ? part.to(at::kBFloat16) : part).t()));
  }
  return out;
}

// x [M, K] bfloat16 @ the weight dequantized to bfloat16, transposed -> float32 [M, N], whatever
// M: dequantized_mm's slices, each rounded to bfloat16.
at::Tensor dequantized_mm_bf16(const at::Tensor& x, const at::Tensor& w, int64_t qtype) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.dim() == 2,
              "GGUF matmul: x must be a bfloat16 [rows, K] CPU tensor");
  check_weight(w, qtype, x.size(1));
  return dequantized_mm(x.contiguous(), w, qtype);
}

// x [M, K] float32, weight [N, row_bytes] (blocks of `qtype`) -> x @ W.T, float32 [M, N];
// M up to `max_direct_rows` through the block kernel (with `int8_activations`, where this build
// has that path, the int8 one), more through a dequantized GEMM.
at::Tensor mm(const at::Tensor& x, const at::Tensor& w, int64_t qtype, int64_t max_direct_rows,
              bool int8_activations = false) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2,
              "GGUF matmul: x must be a float32 [rows, K] CPU tensor");
  const int64_t K = x.size(1);
  check_weight(w, qtype, K);
  if (x.size(0) > max_direct_rows) return dequantized_mm(x, w, qtype);
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), N = w.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  const float* xp = xc.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
#if defined(__AVX2__)
  if (int8_activations) {
    dispatch_i8(qtype, [&](auto f) { few_rows_i8<decltype(f)>(xp, M, K, wp, w.size(1), out.data_ptr<float>(), N); });
    return out;
  }
#endif
  dispatch(qtype, [&](auto f) { few_rows<decltype(f)>(xp, M, K, wp, w.size(1), out.data_ptr<float>(), N); });
  return out;
}

bool has_int8_activations() { return kInt8Activations; }

// ---- the decode step's work between the products (float32, CPU) --------------------------------

// x . y over D values (16 at a time where D allows)
ALWAYS_INLINE float dot(const float* x, const float* y, int64_t D) {
  int64_t d = 0;
  float s = 0.f;
  if (D >= 16) {
    f32x16 acc = splat(0.f);
    for (; d + 16 <= D; d += 16) acc += load_f32(x + d) * load_f32(y + d);
    s = hsum(acc);
  }
  for (; d < D; ++d) s += x[d] * y[d];
  return s;
}

// exp(x[i] - top) in place for i < n (every x[i] <= top), returning their sum. AVX-512: 16 at a
// time, Cephes' single-precision polynomial (within 2 ulp of std::exp) scaled by 2^k in one
// instruction; the rest (and other CPUs) through std::exp.
ALWAYS_INLINE float exp_shifted(float* x, int64_t n, float top) {
  int64_t i = 0;
  float total = 0.f;
#if defined(__AVX512F__)
  const __m512 shift = _mm512_set1_ps(top);
  __m512 sum = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    // inputs below ln(FLT_MIN) give ~1e-38 instead of 0: nothing against a total of at least 1
    const __m512 v = _mm512_max_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), shift), _mm512_set1_ps(-87.33654f));
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), v);  // v - k ln 2, in two parts
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    const __m512 e = _mm512_scalef_ps(_mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.f)), k);
    _mm512_storeu_ps(x + i, e);
    sum = _mm512_add_ps(sum, e);
  }
  total = _mm512_reduce_add_ps(sum);
#endif
  for (; i < n; ++i) total += (x[i] = std::exp(x[i] - top));
  return total;
}

// One query head against its n keys and values (rows `slots` of the pools, `row` floats per
// slot, this head's kv head at `offset`): o [D] = softmax(q . k * scale) . v, D = 16 C, q and the
// output held in registers.
template <int C>
void attend_head(const float* q, const float* kp, const float* vp, const int32_t* slots, int64_t n, int64_t row,
                 int64_t offset, float scale, float* scores, float* o) {
  f32x16 qv[C];
  for (int c = 0; c < C; ++c) qv[c] = load_f32(q + 16 * c);
  float top = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    const float* k = kp + int64_t{slots[j]} * row + offset;
    f32x16 acc = qv[0] * load_f32(k);
    for (int c = 1; c < C; ++c) acc += qv[c] * load_f32(k + 16 * c);
    scores[j] = hsum(acc) * scale;
    top = std::max(top, scores[j]);
  }
  const float total = exp_shifted(scores, n, top);  // softmax numerators, in place
  f32x16 acc[C];
  for (int c = 0; c < C; ++c) acc[c] = splat(0.f);
  for (int64_t j = 0; j < n; ++j) {
    const float* v = vp + int64_t{slots[j]} * row + offset;
    const f32x16 p = splat(scores[j]);
    for (int c = 0; c < C; ++c) acc[c] += p * load_f32(v + 16 * c);
  }
  for (int c = 0; c < C; ++c) std::memcpy(o + 16 * c, &acc[c], 64);
  for (int64_t d = 0; d < 16 * C; ++d) o[d] /= total;
}

// The same for any head size D, the output accumulated in memory.
void attend_head_any(const float* q, const float* kp, const float* vp, const int32_t* slots, int64_t n, int64_t row,
                     int64_t offset, int64_t D, float scale, float* scores, float* o) {
  float top = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    scores[j] = dot(q, kp + int64_t{slots[j]} * row + offset, D) * scale;
    top = std::max(top, scores[j]);
  }
  const float total = exp_shifted(scores, n, top);
  std::fill(o, o + D, 0.f);
  for (int64_t j = 0; j < n; ++j) {
    const float p = scores[j], *v = vp + int64_t{slots[j]} * row + offset;
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) {
      const f32x16 sum = load_f32(o + d) + splat(p) * load_f32(v + d);
      std::memcpy(o + d, &sum, 64);
    }
    for (; d < D; ++d) o[d] += p * v[d];
  }
  for (int64_t d = 0; d < D; ++d) o[d] /= total;
}

// One new token per sequence against its keys in the KV pool, read in place through
// req_to_token (no gathered copy): q [B, H, D], k_pool / v_pool [slots, KV, D], req_to_token
// [rows, max_len] int32, req_indices / seq_lens [B] int64 -> [B, H, D]. Sequence b sees keys
// [start, seq_lens[b]) of its row, start = seq_len - window when a window (> 0) is shorter.
// Work items are (sequence, kv head) pairs, so one sequence's heads spread over the threads;
// an item's key and value rows are read once for the query heads that share them.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                            const at::Tensor& req_to_token, const at::Tensor& req_indices,
                            const at::Tensor& seq_lens, double scale, int64_t window) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_pool.scalar_type() == at::kFloat && v_pool.scalar_type() == at::kFloat &&
                  q.dim() == 3 && k_pool.dim() == 3 && k_pool.is_contiguous() && v_pool.is_contiguous() &&
                  req_to_token.scalar_type() == at::kInt && req_indices.scalar_type() == at::kLong &&
                  seq_lens.scalar_type() == at::kLong,
              "decode_attention: float32 q [B, H, D] and pools [slots, KV, D], int32 req_to_token, int64 rows and lengths");
  const at::Tensor qc = q.contiguous(), rows = req_indices.contiguous(), lens = seq_lens.contiguous();
  const int64_t B = qc.size(0), H = qc.size(1), D = qc.size(2), KV = k_pool.size(1);
  TORCH_CHECK(H % KV == 0 && k_pool.size(2) == D && v_pool.sizes() == k_pool.sizes(), "decode_attention: shapes");
  at::Tensor out = at::empty_like(qc);
  const float* qp = qc.data_ptr<float>();
  const float *kp = k_pool.data_ptr<float>(), *vp = v_pool.data_ptr<float>();
  const int32_t* table = req_to_token.data_ptr<int32_t>();
  const int64_t table_stride = req_to_token.stride(0), G = H / KV;
  const int64_t *row_p = rows.data_ptr<int64_t>(), *len_p = lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  int64_t longest = 1;
  for (int64_t b = 0; b < B; ++b) longest = std::max(longest, len_p[b]);
  // A (sequence, head) at a time, split across the threads when there is work enough for it (a
  // short context's heads cost less than waking a thread); a head's keys and values stay in
  // cache for the other heads of its kv head.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / (longest * D));
  at::parallel_for(0, B * H, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, hh = i % H, kv_off = hh / G * D;
      const int64_t L = len_p[b], start = window > 0 ? std::max<int64_t>(0, L - window) : 0, n = L - start;
      const int32_t* slots = table + row_p[b] * table_stride + start;
      const float* qh = qp + i * D;
      float* o = op + i * D;
      scores.resize(n);
      switch (D) {  // head sizes whose q and output fit in registers; others through memory
        case 32: attend_head<2>(qh, kp, vp, slots, n, KV * D, kv_off, sc, scores.data(), o); break;
        case 64: attend_head<4>(qh, kp, vp, slots, n, KV * D, kv_off, sc, scores.data(), o); break;
        case 128: attend_head<8>(qh, kp, vp, slots, n, KV * D, kv_off, sc, scores.data(), o); break;
        default: attend_head_any(qh, kp, vp, slots, n, KV * D, kv_off, D, sc, scores.data(), o);
      }
    }
  });
  return out;
}

// RMSNorm of float32 rows x [T, C] with weight [C]: x / sqrt(mean(x^2) + eps) * weight; with a
// residual [T, C], of x + residual, which is returned too (the next layer's residual).
std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                            const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && weight.scalar_type() == at::kFloat &&
                  weight.numel() == x.size(1),
              "rms_norm: float32 x [T, C] and weight [C]");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const int64_t T = xc.size(0), C = xc.size(1);
  at::Tensor rc;
  const float* rp = nullptr;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == xc.sizes() && residual->scalar_type() == at::kFloat, "rms_norm: residual like x");
    rc = residual->contiguous();
    rp = rc.data_ptr<float>();
  }
  at::Tensor sum = rp == nullptr ? xc : at::empty_like(xc), out = at::empty_like(xc);
  const float *xp = xc.data_ptr<float>(), *wp = wc.data_ptr<float>();
  float *sp = sum.data_ptr<float>(), *op = out.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* row = sp + t * C;
      if (rp != nullptr)
        for (int64_t c = 0; c < C; ++c) row[c] = xp[t * C + c] + rp[t * C + c];
      const float inv = 1.f / std::sqrt(dot(row, row, C) / static_cast<float>(C) + static_cast<float>(eps));
      for (int64_t c = 0; c < C; ++c) op[t * C + c] = row[c] * inv * wp[c];
    }
  });
  return std::make_tuple(out, sum);
}

}  // namespace

// ---- one whole decoder layer of a decode step (float32, CPU) -----------------------------------
//
// A pre-norm Llama-style layer for one new token per sequence, in one call: the C++ ops above in
// a row with the small steps between them (rotary, KV store, SiLU-and-mul) done in place, so a
// layer costs one dispatch instead of some twenty. The same arithmetic as the module path: the
// same RMSNorm, block products, attention and torch's SiLU; the rotary's sums in the same order.

#include <ATen/ops/cat.h>
#include <ATen/ops/silu.h>

namespace {

// x [M, K] times one segment of a weight's rows: GGUF blocks of `qtype` [N, bytes per row] (with
// kInt8ActivationsFlag added: int8 activations), or (qtype 0) a dense float32 weight [N, K] -> [M, N]
constexpr int64_t kInt8ActivationsFlag = 1 << 8;
at::Tensor segment_product(const at::Tensor& x, const at::Tensor& w, int64_t qtype, int64_t max_direct_rows) {
  if (qtype == 0) {
    TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 2 && w.size(1) == x.size(1), "decoder_layer: dense weight");
    return at::mm(x, w.t());
  }
  return mm(x, w, qtype & ~kInt8ActivationsFlag, max_direct_rows, (qtype & kInt8ActivationsFlag) != 0);
}

// A linear layer whose weight is `count` segments of rows from weights[*next] on (the segments'
// products side by side), plus an optional bias.
at::Tensor layer_linear(const at::Tensor& x, at::TensorList weights, at::IntArrayRef qtypes, int64_t* next,
                        int64_t count, const c10::optional<at::Tensor>& bias, int64_t max_direct_rows) {
  at::Tensor out;
  if (count == 1) {
    out = segment_product(x, weights[*next], qtypes[*next], max_direct_rows);
  } else {
    std::vector<at::Tensor> parts;
    for (int64_t i = 0; i < count; ++i) parts.push_back(segment_product(x, weights[*next + i], qtypes[*next + i], max_direct_rows));
    out = at::cat(parts, 1);
  }
  *next += count;
  if (bias.has_value() && bias->defined()) out.add_(*bias);
  return out;
}

// qkv [B, (H + 2 KV) * D] -> q [B, H, D] rotated; each sequence's k rotated and its v copied to
// its slot of the pools [slots, KV, D]. cos / sin [B, rd]: full rotary width with rotate_half's
// sign folded into sin (cos = [c | c], sin = [-s | s]); dims past rd are not rotated. Products
// and sums rounded one at a time (no fused multiply-add), as torch's ops compute them.
#if defined(__clang__)
#define NO_FP_CONTRACT
#else
#define NO_FP_CONTRACT __attribute__((optimize("fp-contract=off")))
#endif
NO_FP_CONTRACT void rotate_and_store(const float* qkv, const float* cos, const float* sin, const int64_t* slots, int64_t B,
                      int64_t H, int64_t KV, int64_t D, int64_t rd, float* q, float* k_pool, float* v_pool) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  const int64_t half = rd / 2, width = (H + 2 * KV) * D;
  for (int64_t b = 0; b < B; ++b) {
    const float* row = qkv + b * width;
    const float *c = cos + b * rd, *s = sin + b * rd;
    for (int64_t h = 0; h < H + KV; ++h) {
      const float* x = row + h * D;
      float* y = h < H ? q + (b * H + h) * D : k_pool + (slots[b] * KV + h - H) * D;
      // x * cos + rotate_half(x) * sin
      for (int64_t d = 0; d < half; ++d) {
        const float a = x[d] * c[d], p = x[d + half] * s[d];
        y[d] = a + p;
      }
      for (int64_t d = half; d < rd; ++d) {
        const float a = x[d] * c[d], p = x[d - half] * s[d];
        y[d] = a + p;
      }
      for (int64_t d = rd; d < D; ++d) y[d] = x[d];
    }
    std::memcpy(v_pool + slots[b] * KV * D, row + (H + KV) * D, KV * D * sizeof(float));
  }
}

void check_layer_inputs(const at::Tensor& hidden, at::TensorList weights, at::IntArrayRef qtypes,
                        at::IntArrayRef counts, const c10::List<c10::optional<at::Tensor>>& biases,
                        const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_pool,
                        const at::Tensor& v_pool, const at::Tensor& out_slots, at::IntArrayRef shape) {
  TORCH_CHECK(hidden.scalar_type() == at::kFloat && hidden.dim() == 2 && hidden.device().is_cpu(),
              "decoder_layer: float32 hidden [B, C] on the CPU");
  TORCH_CHECK(shape.size() == 5 && counts.size() == 4 && biases.size() == 4 && weights.size() == qtypes.size(),
              "decoder_layer: shape [H, KV, D, window, max_direct_rows], 4 segment counts and 4 biases");
  int64_t total = 0;
  for (const int64_t n : counts) total += n;
  TORCH_CHECK(total == static_cast<int64_t>(weights.size()), "decoder_layer: segment counts do not add up");
  const int64_t B = hidden.size(0), KV = shape[1], D = shape[2];
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.dim() == 2 &&
                  cos.size(0) == B && cos.sizes() == sin.sizes() && cos.is_contiguous() && sin.is_contiguous() &&
                  cos.size(1) % 2 == 0 && cos.size(1) <= D,
              "decoder_layer: cos / sin float32 [B, rotary_dim]");
  TORCH_CHECK(k_pool.scalar_type() == at::kFloat && v_pool.scalar_type() == at::kFloat && k_pool.dim() == 3 &&
                  k_pool.size(1) == KV && k_pool.size(2) == D && v_pool.sizes() == k_pool.sizes() &&
                  k_pool.is_contiguous() && v_pool.is_contiguous(),
              "decoder_layer: float32 pools [slots, KV, D]");
  TORCH_CHECK(out_slots.scalar_type() == at::kLong && out_slots.numel() == B, "decoder_layer: int64 out_slots [B]");
}

// One pre-norm decoder layer for a decode step (B sequences, one new token each): hidden [B, C]
// (and the residual stream, None before the first layer) -> (the MLP's output, the residual
// after attention), as PreNormDecoderLayer.forward returns them. weights / qtypes: the segments of
// qkv, o, gate_up and down in that order, counts[i] of them for linear i; biases: theirs or None.
// shape: [num_heads, num_kv_heads, head_dim, sliding window (0: none), max_direct_rows].
std::tuple<at::Tensor, at::Tensor> decoder_layer(
    const at::Tensor& hidden, const c10::optional<at::Tensor>& residual, const at::Tensor& input_norm,
    const at::Tensor& post_norm, at::TensorList weights, at::IntArrayRef qtypes, at::IntArrayRef counts,
    const c10::List<c10::optional<at::Tensor>>& biases, const at::Tensor& cos, const at::Tensor& sin,
    const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& out_slots, const at::Tensor& req_to_token,
    const at::Tensor& req_indices, const at::Tensor& seq_lens, at::IntArrayRef shape, double scale, double eps) {
  check_layer_inputs(hidden, weights, qtypes, counts, biases, cos, sin, k_pool, v_pool, out_slots, shape);
  const int64_t B = hidden.size(0), H = shape[0], KV = shape[1], D = shape[2], window = shape[3];
  const int64_t direct = shape[4];
  int64_t next = 0;
  auto [normed, res] = rms_norm(hidden, residual, input_norm, eps);
  const at::Tensor qkv = layer_linear(normed, weights, qtypes, &next, counts[0], biases.get(0), direct).contiguous();
  TORCH_CHECK(qkv.size(1) == (H + 2 * KV) * D, "decoder_layer: qkv width");
  at::Tensor q = at::empty({B, H, D}, hidden.options());
  const at::Tensor slots = out_slots.contiguous();
  rotate_and_store(qkv.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), slots.data_ptr<int64_t>(), B,
                   H, KV, D, cos.size(1), q.data_ptr<float>(), k_pool.data_ptr<float>(), v_pool.data_ptr<float>());
  const at::Tensor attn = decode_attention(q, k_pool, v_pool, req_to_token, req_indices, seq_lens, scale, window);
  const at::Tensor o = layer_linear(attn.view({B, H * D}), weights, qtypes, &next, counts[1], biases.get(1), direct);
  auto [normed2, res2] = rms_norm(o, res, post_norm, eps);
  const at::Tensor gate_up = layer_linear(normed2, weights, qtypes, &next, counts[2], biases.get(2), direct);
  const int64_t I = gate_up.size(1) / 2;
  const at::Tensor act = at::silu(gate_up.narrow(1, 0, I)).mul_(gate_up.narrow(1, I, I));  // as SiluAndMul
  return std::make_tuple(layer_linear(act, weights, qtypes, &next, counts[3], biases.get(3), direct), res2);
}

}  // namespace

TORCH_LIBRARY(lightgate_gguf, m) {
  m.def("mm(Tensor x, Tensor weight, int qtype, int max_direct_rows, bool int8_activations=False) -> Tensor");
  m.def("has_int8_activations() -> bool", &has_int8_activations);
  m.def("dequantize(Tensor weight, int qtype, int columns) -> Tensor");
  m.def("mm_bf16(Tensor x, Tensor weight, int qtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(lightgate_gguf, CPU, m) {
  m.impl("mm", &mm);
  m.impl("dequantize", &dequantize);
  m.impl("mm_bf16", &dequantized_mm_bf16);
}

TORCH_LIBRARY(lightgate_cpu, m) {
  m.def("decode_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor req_to_token, Tensor req_indices, "
        "Tensor seq_lens, float scale, int window) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("decoder_layer(Tensor hidden, Tensor? residual, Tensor input_norm, Tensor post_norm, Tensor[] weights, "
        "int[] qtypes, int[] counts, Tensor?[] biases, Tensor cos, Tensor sin, Tensor(a!) k_pool, Tensor(b!) v_pool, "
        "Tensor out_slots, Tensor req_to_token, Tensor req_indices, Tensor seq_lens, int[] shape, float scale, "
        "float eps) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lightgate_cpu, CPU, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("rms_norm", &rms_norm);
  m.impl("decoder_layer", &decoder_layer);
}
