// Products with GGUF block-quantized weights on the CPU, the blocks read as they are stored.
//
// A weight [N, K] is N rows of K / QK blocks, each block laid out as in a GGUF file (Q4_0,
// Q4_1, Q5_0, Q5_1, Q8_0: 32 values; Q4_K, Q5_K, Q6_K: super-blocks of 256). For a few
// activation rows (decode) every block is decoded once into float32 values in a small
// on-stack buffer and multiplied into up to four activation rows at a time, so the weight
// bytes cross the memory bus once per step; the decode is plain C++ written for the
// compiler's vectorizer (built with -march=native / -mcpu=native: AVX2, AVX-512 or NEON,
// whatever the CPU has). Values are decoded exactly as gguf's reference dequantization
// computes them (float32 scale times integer, plus the block's minimum), so the product is the
// dequantize-then-matmul product up to the order of the float32 sums. For many rows (prefill)
// the weight is dequantized to float32 and handed to torch's GEMM.
// Rows are split across torch's intra-op threads.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

// ggml's type ids (GGMLQuantizationType)
constexpr int64_t kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8;
constexpr int64_t kQ4_K = 12, kQ5_K = 13, kQ6_K = 14;

inline float half_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

// Each format decodes a block into int8 codes q[QK] and, per sub-block of SUB values, a float
// scale and offset: value = scale * q + offset, computed as gguf's reference computes it. The
// code extraction is byte arithmetic over whole arrays and the conversion one loop of
// multiply-adds, the shapes the compiler's vectorizer handles.

// kBits[b][i] = bit i of byte b: Q5's fifth bits, spread one per code.
struct BitTable {
  uint8_t v[256][8];
  constexpr BitTable() : v() {
    for (int b = 0; b < 256; ++b)
      for (int i = 0; i < 8; ++i) v[b][i] = static_cast<uint8_t>((b >> i) & 1);
  }
};
constexpr BitTable kBits{};

inline void spread_bits(const uint8_t* qh, uint8_t* bits) {  // 32 bits -> 32 bytes of 0 / 1
  for (int i = 0; i < 4; ++i) std::memcpy(bits + 8 * i, kBits.v[qh[i]], 8);
}

struct Q4_0 {
  static constexpr int QK = 32, SUB = 32, BYTES = 18;
  static inline void decode(const uint8_t* b, int8_t* q, float* scale, float* offset) {
    scale[0] = half_at(b);
    offset[0] = 0.f;
    for (int j = 0; j < 16; ++j) {
      q[j] = static_cast<int8_t>((b[2 + j] & 0x0F) - 8);
      q[j + 16] = static_cast<int8_t>((b[2 + j] >> 4) - 8);
    }
  }
};

struct Q4_1 {
  static constexpr int QK = 32, SUB = 32, BYTES = 20;
  static inline void decode(const uint8_t* b, int8_t* q, float* scale, float* offset) {
    scale[0] = half_at(b);
    offset[0] = half_at(b + 2);
    for (int j = 0; j < 16; ++j) {
      q[j] = static_cast<int8_t>(b[4 + j] & 0x0F);
      q[j + 16] = static_cast<int8_t>(b[4 + j] >> 4);
    }
  }
};

inline void q5_codes(const uint8_t* qh, const uint8_t* qs, int bias, int8_t* q) {
  alignas(32) uint8_t bits[32];
  spread_bits(qh, bits);
  for (int j = 0; j < 16; ++j) {
    q[j] = static_cast<int8_t>(((qs[j] & 0x0F) | (bits[j] << 4)) - bias);
    q[j + 16] = static_cast<int8_t>(((qs[j] >> 4) | (bits[j + 16] << 4)) - bias);
  }
}

struct Q5_0 {
  static constexpr int QK = 32, SUB = 32, BYTES = 22;
  static inline void decode(const uint8_t* b, int8_t* q, float* scale, float* offset) {
    scale[0] = half_at(b);
    offset[0] = 0.f;
    q5_codes(b + 2, b + 6, 16, q);
  }
};

struct Q5_1 {
  static constexpr int QK = 32, SUB = 32, BYTES = 24;
  static inline void decode(const uint8_t* b, int8_t* q, float* scale, float* offset) {
    scale[0] = half_at(b);
    offset[0] = half_at(b + 2);
    q5_codes(b + 4, b + 8, 0, q);
  }
};

struct Q8_0 {
  static constexpr int QK = 32, SUB = 32, BYTES = 34;
  static inline void decode(const uint8_t* b, int8_t* q, float* scale, float* offset) {
    scale[0] = half_at(b);
    offset[0] = 0.f;
    std::memcpy(q, b + 2, 32);
  }
};

// The 6-bit scales and minimums of the 8 sub-blocks of a Q4_K / Q5_K super-block, as
// scale = d * sc, offset = -(dmin * m).
inline void k4_scales(const uint8_t* b, float* scale, float* offset) {
  const float d = half_at(b), dmin = half_at(b + 2);
  const uint8_t* s = b + 4;
  for (int j = 0; j < 8; ++j) {
    int sc, m;
    if (j < 4) {
      sc = s[j] & 63;
      m = s[j + 4] & 63;
    } else {
      sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
      m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
    scale[j] = d * static_cast<float>(sc);
    offset[j] = -(dmin * static_cast<float>(m));
  }
}

struct Q4_K {
  static constexpr int QK = 256, SUB = 32, BYTES = 144;
  static inline void decode(const uint8_t* b, int8_t* q, float* scale, float* offset) {
    k4_scales(b, scale, offset);
    const uint8_t* qs = b + 16;
    for (int j = 0; j < 4; ++j)
      for (int l = 0; l < 32; ++l) {
        q[64 * j + l] = static_cast<int8_t>(qs[32 * j + l] & 0x0F);
        q[64 * j + 32 + l] = static_cast<int8_t>(qs[32 * j + l] >> 4);
      }
  }
};

struct Q5_K {
  static constexpr int QK = 256, SUB = 32, BYTES = 176;
  static inline void decode(const uint8_t* b, int8_t* q, float* scale, float* offset) {
    k4_scales(b, scale, offset);
    const uint8_t* qh = b + 16;
    const uint8_t* ql = b + 48;
    for (int j = 0; j < 4; ++j)
      for (int l = 0; l < 32; ++l) {
        const uint8_t h = static_cast<uint8_t>(qh[l] >> (2 * j));
        q[64 * j + l] = static_cast<int8_t>((ql[32 * j + l] & 0x0F) | ((h & 1) << 4));
        q[64 * j + 32 + l] = static_cast<int8_t>((ql[32 * j + l] >> 4) | ((h & 2) << 3));
      }
  }
};

struct Q6_K {
  static constexpr int QK = 256, SUB = 16, BYTES = 210;
  static inline void decode(const uint8_t* b, int8_t* q, float* scale, float* offset) {
    const float d = half_at(b + 208);
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    for (int s = 0; s < 16; ++s) {
      scale[s] = d * static_cast<float>(sc[s]);
      offset[s] = 0.f;
    }
    for (int half = 0; half < 2; ++half) {
      const uint8_t* ql = b + 64 * half;
      const uint8_t* qh = b + 128 + 32 * half;
      int8_t* y = q + 128 * half;
      for (int l = 0; l < 32; ++l) {
        y[l] = static_cast<int8_t>(((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) - 32);
        y[l + 32] = static_cast<int8_t>(((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32);
        y[l + 64] = static_cast<int8_t>(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
        y[l + 96] = static_cast<int8_t>(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
      }
    }
  }
};

// One block of format F -> its QK float32 values.
template <typename F>
inline void decode_values(const uint8_t* b, float* y) {
  alignas(64) int8_t q[F::QK];
  float scale[F::QK / F::SUB], offset[F::QK / F::SUB];
  F::decode(b, q, scale, offset);
  for (int s = 0; s < F::QK / F::SUB; ++s) {
    const float d = scale[s], m = offset[s];
    for (int j = 0; j < F::SUB; ++j) y[s * F::SUB + j] = d * static_cast<float>(q[s * F::SUB + j]) + m;
  }
}

constexpr int kLanes = 32;      // independent float32 partial sums per activation row
constexpr int kRowChunk = 8;    // weight rows kept hot in cache while the activation tiles pass

// out[m, n] for m in [m0, m0 + MT), n in [n0, n1): MT activation rows share each decoded block.
template <typename F, int MT>
void rows_tile(const float* x, int64_t K, const uint8_t* w, int64_t row_bytes, float* out, int64_t N,
               int64_t m0, int64_t n0, int64_t n1) {
  alignas(64) float buf[F::QK];
  const int64_t nb = K / F::QK;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    alignas(64) float acc[MT][kLanes] = {};
    for (int64_t b = 0; b < nb; ++b) {
      decode_values<F>(row + b * F::BYTES, buf);
      for (int m = 0; m < MT; ++m) {
        const float* xm = x + (m0 + m) * K + b * F::QK;
        for (int c = 0; c < F::QK; c += kLanes)
          for (int j = 0; j < kLanes; ++j) acc[m][j] += buf[c + j] * xm[c + j];
      }
    }
    for (int m = 0; m < MT; ++m) {
      float s = 0.f;
      for (int j = 0; j < kLanes; ++j) s += acc[m][j];
      out[(m0 + m) * N + n] = s;
    }
  }
}

template <typename F>
void few_rows(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t row_bytes, float* out,
              int64_t N) {
  at::parallel_for(0, (N + kRowChunk - 1) / kRowChunk, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t n0 = c * kRowChunk, n1 = std::min(N, n0 + kRowChunk);
      int64_t m0 = 0;
      for (; m0 + 4 <= M; m0 += 4) rows_tile<F, 4>(x, K, w, row_bytes, out, N, m0, n0, n1);
      switch (M - m0) {
        case 3: rows_tile<F, 3>(x, K, w, row_bytes, out, N, m0, n0, n1); break;
        case 2: rows_tile<F, 2>(x, K, w, row_bytes, out, N, m0, n0, n1); break;
        case 1: rows_tile<F, 1>(x, K, w, row_bytes, out, N, m0, n0, n1); break;
        default: break;
      }
    }
  });
}

template <typename F>
void dequantize_rows(const uint8_t* w, int64_t row_bytes, int64_t N, int64_t K, float* y) {
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t b = 0; b < K / F::QK; ++b) decode_values<F>(w + n * row_bytes + b * F::BYTES, y + n * K + b * F::QK);
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

// x [M, K] float32, weight [N, row_bytes] (blocks of `qtype`) -> x @ W.T, float32 [M, N];
// M up to `max_direct_rows` through the block kernel, more through a dequantized GEMM.
at::Tensor mm(const at::Tensor& x, const at::Tensor& w, int64_t qtype, int64_t max_direct_rows) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2,
              "GGUF matmul: x must be a float32 [rows, K] CPU tensor");
  const int64_t K = x.size(1);
  check_weight(w, qtype, K);
  if (x.size(0) > max_direct_rows) return at::mm(x, dequantize(w, qtype, K).t());
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), N = w.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  dispatch(qtype, [&](auto f) {
    few_rows<decltype(f)>(xc.data_ptr<float>(), M, K, w.data_ptr<uint8_t>(), w.size(1), out.data_ptr<float>(), N);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(lightgate_gguf, m) {
  m.def("mm(Tensor x, Tensor weight, int qtype, int max_direct_rows) -> Tensor");
  m.def("dequantize(Tensor weight, int qtype, int columns) -> Tensor");
}

TORCH_LIBRARY_IMPL(lightgate_gguf, CPU, m) {
  m.impl("mm", &mm);
  m.impl("dequantize", &dequantize);
}
